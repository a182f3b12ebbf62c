"""The model card: a registered version's description (Markdown, which MLflow's model page renders).

``promote`` writes it when it registers a challenger, because it knows the decision and the Airflow
run; the rest comes from the MLflow runs the stages logged, read back here, never recomputed:

- data: the ``prepare_data`` run (its metrics and ``data_report.json``: images per split and class,
  quarantined files and why);
- code: the training run's lineage tags (code version, image);
- training: the training run's params (the run's Params and how it ran: device, accelerator) and its
  last epoch's metrics (images/s, loss, accuracy), and how long the run took;
- scores: the evaluation run's metrics, challenger and champion on the same snapshot;
- links: the Airflow run, the MLflow runs and the evaluation report (``report/`` on the training run),
  whose figures the card shows.

:func:`read_facts` gathers what the card says; :func:`render` turns it into Markdown without I/O.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from retrain.settings import Settings
from retrain_contract import artifacts, params
from retrain_contract.registry import HEADLINE_METRIC

# MLflow keeps a model version's description in a VARCHAR(5000) on SQL stores (Postgres enforces it).
MAX_LENGTH = 5000
SCORES = (("recall_at_1", "recall@1"), ("recall_at_5", "recall@5"), ("top1_accuracy", "top-1 accuracy"))
MAX_CLASS_ROWS = 20  # more classes than this: the card gives the range, data_report.json has every count
MAX_QUARANTINED_LINES = 5
# How the training ran, beside the run's Params (retrain_contract.params.TRAINING): train-stage params.
RUN_SETTINGS = ("global_batch_size", "weight_decay", "augment", "seed", "amp", "amp_dtype", "channels_last", "compile",
                "threads", "num_workers", "train_images")


@dataclass(frozen=True)
class RunFacts:
    """One MLflow run as the card reads it."""

    run_id: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_ms: int | None = None
    end_ms: int | None = None

    @classmethod
    def read(cls, client: MlflowClient, run_id: str) -> RunFacts:
        run = client.get_run(run_id)
        return cls(run_id=run.info.run_id, experiment_id=run.info.experiment_id, params=dict(run.data.params),
                   metrics=dict(run.data.metrics), tags=dict(run.data.tags), start_ms=run.info.start_time,
                   end_ms=run.info.end_time)


@dataclass(frozen=True)
class CardFacts:
    model_name: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None  # the champion the challenger was scored against, if any
    prepare: RunFacts
    train: RunFacts
    evaluation: RunFacts
    data_report: dict[str, Any] = field(default_factory=dict)


def read_facts(client: MlflowClient, *, model_name: str, version: str, promoted: bool, reason: str,
               champion_version: str | None, prepare_run_id: str, train_run_id: str,
               evaluation_run_id: str) -> CardFacts:
    """What the card says, read from the three runs of the Airflow run that made ``version``."""
    prepare = RunFacts.read(client, prepare_run_id)
    with tempfile.TemporaryDirectory(prefix="data-report-") as tmp:
        report = json.loads(Path(client.download_artifacts(prepare_run_id, artifacts.DATA_REPORT, tmp)).read_text())
    return CardFacts(model_name=model_name, version=version, promoted=promoted, reason=reason,
                     champion_version=champion_version, prepare=prepare, train=RunFacts.read(client, train_run_id),
                     evaluation=RunFacts.read(client, evaluation_run_id), data_report=report)


def render(facts: CardFacts, settings: Settings) -> str:
    """The card in Markdown, at most :data:`MAX_LENGTH` characters (details are shortened to fit)."""
    card = _render(facts, settings, detailed=True)
    if len(card) > MAX_LENGTH:
        card = _render(facts, settings, detailed=False)
    if len(card) > MAX_LENGTH:
        cut = "\n\n*(card shortened to MLflow's limit; the runs linked above hold every detail)*"
        card = card[: MAX_LENGTH - len(cut)].rsplit("\n", 1)[0] + cut
    return card


def figure_url(settings: Settings, facts: CardFacts, name: str) -> str:
    """Where the card's ``<img>`` of one report figure loads it from: the training run's ``report/``."""
    return settings.mlflow_artifact_file_url(facts.train.run_id, f"{artifacts.REPORT_DIR}/{name}")


def report_url(settings: Settings, facts: CardFacts) -> str:
    """The report page in MLflow's artifact view of the training run."""
    return settings.mlflow_artifact_url(facts.train.experiment_id, facts.train.run_id, artifacts.REPORT_PAGE)


def _render(facts: CardFacts, settings: Settings, detailed: bool) -> str:
    train, evaluation = facts.train, facts.evaluation
    lines = [f"## {facts.model_name} version {facts.version}: "
             + ("promoted to `@champion`" if facts.promoted else "not promoted"), "",
             f"**Why:** {facts.reason}", ""]
    links = [f"[training run]({settings.mlflow_run_url(train.experiment_id, train.run_id)})",
             f"[evaluation report]({report_url(settings, facts)})",
             f"[evaluation run]({settings.mlflow_run_url(evaluation.experiment_id, evaluation.run_id)})",
             f"[data snapshot run]({settings.mlflow_run_url(facts.prepare.experiment_id, facts.prepare.run_id)})"]
    dag_id, run_id = train.tags.get("airflow.dag_id"), train.tags.get("airflow.run_id")
    made_by = (f"Made by Airflow run [`{run_id}`]({settings.airflow_run_url(dag_id, run_id)}) of `{dag_id}`"
               if dag_id and run_id else "Made outside Airflow (no Airflow run recorded on the training run)")
    lines += [f"{made_by}. " + " · ".join(links), ""]
    lines += _scores(facts) + _data(facts, detailed) + _code(facts) + _training(facts)
    lines += ["### Figures (from the evaluation report)", ""]
    lines += [f"![{caption}]({figure_url(settings, facts, name)})" for name, caption in artifacts.REPORT_FIGURES.items()]
    return "\n".join(lines) + "\n"


