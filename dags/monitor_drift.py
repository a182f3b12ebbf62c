"""
### Monitor the serving embeddings for drift

Hourly: compare each closed window of the serving API's sampled embeddings with the champion's
reference embeddings (MMD² with an RBF kernel, permutation p-value, mean shift), log the scores to
the `<experiment>-monitoring` MLflow experiment, alert when the drift state changes, and, when
drift is confirmed (K consecutive drifted windows), update the drift Asset so `retrain_embedder`
runs.

| task | what it does |
|---|---|
| `score_windows` | scores the unscored closed windows of the champion, logs them, alerts on a state change |
| `drift_confirmed` | lets the run go on only when drift is confirmed |
| `emit_drift_event` | updates the drift Asset (its event triggers `retrain_embedder`) |
"""

from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import DAG, CronTriggerTimetable, chain, task

from retrain import alerts, monitor
from retrain.assets import drift_asset
from retrain.settings import NEXT_TICK, Settings

settings = Settings.from_env()
log = logging.getLogger(__name__)

with DAG(
    dag_id="monitor_drift",
    description="Hourly drift check of the serving embeddings against the champion's reference",
    doc_md=__doc__,
    schedule=CronTriggerTimetable(settings.monitor_schedule, timezone="UTC", run_immediately=NEXT_TICK),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=50),
    tags=["ml", "monitoring", "embedder"],
    default_args=alerts.task_defaults(settings),
) as dag:

    @task(task_id="score_windows")
    def score_windows() -> dict:
        """Score the closed windows; raises (and so retries, then alerts) when MLflow or storage fails."""
        report = monitor.monitor_once(settings)
        log.info("drift state %s: %s; windows scored now: %d", report["state"], report["reason"], len(report["scored"]))
        return report

    @task.short_circuit(task_id="drift_confirmed")
    def drift_confirmed(report: dict) -> bool:
        return bool(report["confirmed"])

    @task(task_id="emit_drift_event", outlets=[drift_asset(settings)])
    def emit_drift_event(report: dict) -> dict:
        """Its success updates the drift Asset, which triggers retrain_embedder."""
        log.info("drift Asset %s updated: champion version %s, %s", drift_asset(settings).name, report["champion"],
                 report["reason"])
        return {"champion": report["champion"], "reason": report["reason"]}

    report = score_windows()
    chain(report, drift_confirmed(report), emit_drift_event(report))
