"""The one settings object of the control plane, read from the environment when asked for.

Every field has an environment variable and an embedded local-mode default, so that with nothing
set the system runs on one machine: MLflow at 127.0.0.1:5000 with SQLite, data and storage under
``RETRAIN_HOME``, and a local serving process at 127.0.0.1:8080.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from retrain_contract import params
from retrain_contract.serving import PREVIEW_PREFIX

RUNNERS = ("local", "kubernetes")
SERVING_ROLLOUTS = ("deployments", "argo")  # Kubernetes: the deploy step's own switch, or an Argo Rollout
TRAIN_LAUNCHERS = ("job", "pytorchjob")  # several train nodes: an Indexed Job + headless Service, or a PyTorchJob
# A schedule's first run is its next tick after the DAG appears or is unpaused: unpausing never starts the
# slot that just passed. (Airflow 3.3's CronTriggerTimetable treats run_immediately=False like None, which
# runs a slot missed less than a tenth of the interval ago; a zero timedelta says "never".)
NEXT_TICK = timedelta(0)


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the variable and the fix."""


@dataclass(frozen=True)
class Resources:
    """Requests (and limits) of one stage's container; memory and ephemeral storage are limited to the request."""

    cpu: str
    memory: str
    ephemeral_storage: str = "10Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None


def _default_resources() -> dict[str, Resources]:
    return {
        "prepare_data": Resources("1", "2Gi"),
        "train": Resources("4", "16Gi", "50Gi", memory_limit="24Gi"),
        "evaluate": Resources("2", "8Gi"),
    }


@dataclass(frozen=True)
class PodSettings:
    """Kubernetes mode: where and how stage pods run."""

    conn_id: str = "kubernetes_default"
    namespace: str = "retrain"
    image: str = "ghcr.io/example/embedder-trainer:0.1.0"  # may be pinned by digest: repo@sha256:...
    service_account: str = "retrain-stage"
    secrets: tuple[str, ...] = ("retrain-s3", "retrain-mlflow")
    gpu_count: int = 1  # GPUs per train pod, one process each; 0: a CPU-only cluster (train runs like the others)
    train_nodes: int = 1  # >1: train runs as that many pods that rendezvous with torchrun (runners/distributed.py)
    train_launcher: str = "job"  # what runs those pods: an Indexed Job and a headless Service, or a Kubeflow PyTorchJob
    cluster_domain: str = "cluster.local"  # the pods' DNS names end in it (the rendezvous endpoint)
    gpu_node_label: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    gpu_pool: str = "gpu"
    startup_timeout_s: int = 1800  # a GPU node may have to scale up first
    deferrable: bool = False
    resources: dict[str, Resources] = field(default_factory=_default_resources)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PodSettings:
        d = cls()
        label = env.get("RETRAIN_GPU_NODE_LABEL", "=".join(d.gpu_node_label))
        if label.count("=") != 1 or not all(label.split("=")):
            raise SettingsError(f"RETRAIN_GPU_NODE_LABEL={label!r} must look like key=value, "
                                "e.g. cloud.google.com/gke-accelerator=nvidia-l4")
        deferrable = env.get("RETRAIN_DEFERRABLE", "false").lower()
        if deferrable not in ("true", "false"):
            raise SettingsError(f"RETRAIN_DEFERRABLE={deferrable!r} must be true or false")
        secrets = env.get("RETRAIN_STAGE_SECRETS")
        launcher = env.get("RETRAIN_TRAIN_LAUNCHER", d.train_launcher)
        if launcher not in TRAIN_LAUNCHERS:
            raise SettingsError(f"RETRAIN_TRAIN_LAUNCHER={launcher!r} is not a launcher; set it to one of "
                                f"{', '.join(TRAIN_LAUNCHERS)} (pytorchjob needs the Kubeflow Training Operator)")
        return cls(
            conn_id=env.get("RETRAIN_KUBERNETES_CONN_ID", d.conn_id),
            namespace=env.get("RETRAIN_NAMESPACE", d.namespace),
            image=env.get("RETRAIN_STAGE_IMAGE", d.image),
            service_account=env.get("RETRAIN_STAGE_SERVICE_ACCOUNT", d.service_account),
            secrets=tuple(s for s in secrets.split(",") if s) if secrets is not None else d.secrets,
            gpu_count=_count(env, "RETRAIN_GPU_COUNT", d.gpu_count, minimum=0),
            train_nodes=_count(env, "RETRAIN_TRAIN_NODES", d.train_nodes, minimum=1),
            train_launcher=launcher,
            cluster_domain=env.get("RETRAIN_CLUSTER_DOMAIN", d.cluster_domain).strip("."),
            gpu_node_label=tuple(label.split("=")),  # type: ignore[arg-type]
            gpu_pool=env.get("RETRAIN_GPU_POOL", d.gpu_pool),
            startup_timeout_s=int(_number(env, "RETRAIN_POD_STARTUP_TIMEOUT_S", d.startup_timeout_s)),
            deferrable=deferrable == "true",
        )


