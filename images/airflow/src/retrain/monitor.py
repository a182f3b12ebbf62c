"""The drift monitor: production embedding windows against the champion's reference, logged to MLflow.

For the version that serves (read from serving itself, not from an alias), every closed sample
window that is not yet in MLflow is compared with the
reference embeddings stored with that version (``drift/reference.npy`` on its training run; see
``embedder.evaluate.log_reference``). Each window's scores are logged to one MLflow run per model
version in the ``<experiment>-monitoring`` experiment, as metric series whose step is the window's
start (epoch seconds): ``p_value``, ``mmd2``, ``mean_shift``, ``n_production``, ``drift`` (1/0) and
``insufficient`` (1/0). Insufficient windows log ``n_production`` and ``insufficient`` only. Each
monitor run that scores windows also logs ``confirmed`` (1/0: its drift decision) at the last window it
scored, and redraws the drift timeline (:mod:`retrain.drift_timeline`) on the run, which its alerts link to.

The monitor then derives the drift state from that history (:func:`drift_state`), alerts when the
state changes (ok → drift, drift → ok; again for an unchanged drift state only after a cooldown),
and tells its DAG whether drift is confirmed, so the DAG can emit the drift Asset event.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from retrain import drift, drift_timeline
from retrain.alerts import Alert, send_alert
from retrain.drift_history import DriftSignalError, drift_state, history, monitoring_run
from retrain.settings import Settings
from retrain_contract import artifacts, storage
from retrain_contract.results import MonitorReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    start: int  # epoch seconds
    result: drift.WindowResult


def sample_windows(settings: Settings, model_name: str, version: str) -> dict[int, list[str]]:
    """Window start → the sample files of every replica, under the drift sample location."""
    root = storage.join(settings.drift.sample_uri, *artifacts.sample_version_path(model_name, version))
    try:
        names = storage.list_files(root)
    except storage.StorageError:
        return {}
    return {start: [storage.join(root, name) for name in files]
            for start, files in artifacts.sample_windows(names).items()}


def load_window(files: list[str]) -> np.ndarray:
    """Every replica's sample of one window, as one array (``files`` is never empty: it lists what exists)."""
    return np.concatenate([np.load(io.BytesIO(storage.read_bytes(f)), allow_pickle=False) for f in files])


def load_reference(client: MlflowClient, model_name: str, version: str) -> np.ndarray:
    from mlflow.artifacts import download_artifacts

    run_id = client.get_model_version(model_name, version).run_id
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        path = download_artifacts(artifact_uri=f"runs:/{run_id}/{artifacts.REFERENCE_ARTIFACT}", dst_path=tmp,
                                  tracking_uri=client.tracking_uri)
        return np.load(Path(path), allow_pickle=False)


def monitor_once(settings: Settings, client: MlflowClient | None = None, now: float | None = None,
                 target: Any = None) -> dict:
    """Score every closed, unscored window of the version that serves; log, alert on a state change; report."""
    from retrain.rollout import target_for

    client = client or MlflowClient()
    now = time.time() if now is None else now
    cfg = settings.drift
    name = settings.model_name
    active = (target or target_for(settings)).read().active  # what answers clients, not what an alias says
    version = active.model_version if active is not None and active.model_name == name else None
    if version is None:
        return MonitorReport(champion=None, state=drift.OK, confirmed=False,
                             reason="nothing serves yet: no traffic to monitor").to_json()
    run = monitoring_run(client, settings, name, version)
    run_id = run.info.run_id
    done = {start for start, _ in history(client, run_id)}
    windows = sample_windows(settings, name, version)
    due = sorted(s for s in windows if artifacts.window_complete_at(s, cfg.window_s) <= now and s not in done)
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
        state, why = None, str(exc)
    if scored and state is not None:  # the decision, at the last window it saw: the timeline marks it
        last = scored[-1].start
        client.log_metric(run_id, "confirmed", float(state == drift.DRIFT),
                          timestamp=int((last + cfg.window_s) * 1000), step=last)
    if scored:
        try:
            drift_timeline.log_timeline(client, settings, run)
        except Exception as exc:  # a picture must never keep the decision or its alert from going out
            log.warning("drift timeline of run %s not drawn (%s: %s); the scores and the decision are logged",
                        run_id, type(exc).__name__, exc)
    if state is None:
        return MonitorReport(champion=version, state=None, confirmed=False, reason=why,
                             scored=[w.start for w in scored], monitoring_run_id=run_id).to_json()
    _alert_on_change(client, settings, run, state, why, scored, now)
    return MonitorReport(champion=version, state=state, confirmed=state == drift.DRIFT, reason=why,
                         scored=[w.start for w in scored], monitoring_run_id=run_id).to_json()


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
    timeline = settings.mlflow_artifact_url(run.info.experiment_id, run.info.run_id, artifacts.DRIFT_TIMELINE)
    title = (f"drift confirmed for {name} version {version}" if state == drift.DRIFT
             else f"drift cleared for {name} version {version}")
    send_alert(Alert(kind="drift", title=title, text=why, fields={
        "model_name": name, "model_version": version, "state": state, "previous_state": previous,
        "drift_timeline": timeline,
        "p_value": latest.result.p_value if latest else None, "mmd2": latest.result.mmd2 if latest else None,
        "mean_shift": latest.result.mean_shift if latest else None, "threshold": settings.drift.alpha,
        "windows_required": settings.drift.windows,
        "window_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(latest.start)) if latest else None,
        "window_seconds": settings.drift.window_s, "mlflow_link": link}), settings)
    client.set_tag(run.info.run_id, "drift.last_alert_at", str(now))
