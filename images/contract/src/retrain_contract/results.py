"""Each task's result (its XCom): one dataclass per task, written by the task and read by the others.

A stage writes ``result.to_json()`` to its result path; the control plane reads an upstream result
with ``TrainResult.from_json(xcom)``, which names the task and the fields when something is missing.
Templates that pass a field to a stage flag come from :meth:`Result.pull`, which refuses a field the
result does not have, so a renamed field fails where the DAG is parsed, not in a pod at 2 a.m.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Self


class ResultError(ValueError):
    """A task's result lacks what its reader needs; the message names the task and the fields."""


@dataclass(frozen=True)
class Result:
    TASK: ClassVar[str] = ""
    NESTED: ClassVar[dict[str, type[Result]]] = {}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise ResultError(f"the result of {cls.TASK or cls.__name__} is {type(data).__name__}, not an object")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ResultError(f"the result of {cls.TASK or cls.__name__} lacks {', '.join(missing)}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for name, kind in cls.NESTED.items():
            if values.get(name) is not None:
                values[name] = kind.from_json(values[name])
        return cls(**values)

    @classmethod
    def pull(cls, name: str) -> str:
        """The Airflow template of one field of this task's result, for an upstream's flag in a stage command."""
        if name not in {f.name for f in fields(cls)}:
            raise ResultError(f"the result of {cls.TASK} has no field {name!r}")
        return f"{{{{ ti.xcom_pull(task_ids='{cls.TASK}')['{name}'] }}}}"


@dataclass(frozen=True)
class CheckDriftResult(Result):
    TASK: ClassVar[str] = "check_drift"
    retrain: bool
    reason: str
    champion_version: str | None = None
    serving_version: str | None = None  # what answers clients, read from serving itself
    vetoed_version: str | None = None  # a version an operator took out of service, noticed by this run


@dataclass(frozen=True)
class TrackedResult(Result):
    """A stage's result: the MLflow run it logged to, and the data snapshot it worked on."""

    mlflow_run_id: str
    mlflow_experiment_id: str
    dataset_version: str


@dataclass(frozen=True)
class PrepareResult(TrackedResult):
    TASK: ClassVar[str] = "prepare_data"
    manifest_uri: str
    classes: list[str]
    counts: dict[str, int]
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    class_changes: dict[str, list[str]] | None = None


@dataclass(frozen=True)
class TrainResult(TrackedResult):
    TASK: ClassVar[str] = "train"
    model_uri: str
    architecture: str
    image_size: int
    embedding_dim: int
    final_train_loss: float | None = None
    final_val_accuracy: float | None = None
    images_per_sec: float | None = None
    resumed: bool = False


@dataclass(frozen=True)
class Scores(Result):
    """One model's scores on a snapshot's test split (the champion's also name its version)."""

    model_uri: str
    run_id: str
    recall_at_1: float
    recall_at_5: float
    top1_accuracy: float
    num_queries: int
    version: str | None = None


@dataclass(frozen=True)
class EvaluateResult(TrackedResult):
    """The MLflow run is the evaluation's, with both models' scores side by side."""

    TASK: ClassVar[str] = "evaluate"
    NESTED: ClassVar[dict[str, type[Result]]] = {"challenger": Scores, "champion": Scores}
    manifest_uri: str
    challenger: Scores
    champion: Scores | None = None


@dataclass(frozen=True)
class PromoteResult(Result):
    TASK: ClassVar[str] = "promote"
    model_name: str
    version: str  # the challenger's registered version
    promoted: bool
    reason: str
    previous_champion: str | None
    champion: str | None  # what serves from now on
    recall_at_1: float
    dataset_version: str
    champion_recall_at_1: float | None = None


@dataclass(frozen=True)
class DeployResult(Result):
    TASK: ClassVar[str] = "deploy"
    deployment: str
    model_version: str
    revision: int
    changed: bool
    change_cause: str
    embedding_dim: int
    embed_latency_ms: float
    serving_run_id: str | None = None
    serving_experiment_id: str | None = None
    analysis: dict[str, Any] | None = None  # the gates the preview passed (retrain.rollout.analysis.Verdict)
    analysis_run_id: str | None = None
    note: str = ""  # why serving did not change, when it did not


@dataclass(frozen=True)
class MonitorReport(Result):
    TASK: ClassVar[str] = "score_windows"
    champion: str | None
    state: str | None  # "ok", "drift", or None when the history cannot say
    confirmed: bool
    reason: str
    scored: list[int] = field(default_factory=list)  # window starts scored by this run
    monitoring_run_id: str | None = None