@dataclass(frozen=True)
class DriftSettings:
    """The drift monitor and the retrain decision (see README, Drift)."""

    sample_uri: str = ""  # where serving writes sampled embeddings (the serving process's --sample-uri)
    sample_rate: float = 0.1  # share of served embeddings sampled (local mode's serving process)
    window_s: float = 3600.0  # sample window; the serving process's --window-seconds must match
    alpha: float = params.DRIFT_ALPHA.default  # a window drifts when its permutation p-value is below this (strict)
    min_samples: int = 50  # fewer production embeddings in a window: insufficient, not drift
    permutations: int = 500
    windows: int = params.DRIFT_WINDOWS.default  # K: drift confirmed after this many consecutive drifted windows
    cooldown_h: float = params.DRIFT_COOLDOWN_H.default  # no drift-triggered retrain this soon after the last training
    max_age_days: float = params.MAX_CHAMPION_AGE_DAYS.default  # retrain when the champion is older than this
    alert_cooldown_h: float = 6.0  # a drift alert repeats for an unchanged state only after this long

    @classmethod
    def from_env(cls, env: Mapping[str, str], home: Path, defaults: Mapping[str, Any]) -> DriftSettings:
        """``defaults``: the run Params' deployment defaults (alpha, K, cooldown and maximum age are Params too)."""
        return cls(
            sample_uri=env.get("RETRAIN_SAMPLE_URI", (home / "samples").as_uri()),
            sample_rate=_number(env, "RETRAIN_SAMPLE_RATE", 0.1, inclusive=True),
            window_s=_number(env, "RETRAIN_DRIFT_WINDOW_S", 3600.0),
            alpha=defaults[params.DRIFT_ALPHA.name],
            min_samples=int(_number(env, "RETRAIN_DRIFT_MIN_SAMPLES", 50, minimum=2, inclusive=True)),
            permutations=int(_number(env, "RETRAIN_DRIFT_PERMUTATIONS", 500, minimum=19, inclusive=True)),
            windows=defaults[params.DRIFT_WINDOWS.name],
            cooldown_h=defaults[params.DRIFT_COOLDOWN_H.name],
            max_age_days=defaults[params.MAX_CHAMPION_AGE_DAYS.name],
            alert_cooldown_h=_number(env, "RETRAIN_DRIFT_ALERT_COOLDOWN_H", 6.0, inclusive=True),
        )


