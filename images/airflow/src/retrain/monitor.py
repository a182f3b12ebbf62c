"""The drift monitor: production embedding windows against the champion's reference, logged to MLflow.

For the champion version, every closed sample window that is not yet in MLflow is compared with the
reference embeddings stored with that version (``drift/reference.npy`` on its training run; see
``embedder.evaluate.log_reference``). Each window's scores are logged to one MLflow run per model
version in the ``<experiment>-monitoring`` experiment, as metric series whose step is the window's
start (epoch seconds): ``p_value``, ``mmd2``, ``mean_shift``, ``n_production``, ``drift`` (1/0) and
``insufficient`` (1/0). Insufficient windows log ``n_production`` and ``insufficient`` only.

The monitor then derives the drift state from that history (:func:`drift_state`), alerts when the
state changes (ok → drift, drift → ok; again for an unchanged drift state only after a cooldown),
and tells its DAG whether drift is confirmed, so the DAG can emit the drift Asset event.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from retrain import drift
from retrain.alerts import Alert, send_alert
from retrain.registry import CHAMPION, alias_version
from retrain.settings import Settings

log = logging.getLogger(__name__)
GRACE_S = 10.0  # a window is read this long after it closes (at most a quarter window), so every replica wrote it


class DriftSignalError(RuntimeError):
    """The drift history cannot be read or makes no sense (NaN); never a reason to retrain."""


@dataclass(frozen=True)
class Window:
    start: int  # epoch seconds
    result: drift.WindowResult


def monitoring_experiment(settings: Settings) -> str:
    return f"{settings.experiment}-monitoring"


def _storage():
    from embedder import storage  # torch-free; installed without dependencies in the Airflow image

    return storage


def sample_windows(settings: Settings, model_name: str, version: str) -> dict[int, list[str]]:
    """Window start → the sample files of every replica, under the drift sample location."""
    storage = _storage()
    root = storage.join(settings.drift.sample_uri, model_name, f"v{version}")
    try:
        names = storage.list_files(root)
    except storage.StorageError:
        return {}
    windows: dict[int, list[str]] = {}
    for name in names:
        folder, _, file = name.partition("/")
        if folder.startswith("window=") and file.endswith(".npy"):
            windows.setdefault(int(folder.removeprefix("window=")), []).append(storage.join(root, name))
    return windows


def load_window(files: list[str]) -> np.ndarray:
    """Every replica's sample of one window, as one array (``files`` is never empty: it lists what exists)."""
    storage = _storage()
    return np.concatenate([np.load(io.BytesIO(storage.read_bytes(f)), allow_pickle=False) for f in files])


def load_reference(client: MlflowClient, model_name: str, version: str) -> np.ndarray:
    from mlflow.artifacts import download_artifacts

    run_id = client.get_model_version(model_name, version).run_id
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        path = download_artifacts(artifact_uri=f"runs:/{run_id}/drift/reference.npy", dst_path=tmp,
                                  tracking_uri=client.tracking_uri)
        return np.load(Path(path), allow_pickle=False)


def monitoring_run(client: MlflowClient, settings: Settings, model_name: str, version: str, create: bool = True):
    """The MLflow run that holds ``version``'s drift series (created on first use)."""
    name = monitoring_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            return None
        experiment_id = client.create_experiment(name)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], f"tags.`drift.model_name` = '{model_name}' and "
                                                f"tags.`drift.model_version` = '{version}'", max_results=1)
    if found:
        return found[0]
    if not create:
        return None
    return client.create_run(experiment_id, run_name=f"drift {model_name} v{version}",
                             tags={"drift.model_name": model_name, "drift.model_version": str(version),
                                   "drift.state": drift.OK})


def history(client: MlflowClient, run_id: str) -> list[tuple[int, float | None]]:
    """``(window start, p-value or None when insufficient)``, oldest first."""
    insufficient = {m.step for m in client.get_metric_history(run_id, "insufficient") if m.value == 1}
    p_values = {m.step: m.value for m in client.get_metric_history(run_id, "p_value")}
    steps = sorted(insufficient | p_values.keys())
    return [(s, None if s in insufficient else p_values[s]) for s in steps]


