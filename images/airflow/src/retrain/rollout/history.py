"""Serving history in MLflow: what was in production when, and which Airflow run put it there.

Every rollout that changes what serves, and every rollback, is one MLflow run in the
``<experiment>-serving`` experiment, tagged ``serving.model_version``, ``serving.revision``,
``serving.outcome`` (``rolled_out``/``rolled_back``), ``serving.from``/``serving.until``,
``airflow.run_id`` and the reason.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow import MlflowClient

from retrain.settings import Settings


def serving_experiment(settings: Settings) -> str:
    return f"{settings.experiment}-serving"


def record_serving(client: MlflowClient, settings: Settings, *, model_name: str, version: str, outcome: str,
                   revision: int, airflow_run_id: str, reason: str = "",
                   details: dict[str, Any] | None = None) -> tuple[str, str]:
    """One MLflow run per rollout in the ``<experiment>-serving`` experiment; returns (experiment id, run id).

    ``outcome`` is ``rolled_out`` (``version`` serves from now on; the run it replaces gets
    ``serving.until``) or ``rolled_back`` (``version`` failed and the previous one serves on). With
    these runs, :func:`serving_at` answers "what was in production at time X".
    """
    name = serving_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    now_ms = int(time.time() * 1000)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000))
    if outcome == "rolled_out":
        for live in client.search_runs([experiment_id], "tags.`serving.live` = 'true'"):
            client.set_tag(live.info.run_id, "serving.until", iso)
            client.set_tag(live.info.run_id, "serving.live", "false")
    tags = {"serving.model_name": model_name, "serving.model_version": str(version), "serving.outcome": outcome,
            "serving.revision": str(revision), "airflow.run_id": airflow_run_id, "serving.deployment":
            settings.serving_deployment, "serving.live": str(outcome == "rolled_out").lower(), "serving.from": iso}
    if reason:
        tags["serving.reason"] = reason[:5000]
    run = client.create_run(experiment_id, start_time=now_ms, tags=tags,
                            run_name=f"{outcome} {model_name} v{version} (revision {revision})")
    for key, value in (details or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, key, float(value), timestamp=now_ms)
    client.set_terminated(run.info.run_id, "FINISHED" if outcome == "rolled_out" else "FAILED", end_time=now_ms)
    return experiment_id, run.info.run_id


def serving_at(client: MlflowClient, settings: Settings, when_ms: int) -> dict[str, str] | None:
    """The rollout that was serving at ``when_ms`` (epoch milliseconds): its ``serving.*`` tags, or None."""
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`serving.outcome` = 'rolled_out' and attributes.start_time <= {int(when_ms)}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return {k: v for k, v in runs[0].data.tags.items() if k.startswith(("serving.", "airflow."))} if runs else None


def serving_periods(client: MlflowClient, settings: Settings, model_name: str) -> list[tuple[str, int, int | None]]:
    """``(version, from ms, until ms or None)`` of every rollout of ``model_name``, oldest first.

    A version serves from its rollout until the next rollout (a rollback changes nothing: the
    version before it serves on).
    """
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`serving.outcome` = 'rolled_out' and tags.`serving.model_name` = '{model_name}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    starts = [run.info.start_time for run in runs]
    return [(run.data.tags["serving.model_version"], start, end)
            for run, start, end in zip(runs, starts, [*starts[1:], None], strict=True)]


def deployment_live_unrecorded(client: MlflowClient, settings: Settings, name: str, version: str) -> bool:
    """True when ``version`` serves but no live serving record says so (a retry after a kill mid-wait)."""
    live = serving_at(client, settings, int(time.time() * 1000) + 1)
    return not live or (live.get("serving.model_name"), live.get("serving.model_version")) != (name, str(version))