@dataclass(frozen=True)
class AnalysisSettings:
    """The gates a preview must pass on mirrored traffic before it serves (README, "What serves").

    Each gate compares the preview with the active version on the same requests. ``min_images`` images must
    have been compared; live traffic is awaited for ``window_s`` and, with ``replay``, topped up with the
    snapshot's held-out test images (sent to both versions by the deploy step) when it falls short. With
    ``prometheus_url`` the counts come from Prometheus queries (every preview pod), else from the preview's
    own ``/metrics``.
    """

    min_images: int = 32
    window_s: float = 120.0
    replay: bool = True
    max_error_rate: float = 0.01  # preview errors per mirrored request
    max_latency_ratio: float = 2.0  # preview p95 / active p95 on the same requests ...
    latency_floor_ms: float = 100.0  # ... failing only when the preview's p95 is also above this
    max_bad_rate: float = 0.0  # embeddings that are not unit vectors, per image
    min_label_kappa: float = 0.2  # the neighbour votes' agreement beyond chance (Cohen's kappa; each in its gallery)
    prometheus_url: str = ""
    poll_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AnalysisSettings:
        d = cls()
        replay = env.get("RETRAIN_ANALYSIS_REPLAY", "true").lower()
        if replay not in ("true", "false"):
            raise SettingsError(f"RETRAIN_ANALYSIS_REPLAY={replay!r} must be true or false")
        return cls(
            min_images=_count(env, "RETRAIN_ANALYSIS_MIN_IMAGES", d.min_images, minimum=1),
            window_s=_number(env, "RETRAIN_ANALYSIS_WINDOW_S", d.window_s, inclusive=True),
            replay=replay == "true",
            max_error_rate=_fraction(env, "RETRAIN_ANALYSIS_MAX_ERROR_RATE", d.max_error_rate),
            max_latency_ratio=_number(env, "RETRAIN_ANALYSIS_MAX_LATENCY_RATIO", d.max_latency_ratio, minimum=1,
                                      inclusive=True),
            latency_floor_ms=_number(env, "RETRAIN_ANALYSIS_LATENCY_FLOOR_MS", d.latency_floor_ms, inclusive=True),
            max_bad_rate=_fraction(env, "RETRAIN_ANALYSIS_MAX_BAD_RATE", d.max_bad_rate),
            min_label_kappa=_fraction(env, "RETRAIN_ANALYSIS_MIN_KAPPA", d.min_label_kappa),
            prometheus_url=env.get("RETRAIN_PROMETHEUS_URL", d.prometheus_url).rstrip("/"),
            poll_s=_number(env, "RETRAIN_ANALYSIS_POLL_S", d.poll_s),
        )


@dataclass(frozen=True)
class RolloutSettings:
    """How a new version comes to serve: preview, analysis, switch, and the old version kept warm."""

    preview_url: str  # where the deploy step reaches the preview (local mode: the serving URL + /preview)
    kind: str = "deployments"  # Kubernetes: the project's switch over two Deployments, or an Argo Rollout ("argo")
    preview_deployment: str = "embedder-serving-preview"  # Kubernetes: the preview's Deployment and Service
    preview_replicas: int = 1  # Kubernetes: preview pods during the analysis (scaled to the active's before the switch)
    warm_s: float = 30.0  # the old version stays warm this long after the switch (Argo's scaleDownDelaySeconds)
    mirror_rate: float = 0.1  # local mode's serving process: share of answered requests mirrored to a preview
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str], runner: str, serving_url: str, namespace: str) -> RolloutSettings:
        d = cls(preview_url="")
        preview = env.get("RETRAIN_SERVING_PREVIEW_DEPLOYMENT", d.preview_deployment)
        default_url = (f"http://{preview}.{namespace}.svc.cluster.local" if runner == "kubernetes"
                       else f"{serving_url}{PREVIEW_PREFIX}")
        kind = env.get("RETRAIN_SERVING_ROLLOUT", d.kind)
        if kind not in SERVING_ROLLOUTS:
            raise SettingsError(f"RETRAIN_SERVING_ROLLOUT={kind!r} is not a way to roll serving out; set it to one of "
                                f"{', '.join(SERVING_ROLLOUTS)} (argo needs Argo Rollouts and k8s/components/argo-rollouts)")
        return cls(
            preview_url=env.get("RETRAIN_SERVING_PREVIEW_URL", default_url).rstrip("/"),
            kind=kind,
            preview_deployment=preview,
            preview_replicas=_count(env, "RETRAIN_PREVIEW_REPLICAS", d.preview_replicas, minimum=1),
            warm_s=_number(env, "RETRAIN_SCALE_DOWN_DELAY_S", d.warm_s, inclusive=True),
            mirror_rate=_fraction(env, "RETRAIN_MIRROR_RATE", d.mirror_rate),
            analysis=AnalysisSettings.from_env(env),
        )


