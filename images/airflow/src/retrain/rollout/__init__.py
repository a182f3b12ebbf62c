"""Roll serving forward to the champion version, prove it serves, or put everything back.

- :mod:`~retrain.rollout.deployments`: the Deployment protocol, local mode's serving record and the
  Kubernetes Deployment, and the one wait loop (as ``kubectl rollout status``);
- :mod:`~retrain.rollout.smoke`: the smoke test through the Service;
- :mod:`~retrain.rollout.history`: what served when, in MLflow.

:func:`roll_out_champion` is the deploy task: it rolls forward, waits, smoke-tests, and on failure
restores the previous revision and ``@champion``, sends one alert and fails without retries.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow import MlflowClient

from retrain.alerts import Alert, send_alert
from retrain.registry import embedding_dim
from retrain.rollout.deployments import (
    Deployment,
    KubernetesDeployment,
    LocalDeployment,
    RolloutFailed,
    change_cause,
    deployment_for,
    wait_for_rollout,
)
from retrain.rollout.history import deployment_live_unrecorded, record_serving, serving_at, serving_experiment
from retrain.rollout.smoke import smoke_test
from retrain.settings import Settings
from retrain_contract.registry import CHAMPION, HEADLINE_METRIC
from retrain_contract.results import DeployResult, PromoteResult

__all__ = ["KubernetesDeployment", "LocalDeployment", "RolloutFailed", "deploy", "roll_out_champion", "serving_at",
           "serving_experiment", "smoke_test"]
log = logging.getLogger(__name__)


def deploy(settings: Settings, model_name: str, version: str, cause: str, deployment: Deployment | None = None,
           run_id: str = "", expected_dim: int | None = None) -> dict[str, Any]:
    """Roll serving forward to ``version``, wait, smoke-test; on failure restore the previous revision and raise.

    Idempotent per Airflow run: a retry of a run whose earlier attempt already patched the Deployment
    (and was killed while waiting) makes no new revision; it waits for that one and still knows, from
    what the patch recorded, which revision to restore if it fails.
    """
    deployment = deployment or deployment_for(settings)
    current = deployment.read()
    record, changed = deployment.apply(model_name, version, cause, run_id)
    if changed:
        previous = current
        log.info('deployment "%s" revision %d: %s', deployment.name, record["revision"], cause)
    else:
        previous = deployment.rollback_target(run_id)
        if previous:
            log.info('deployment "%s" revision %d was made by this run (%s) in an earlier attempt; waiting for it '
                     "(a rollback would restore model version %s)", deployment.name, record["revision"], run_id,
                     previous["model_version"])
        else:
            log.info('deployment "%s" already pins model version %s (revision %d); nothing to change',
                     deployment.name, version, record["revision"])
    try:
        wait_for_rollout(deployment, version, settings.deploy_timeout_s, settings.deploy_poll_s)
        smoke = smoke_test(settings.serving_url, model_name, version, expected_dim, settings.smoke_max_latency_s)
    except RolloutFailed as exc:
        if previous is None:
            raise RolloutFailed(f"{exc}. Nothing to roll back to: this run did not change the Deployment.") from None
        restored, _ = deployment.apply(previous["model_name"], previous["model_version"],
                                       f"rollback to revision {previous['revision']}: {previous['change_cause']}", run_id)
        log.warning('deployment "%s": rolled back to model version %s (revision %d)', deployment.name,
                    previous["model_version"], restored["revision"])
        try:
            wait_for_rollout(deployment, previous["model_version"], settings.deploy_timeout_s, settings.deploy_poll_s)
        except RolloutFailed as again:
            raise RolloutFailed(f"{exc}. The rollback did not complete either: {again}") from None
        raise RolloutFailed(f"{exc}. Rolled back to model version {previous['model_version']}.",
                            rolled_back_to=previous, failed_revision=record["revision"]) from None
    return {"deployment": deployment.name, "model_version": str(version), "revision": record["revision"],
            "changed": changed, "change_cause": record["change_cause"], **smoke}


def roll_out_champion(settings: Settings, promotion: dict[str, Any], airflow_run_id: str | None,
                      client: MlflowClient | None = None, deployment: Deployment | None = None) -> dict[str, Any]:
    """Serve the champion ``promote`` chose. On failure: serving and ``@champion`` go back, one alert, raise.

    Every rollout that changes what serves, and every rollback, is recorded in MLflow (:mod:`.history`).
    """
    promoted = PromoteResult.from_json(promotion)
    name, version = promoted.model_name, promoted.champion
    if version is None:
        raise RolloutFailed(f"{name} has no @{CHAMPION}: nothing to deploy")
    client = client or MlflowClient()
    run_id = airflow_run_id or "manual"
    score = promoted.recall_at_1 if promoted.promoted else promoted.champion_recall_at_1
    cause = change_cause(name, version, run_id, HEADLINE_METRIC, score)
    try:
        result = deploy(settings, name, version, cause, deployment, run_id, embedding_dim(client, name, version))
    except RolloutFailed as exc:
        restored = None
        if promoted.promoted:
            restored = promoted.previous_champion
            if restored:
                client.set_registered_model_alias(name, CHAMPION, restored)
            else:
                client.delete_registered_model_alias(name, CHAMPION)
            log.warning("@%s of %s moved back to %s", CHAMPION, name, restored or "nothing")
        if exc.rolled_back_to:
            record_serving(client, settings, model_name=name, version=version, outcome="rolled_back",
                           revision=exc.failed_revision, airflow_run_id=run_id, reason=str(exc))
        send_alert(Alert(kind="rollback", title=f"rollout of {name} version {version} failed", text=str(exc),
                         fields={"model_name": name, "version": version, "restored_champion": restored,
                                 "airflow_run_id": airflow_run_id}), settings)
        exc.alerted = True
        raise
    if result["changed"] or deployment_live_unrecorded(client, settings, name, version):
        result["serving_experiment_id"], result["serving_run_id"] = record_serving(
            client, settings, model_name=name, version=version, outcome="rolled_out", revision=result["revision"],
            airflow_run_id=run_id, details={"embed_latency_ms": result["embed_latency_ms"]})
    return DeployResult.from_json(result).to_json()
