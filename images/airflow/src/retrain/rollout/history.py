"""Serving history in MLflow: what was in production when, who put it there, and how each preview fared.

Every change of what serves, every rejected preview and every analysis is one MLflow run in the
``<experiment>-serving`` experiment, tagged ``serving.model_version``, ``serving.revision``,
``serving.outcome``, ``serving.from``/``serving.until``, ``airflow.run_id`` and the reason:

- ``rolled_out``: the system switched clients to the version;
- ``operator``: someone else did (``kubectl rollout undo``, a switch back, an edit), found by the next run;
- ``rolled_back``: the version served, failed its checks, and the system switched back;
- ``rejected``: the version never answered a client (its preview or its analysis failed);
- ``analysis``: the gates of a preview against the active version, with the numbers they judged.

``rolled_out`` and ``operator`` runs are serving periods (:func:`serving_at`, :func:`serving_periods`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlflow import MlflowClient

from retrain.settings import Settings

PERIODS = ("rolled_out", "operator")  # outcomes after which the version serves
VERDICT_TAG = "analysis.verdict"  # the whole verdict as JSON, where it fits a tag
VERDICT_TAG_LIMIT = 8000  # MLflow's longest tag value


def serving_experiment(settings: Settings) -> str:
    return f"{settings.experiment}-serving"


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    name = serving_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def record_serving(client: MlflowClient, settings: Settings, *, model_name: str, version: str, outcome: str,
                   revision: int, airflow_run_id: str, reason: str = "",
                   details: dict[str, Any] | None = None) -> tuple[str, str]:
    """One MLflow run per change in the ``<experiment>-serving`` experiment; returns (experiment id, run id).

    A serving period (``rolled_out``, ``operator``) closes the one before it (``serving.until``); with these
    runs, :func:`serving_at` answers "what was in production at time X".
    """
    experiment_id = _experiment_id(client, settings)
    now_ms = int(time.time() * 1000)
    live = outcome in PERIODS
    if live:
        for run in client.search_runs([experiment_id], "tags.`serving.live` = 'true'"):
            client.set_tag(run.info.run_id, "serving.until", _iso(now_ms))
            client.set_tag(run.info.run_id, "serving.live", "false")
    tags = {"serving.model_name": model_name, "serving.model_version": str(version), "serving.outcome": outcome,
            "serving.revision": str(revision), "airflow.run_id": airflow_run_id, "serving.deployment":
            settings.serving_deployment, "serving.live": str(live).lower(), "serving.from": _iso(now_ms),
            "serving.by": "operator" if outcome == "operator" else "retrain_embedder"}
    if reason:
        tags["serving.reason"] = reason[:5000]
    run = client.create_run(experiment_id, start_time=now_ms, tags=tags,
                            run_name=f"{outcome} {model_name} v{version} (revision {revision})")
    for key, value in (details or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, key, float(value), timestamp=now_ms)
    client.set_terminated(run.info.run_id, "FINISHED" if live else "FAILED", end_time=now_ms)
    return experiment_id, run.info.run_id


def record_analysis(client: MlflowClient, settings: Settings, *, model_name: str, preview: str, active: str,
                    verdict: dict[str, Any], airflow_run_id: str) -> tuple[str, str]:
    """The analysis of ``preview`` against ``active`` as one run: a metric and three tags per gate, the verdict."""
    experiment_id = _experiment_id(client, settings)
    now_ms = int(time.time() * 1000)
    tags = {"serving.model_name": model_name, "serving.model_version": str(preview), "serving.outcome": "analysis",
            "analysis.against_version": str(active), "analysis.passed": str(verdict["passed"]).lower(),
            "analysis.reason": verdict["reason"][:5000], "analysis.source": verdict["source"],
            "airflow.run_id": airflow_run_id, "serving.live": "false"}
    whole = json.dumps(verdict, separators=(",", ":"))
    if len(whole) <= VERDICT_TAG_LIMIT:
        tags[VERDICT_TAG] = whole
    for gate in verdict["gates"]:
        tags[f"analysis.gate.{gate['name']}"] = "pass" if gate["passed"] else "FAIL"
        tags[f"analysis.gate.{gate['name']}.detail"] = gate["detail"][:5000]
    run = client.create_run(experiment_id, start_time=now_ms, tags=tags,
                            run_name=f"analysis {model_name} v{preview} vs v{active}")
    metrics = {"requests": verdict["requests"], "images": verdict["images"], "replayed": verdict["replayed"]}
    for gate in verdict["gates"]:
        if gate["observed"] is not None:
            metrics[f"{gate['name']}.observed"] = gate["observed"]
        metrics[f"{gate['name']}.threshold"] = gate["threshold"]
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value), timestamp=now_ms)
    client.set_terminated(run.info.run_id, "FINISHED" if verdict["passed"] else "FAILED", end_time=now_ms)
    return experiment_id, run.info.run_id


def passed_analysis(client: MlflowClient, settings: Settings, *, model_name: str, preview: str, active: str,
                    airflow_run_id: str) -> tuple[str, dict[str, Any]] | None:
    """This Airflow run's passed analysis of ``preview`` against ``active`` (its MLflow run and verdict), if any: a
    retry of the deploy step after the analysis passed does not judge again (the preview may be at full size by
    then, and its traffic is no longer what the analysis measures)."""
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`serving.outcome` = 'analysis' and tags.`analysis.passed` = 'true' and "
        f"tags.`airflow.run_id` = '{airflow_run_id}' and tags.`serving.model_version` = '{preview}' and "
        f"tags.`analysis.against_version` = '{active}' and tags.`serving.model_name` = '{model_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or VERDICT_TAG not in runs[0].data.tags:
        return None
    return runs[0].info.run_id, json.loads(runs[0].data.tags[VERDICT_TAG])


def _periods(client: MlflowClient, experiment_id: str, extra: str, newest_first: bool, max_results: int) -> list:
    """Serving-period runs (one search per outcome: MLflow's filter has no IN for tags), merged by start time."""
    order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
    runs = [run for outcome in PERIODS for run in client.search_runs(
        [experiment_id], f"tags.`serving.outcome` = '{outcome}'{extra}", order_by=order, max_results=max_results)]
    return sorted(runs, key=lambda r: r.info.start_time, reverse=newest_first)[:max_results]


def serving_at(client: MlflowClient, settings: Settings, when_ms: int) -> dict[str, str] | None:
    """The serving period that was live at ``when_ms`` (epoch milliseconds): its ``serving.*`` tags, or None."""
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return None
    runs = _periods(client, experiment.experiment_id, f" and attributes.start_time <= {int(when_ms)}", True, 1)
    return {k: v for k, v in runs[0].data.tags.items() if k.startswith(("serving.", "airflow."))} if runs else None


def serving_periods(client: MlflowClient, settings: Settings, model_name: str) -> list[tuple[str, int, int | None]]:
    """``(version, from ms, until ms or None)`` of every serving period of ``model_name``, oldest first.

    A version serves from its period's start until the next period (a rejection or a rollback changes
    nothing: the version before it serves on).
    """
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return []
    runs = _periods(client, experiment.experiment_id, f" and tags.`serving.model_name` = '{model_name}'", False, 1000)
    starts = [run.info.start_time for run in runs]
    return [(run.data.tags["serving.model_version"], start, end)
            for run, start, end in zip(runs, starts, [*starts[1:], None], strict=True)]


def live_record(client: MlflowClient, settings: Settings) -> dict[str, str] | None:
    """The serving period that is live now, as the history says."""
    return serving_at(client, settings, int(time.time() * 1000) + 1)


def unrecorded(client: MlflowClient, settings: Settings, name: str, version: str) -> bool:
    """True when ``version`` serves but no live serving period says so (a retry after a kill before the record)."""
    live = live_record(client, settings)
    return not live or (live.get("serving.model_name"), live.get("serving.model_version")) != (name, str(version))