@dataclass(frozen=True)
class Settings:
    runner: str
    home: Path
    tracking_uri: str
    data_uri: str
    storage_uri: str
    experiment: str
    model_name: str
    serving_url: str
    serving_state_uri: str
    airflow_url: str
    mlflow_ui_url: str
    deploy_timeout_s: float
    deploy_poll_s: float
    local_python: str
    alert_file: str
    serving_deployment: str = "embedder-serving"
    schedule: str = "0 2 * * *"  # retrain_embedder's cron (UTC); it also runs on the drift Asset
    monitor_schedule: str = "5 * * * *"  # monitor_drift's cron (UTC)
    task_retries: int = 2
    retry_delay_s: float = 60.0
    smoke_max_latency_s: float = 2.0
    checkpoint_every_steps: int = 500
    checkpoint_retention_days: float = 7.0  # finished runs' checkpoint files are deleted this long after
    preemption_delay_s: float = 30.0
    train_procs: int | str = 1  # local mode: train's processes on this machine (torchrun); "auto": one per GPU
    drift: DriftSettings = field(default_factory=DriftSettings)
    pods: PodSettings = field(default_factory=PodSettings)
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(preview_url=""))
    # Each run Param's default in this deployment (RETRAIN_EPOCHS, ...): what runs without a conf use.
    param_defaults: dict[str, Any] = field(default_factory=lambda: {p.name: p.default for p in params.ALL})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("RETRAIN_HOME") or Path.home() / ".retrain").expanduser().resolve()
        runner = env.get("RETRAIN_RUNNER", "local")
        if runner not in RUNNERS:
            raise SettingsError(f"RETRAIN_RUNNER={runner!r} is not a runner; set it to one of {', '.join(RUNNERS)}")
        tracking_uri = env.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        serving_url = env.get("RETRAIN_SERVING_URL", "http://127.0.0.1:8080").rstrip("/")
        pods = PodSettings.from_env(env)
        try:
            defaults = {p.name: p.from_env(env) for p in params.ALL}
        except params.ParamError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            runner=runner,
            home=home,
            tracking_uri=tracking_uri,
            data_uri=env.get("RETRAIN_DATA_URI", (home / "data").as_uri()),
            storage_uri=env.get("RETRAIN_STORAGE_URI", (home / "storage").as_uri()),
            experiment=env.get("RETRAIN_EXPERIMENT", "image-embedder"),
            model_name=env.get("RETRAIN_MODEL_NAME", "image-embedder"),
            serving_url=serving_url,
            serving_state_uri=env.get("RETRAIN_SERVING_STATE_URI", (home / "serving" / "desired.json").as_uri()),
            airflow_url=env.get("RETRAIN_AIRFLOW_URL", "http://127.0.0.1:8081").rstrip("/"),
            # What a browser opens for MLflow links; the tracking URI may be an in-cluster address.
            mlflow_ui_url=env.get("RETRAIN_MLFLOW_UI_URL", tracking_uri).rstrip("/"),
            deploy_timeout_s=_number(env, "RETRAIN_DEPLOY_TIMEOUT_S", 300.0),
            deploy_poll_s=_number(env, "RETRAIN_DEPLOY_POLL_S", 1.0),
            local_python=env.get("RETRAIN_LOCAL_PYTHON", sys.executable),
            alert_file=env.get("RETRAIN_ALERT_FILE", str(home / "alerts.jsonl")),
            serving_deployment=env.get("RETRAIN_SERVING_DEPLOYMENT", "embedder-serving"),
            schedule=_cron(env, "RETRAIN_SCHEDULE", cls.schedule),
            monitor_schedule=_cron(env, "RETRAIN_MONITOR_SCHEDULE", cls.monitor_schedule),
            task_retries=int(_number(env, "RETRAIN_TASK_RETRIES", 2, inclusive=True)),
            retry_delay_s=_number(env, "RETRAIN_RETRY_DELAY_S", 60.0),
            smoke_max_latency_s=_number(env, "RETRAIN_SMOKE_MAX_LATENCY_S", 2.0),
            checkpoint_every_steps=int(_number(env, "RETRAIN_CHECKPOINT_EVERY_STEPS", 500, inclusive=True)),
            checkpoint_retention_days=_number(env, "RETRAIN_CHECKPOINT_RETENTION_DAYS", 7.0, inclusive=True),
            preemption_delay_s=_number(env, "RETRAIN_PREEMPTION_DELAY_S", 30.0, inclusive=True),
            train_procs=_train_procs(env),
            drift=DriftSettings.from_env(env, home, defaults),
            pods=pods,
            rollout=RolloutSettings.from_env(env, runner, serving_url, pods.namespace),
            param_defaults=defaults,
        )

    @property
    def checkpoint_root(self) -> str:
        """Where the train stage keeps checkpoints, one folder per DAG run (so retries resume)."""
        return f"{self.storage_uri.rstrip('/')}/checkpoints"

    def stage_env(self) -> dict[str, str]:
        """Environment every stage process needs (beyond its flags).

        ``MLFLOW_CONFIGURE_LOGGING=false`` lets MLflow's messages go through the stage's own log
        format (with their level) instead of MLflow's handler on stderr.
        """
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_CONFIGURE_LOGGING": "false"}

    def mlflow_run_url(self, experiment_id: str, run_id: str) -> str:
        """The MLflow UI page of a run, as a browser opens it."""
        return f"{self.mlflow_ui_url}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, model_name: str, version: str) -> str:
        """The MLflow UI page of a registered model version."""
        return f"{self.mlflow_ui_url}/#/models/{quote(model_name, safe='')}/versions/{version}"

    def mlflow_artifact_url(self, experiment_id: str, run_id: str, path: str) -> str:
        """The MLflow UI page of a run showing one of its artifacts (an HTML page rendered, an image shown)."""
        return f"{self.mlflow_run_url(experiment_id, run_id)}/artifacts/{quote(path)}"

    def mlflow_artifact_file_url(self, run_id: str, path: str) -> str:
        """The bytes of a run's artifact, from MLflow's server (what an ``<img>`` in a model card loads)."""
        return f"{self.mlflow_ui_url}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"

    def airflow_run_url(self, dag_id: str, run_id: str) -> str:
        """The Airflow UI page of a DAG run."""
        return f"{self.airflow_url}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0, inclusive: bool = False) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum or (value == minimum and not inclusive):
        raise SettingsError(f"{name}={raw!r} must be {'at least' if inclusive else 'more than'} {minimum:g}")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, inclusive=True)
    if value > 1:
        raise SettingsError(f"{name}={env[name]!r} must be from 0 to 1")
    return value


def _count(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    if not raw.strip().lstrip("-").isdigit():
        raise SettingsError(f"{name}={raw!r} is not a whole number")
    if int(raw) < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return int(raw)


MAX_TRAIN_PROCS = 64


def _train_procs(env: Mapping[str, str]) -> int | str:
    """``RETRAIN_TRAIN_PROCS``: ``auto`` (one process per visible GPU, one without GPUs) or 1 to :data:`MAX_TRAIN_PROCS`."""
    raw = env.get("RETRAIN_TRAIN_PROCS", "1").strip()
    if raw == "auto":
        return raw
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TRAIN_PROCS:
        raise SettingsError(f"RETRAIN_TRAIN_PROCS={raw!r} must be 'auto' (one training process per visible GPU, one "
                            f"without GPUs) or a whole number from 1 to {MAX_TRAIN_PROCS}")
    return int(raw)


def _cron(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    if len(value.split()) != 5:
        raise SettingsError(f"{name}={value!r} is not a five-field cron expression (minute hour day month weekday), "
                            f"e.g. {default!r}")
    return value