def _scores(facts: CardFacts) -> list[str]:
    metrics = facts.evaluation.metrics
    dataset = facts.evaluation.tags.get("dataset_version", "?")
    compared = facts.champion_version is not None
    head = "| metric | this version |" + (f" champion (version {facts.champion_version}) | change |" if compared else "")
    rows = [f"### How it scored (dataset `{dataset}`, test split)", "",
            "Challenger and champion are scored by the same `evaluate` run on the same snapshot; "
            f"promotion compares {HEADLINE_METRIC}.", "", head, "|---|---:|" + ("---:|---:|" if compared else "")]
    for key, label in SCORES:
        new = metrics.get(f"challenger_{key}")
        old = metrics.get(f"champion_{key}") if compared else None
        row = f"| {label} | {_number(new)} |"
        if compared:
            row += f" {_number(old)} | " + (f"{new - old:+.4f}" if new is not None and old is not None else "n/a") + " |"
        rows.append(row)
    if not compared:
        rows += ["", "No champion to compare with: this was the first model."]
    return [*rows, ""]


def _data(facts: CardFacts, detailed: bool) -> list[str]:
    metrics, report = facts.prepare.metrics, facts.data_report
    splits = [(s, metrics[f"{s}_images"]) for s in ("train", "val", "test") if f"{s}_images" in metrics]
    rows = ["### Data", "",
            f"- dataset version `{report.get('dataset_version', facts.prepare.tags.get('dataset_version', '?'))}`"
            + (f" from `{facts.prepare.params['data_uri']}`" if "data_uri" in facts.prepare.params else ""),
            f"- {', '.join(f'{int(n)} {s}' for s, n in splits)} images in {_int(metrics.get('num_classes'))} classes; "
            f"{_files(metrics.get('quarantined_files'))} quarantined"]
    changes = report.get("class_changes")
    if changes and (changes.get("added") or changes.get("removed")):
        rows.append(f"- classes added: {', '.join(changes.get('added') or []) or 'none'}; "
                    f"removed: {', '.join(changes.get('removed') or []) or 'none'}")
    counts: dict[str, dict[str, int]] = report.get("counts", {})
    classes = sorted({c for per_split in counts.values() for c in per_split})
    names = [s for s, _ in splits]
    if detailed and classes and len(classes) <= MAX_CLASS_ROWS:
        rows += ["", "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows += [f"| {c} | " + " | ".join(str(counts.get(s, {}).get(c, 0)) for s in names) + " |" for c in classes]
    elif classes:
        per_class = [sum(counts.get(s, {}).get(c, 0) for s in names) for c in classes]
        rows.append(f"- images per class: {min(per_class)} to {max(per_class)} (every count: `{artifacts.DATA_REPORT}` "
                    "of the data snapshot run)")
    quarantined = report.get("quarantined") or []
    if quarantined:
        shown = quarantined[:MAX_QUARANTINED_LINES] if detailed else []
        rows += ["", "Quarantined (left out of the snapshot):"] if shown else []
        rows += [f"- `{q.get('path')}`: {q.get('reason')}" for q in shown]
        if len(quarantined) > len(shown):
            rows.append(f"- {len(quarantined) - len(shown)} {'more ' if shown else ''}quarantined files: "
                        f"`{artifacts.DATA_REPORT}` of the data snapshot run lists each and why")
    return [*rows, ""]


def _code(facts: CardFacts) -> list[str]:
    tags = facts.train.tags
    return ["### Code", "", f"- code version `{tags.get('code_version', '?')}`, image `{tags.get('image', '?')}`", ""]


def _training(facts: CardFacts) -> list[str]:
    train = facts.train
    rows = ["### Training", "", "| Param | value |", "|---|---|"]
    rows += [f"| {p.name} | `{train.params[p.name]}` |" for p in params.TRAINING if p.name in train.params]
    how = [f"{name} `{train.params[name]}`" for name in RUN_SETTINGS if name in train.params]
    took = (train.end_ms - train.start_ms) / 1000 if train.start_ms and train.end_ms else None
    metrics = train.metrics
    results = [f"run took {_duration(took)}" if took is not None else "run still open",
               f"{metrics['images_per_sec']:.1f} images/s in the last epoch" if "images_per_sec" in metrics else None,
               f"final train loss {metrics['train_loss']:.4f}" if "train_loss" in metrics else None,
               f"validation accuracy {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else None]
    device = train.params.get("device", "?")
    accelerator = train.params.get("gpu")
    on = f"GPU ({accelerator})" if device == "cuda" and accelerator and accelerator != "none" else device.upper()
    world = int(train.params.get("world_size", "1"))
    if world > 1:
        on += f" x {world} processes"
    rows += ["", f"Trained on {on}: " + ", ".join(r for r in results if r) + "."]
    if how:
        rows.append(f"Also set: {', '.join(how)}.")
    return [*rows, ""]


def _files(count: float | None) -> str:
    return "? files" if count is None else f"{int(count)} file{'' if int(count) == 1 else 's'}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _int(value: float | None) -> str:
    return "?" if value is None else str(int(value))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def write(client: MlflowClient, settings: Settings, facts: CardFacts) -> str:
    """Set the card as the model version's description; returns it."""
    card = render(facts, settings)
    client.update_model_version(facts.model_name, facts.version, description=card)
    return card