def drift_state(windows: list[tuple[int, float | None]], alpha: float, k: int) -> tuple[str, str]:
    """(state, why): ``drift`` when the last ``k`` sufficient windows all have ``p < alpha``.

    Insufficient windows are skipped (they neither confirm nor clear drift). A NaN p-value among the
    windows considered raises DriftSignalError: the history is broken, which must not retrain.
    """
    scored = [(start, p) for start, p in windows if p is not None]
    if not scored:
        raise DriftSignalError("no scored drift window yet (empty history or only insufficient windows)")
    recent = scored[-k:]
    if any(math.isnan(p) for _, p in recent):
        raise DriftSignalError(f"NaN p-value in the last {k} drift windows: {recent}")
    drifted = sum(p < alpha for _, p in recent)
    if len(recent) == k and drifted == k:
        return drift.DRIFT, f"p < {alpha} in each of the last {k} windows (latest p = {recent[-1][1]:.4g})"
    return drift.OK, f"{drifted} of the last {len(recent)} scored windows drifted (need {k} in a row)"


def monitor_once(settings: Settings, client: MlflowClient | None = None, now: float | None = None) -> dict:
    """Score every closed, unscored window of the champion; log, alert on a state change; report the state."""
    client = client or MlflowClient()
    now = time.time() if now is None else now
    cfg = settings.drift
    name = settings.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return {"champion": None, "state": drift.OK, "confirmed": False, "reason": "no champion to monitor",
                "scored": []}
    run = monitoring_run(client, settings, name, version)
    run_id = run.info.run_id
    done = {start for start, _ in history(client, run_id)}
    windows = sample_windows(settings, name, version)
    grace = min(GRACE_S, cfg.window_s / 4)
    due = sorted(s for s in windows if s + cfg.window_s + grace <= now and s not in done)
    scored = []
    reference = load_reference(client, name, version) if due else None
    for start in due:
        production = load_window(windows[start])
        result = drift.compare(reference, production, alpha=cfg.alpha, min_samples=cfg.min_samples,
                               permutations=cfg.permutations, seed=start)
        ts = int((start + cfg.window_s) * 1000)
        metrics = {"n_production": result.n_production, "insufficient": float(result.status == drift.INSUFFICIENT)}
        if result.status != drift.INSUFFICIENT:
            metrics |= {"p_value": result.p_value, "mmd2": result.mmd2, "mean_shift": result.mean_shift,
                        "drift": float(result.status == drift.DRIFT)}
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, start) for k, v in metrics.items()])
        log.info("window %s (%d embeddings): %s, p=%s, mmd2=%s, mean shift=%s", time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), result.n_production, result.status, result.p_value,
            result.mmd2, result.mean_shift)
        scored.append(Window(start, result))

    try:
        state, why = drift_state(history(client, run_id), cfg.alpha, cfg.windows)
    except DriftSignalError as exc:
        return {"champion": version, "state": None, "confirmed": False, "reason": str(exc),
                "scored": [w.start for w in scored]}
    _alert_on_change(client, settings, run, state, why, scored, now)
    return {"champion": version, "state": state, "confirmed": state == drift.DRIFT, "reason": why,
            "scored": [w.start for w in scored], "monitoring_run_id": run_id}


def _alert_on_change(client: MlflowClient, settings: Settings, run, state: str, why: str, scored: list[Window],
                     now: float) -> None:
    tags = client.get_run(run.info.run_id).data.tags
    previous = tags.get("drift.state", drift.OK)
    last_alert = float(tags.get("drift.last_alert_at", "0"))
    changed = state != previous
    repeat = state == drift.DRIFT and not changed and now - last_alert >= settings.drift.alert_cooldown_h * 3600
    client.set_tag(run.info.run_id, "drift.state", state)
    if not (changed or repeat):
        return
    latest = scored[-1] if scored else None
    name, version = tags["drift.model_name"], tags["drift.model_version"]
    link = settings.mlflow_run_url(run.info.experiment_id, run.info.run_id)
    title = (f"drift confirmed for {name} version {version}" if state == drift.DRIFT
             else f"drift cleared for {name} version {version}")
    send_alert(Alert(kind="drift", title=title, text=why, fields={
        "model_name": name, "model_version": version, "state": state, "previous_state": previous,
        "p_value": latest.result.p_value if latest else None, "mmd2": latest.result.mmd2 if latest else None,
        "mean_shift": latest.result.mean_shift if latest else None, "threshold": settings.drift.alpha,
        "windows_required": settings.drift.windows,
        "window_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(latest.start)) if latest else None,
        "window_seconds": settings.drift.window_s, "mlflow_link": link}), settings)
    client.set_tag(run.info.run_id, "drift.last_alert_at", str(now))
