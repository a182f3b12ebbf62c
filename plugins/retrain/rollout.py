"""Roll serving forward to the champion version, wait until it serves, roll back when it does not.

Local mode's serving "Deployment" is a desired-state record (JSON) that the serving process
follows. Like a pod template, the record pins a model **version** (never an alias); each change
is a new revision with a change-cause, and a bounded history is kept so a rollback restores the
previous revision. Waiting is done the way ``kubectl rollout status`` does it: the rollout is
complete only when the server reports the desired version loaded and ready.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from mlflow import MlflowClient

from retrain.alerts import Alert, send_alert
from retrain.registry import CHAMPION, HEADLINE_METRIC
from retrain.settings import Settings

log = logging.getLogger(__name__)
REVISION_HISTORY_LIMIT = 10
HISTORY_FIELDS = ("revision", "model_name", "model_version", "change_cause", "updated_at")


class RolloutFailed(RuntimeError):
    """The new version did not serve in time; ``alerted`` is set once the rollback alert went out."""

    alerted = False


@dataclass(frozen=True)
class ServingStatus:
    reachable: bool
    version: str | None = None
    ready: bool = False
    error: str | None = None


def _path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"local serving state must be a file:// URI, got {uri!r}")
    return Path(parsed.path if parsed.scheme else uri)


class LocalDeployment:
    """The desired-state record of the local serving process."""

    name = "embedder-serving"

    def __init__(self, state_uri: str, serving_url: str):
        self.path = _path(state_uri)
        self.serving_url = serving_url

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.path)

    def apply(self, model_name: str, version: str, change_cause: str) -> tuple[dict[str, Any], bool]:
        """Pin ``version``; returns (record, changed). Re-applying the pinned version changes nothing."""
        current = self.read()
        if current and current["model_name"] == model_name and current["model_version"] == str(version):
            return current, False
        history = (current or {}).get("history", [])
        if current:
            history = [*history, {k: current[k] for k in HISTORY_FIELDS}]
        record = {
            "model_name": model_name,
            "model_version": str(version),
            "revision": (current or {}).get("revision", 0) + 1,
            "change_cause": change_cause,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "history": history[-REVISION_HISTORY_LIMIT:],
        }
        self._write(record)
        return record, True

    def status(self) -> ServingStatus:
        try:
            meta = requests.get(f"{self.serving_url}/metadata", timeout=5).json()
        except (requests.RequestException, ValueError):
            return ServingStatus(False)
        return ServingStatus(True, meta.get("model_version"), bool(meta.get("ready")), meta.get("last_error"))

    def wait(self, version: str, timeout_s: float, poll_s: float) -> ServingStatus:
        """Block until the server serves ``version`` and is ready, or raise RolloutFailed after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            st = self.status()
            if st.reachable and st.version == str(version) and st.ready:
                log.info('deployment "%s" successfully rolled out (serving model version %s)', self.name, version)
                return st
            message = self._progress(st, version)
            if message != last:
                log.info(message)
                last = message
            if time.monotonic() >= deadline:
                raise RolloutFailed(f'deployment "{self.name}" did not serve model version {version} within '
                                    f"{timeout_s:.0f}s: {message}")
            time.sleep(poll_s)

    def _progress(self, st: ServingStatus, version: str) -> str:
        if not st.reachable:
            return (f"Waiting for deployment \"{self.name}\" rollout to finish: serving process not reachable at "
                    f"{self.serving_url} (start it with `make serve`)")
        detail = f"; last error: {st.error}" if st.error else ""
        return (f"Waiting for deployment \"{self.name}\" rollout to finish: serving version {st.version or 'none'}, "
                f"want {version}{detail}")


class KubernetesDeployment:
    """The serving Deployment: its pod template pins ``MODEL_NAME``/``MODEL_VERSION`` (never an alias).

    Roll forward is a strategic merge patch of the container's env, a model-version label on the pod
    template, and ``kubernetes.io/change-cause`` (what ``kubectl rollout history`` shows). Waiting
    follows ``kubectl rollout status``: done only when the controller has observed the new generation,
    every replica is updated, no old replica remains and every updated replica is available; a
    ``ProgressDeadlineExceeded`` condition fails at once.
    """

    CHANGE_CAUSE = "kubernetes.io/change-cause"
    REVISION = "deployment.kubernetes.io/revision"

    def __init__(self, name: str, namespace: str, container: str, conn_id: str, api: Any = None):
        self.name, self.namespace, self.container, self.conn_id = name, namespace, container, conn_id
        self._api = api

    @property
    def api(self) -> Any:
        if self._api is None:
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
            from kubernetes.client import AppsV1Api

            self._api = AppsV1Api(KubernetesHook(conn_id=self.conn_id).api_client)
        return self._api

    def _get(self) -> Any:
        return self.api.read_namespaced_deployment(self.name, self.namespace)

    def read(self) -> dict[str, Any] | None:
        d = self._get()
        container = next(c for c in d.spec.template.spec.containers if c.name == self.container)
        env = {e.name: e.value for e in container.env or []}
        annotations = d.metadata.annotations or {}
        return {"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                "revision": int(annotations.get(self.REVISION, 0)), "change_cause": annotations.get(self.CHANGE_CAUSE, "")}

    def apply(self, model_name: str, version: str, change_cause: str) -> tuple[dict[str, Any], bool]:
        current = self.read()
        if current and (current["model_name"], current["model_version"]) == (model_name, str(version)):
            return current, False
        body = {
            "metadata": {"annotations": {self.CHANGE_CAUSE: change_cause}},
            "spec": {"template": {
                "metadata": {"labels": {"retrain/model-version": str(version)}},
                "spec": {"containers": [{"name": self.container, "env": [
                    {"name": "MODEL_NAME", "value": model_name}, {"name": "MODEL_VERSION", "value": str(version)}]}]},
            }},
        }
        self.api.patch_namespaced_deployment(self.name, self.namespace, body,
                                             _content_type="application/strategic-merge-patch+json")
        return self.read(), True

    def rollout_status(self) -> tuple[bool, str]:
        """(done, message) in kubectl's words; raises RolloutFailed past the progress deadline."""
        d = self._get()
        st = d.status
        if (d.metadata.generation or 0) > (st.observed_generation or 0):
            return False, "Waiting for deployment spec update to be observed..."
        for cond in st.conditions or []:
            if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                raise RolloutFailed(f'deployment "{self.name}" exceeded its progress deadline')
        want, updated = d.spec.replicas or 0, st.updated_replicas or 0
        if updated < want:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{updated} out of {want} new replicas have been updated...")
        if (st.replicas or 0) > updated:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{st.replicas - updated} old replicas are pending termination...")
        if (st.available_replicas or 0) < updated:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{st.available_replicas or 0} of {updated} updated replicas are available...")
        return True, f'deployment "{self.name}" successfully rolled out'

    def wait(self, version: str, timeout_s: float, poll_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            done, message = self.rollout_status()
            if message != last:
                log.info(message)
                last = message
            if done:
                return
            if time.monotonic() >= deadline:
                raise RolloutFailed(f'deployment "{self.name}" did not roll out model version {version} '
                                    f"within {timeout_s:.0f}s: {message}")
            time.sleep(poll_s)


def deployment_for(settings: Settings) -> LocalDeployment | KubernetesDeployment:
    if settings.runner == "kubernetes":
        return KubernetesDeployment(settings.serving_deployment, settings.pods.namespace, "server",
                                    settings.pods.conn_id)
    return LocalDeployment(settings.serving_state_uri, settings.serving_url)


def change_cause(model_name: str, version: str, run_id: str, metric: str, value: float | None) -> str:
    score = f"{metric}={value:.4f}" if value is not None else f"{metric}=n/a"
    return f"model {model_name} version {version} from Airflow run {run_id}: {score}"


def deploy(settings: Settings, model_name: str, version: str, cause: str,
           deployment: LocalDeployment | KubernetesDeployment | None = None) -> dict[str, Any]:
    """Roll serving forward to ``version`` and wait; on failure restore the previous revision and raise."""
    deployment = deployment or deployment_for(settings)
    previous = deployment.read()
    record, changed = deployment.apply(model_name, version, cause)
    if changed:
        log.info('deployment "%s" revision %d: %s', deployment.name, record["revision"], cause)
    else:
        log.info('deployment "%s" already pins model version %s (revision %d); nothing to change',
                 deployment.name, version, record["revision"])
    try:
        deployment.wait(version, settings.deploy_timeout_s, settings.deploy_poll_s)
    except RolloutFailed as exc:
        if changed:
            _restore(deployment, previous)
            if previous is not None:
                try:
                    deployment.wait(previous["model_version"], settings.deploy_timeout_s, settings.deploy_poll_s)
                except RolloutFailed as again:
                    raise RolloutFailed(f"{exc}. The rollback did not complete either: {again}") from None
        raise RolloutFailed(f"{exc}. Rolled back to "
                            f"{'model version ' + previous['model_version'] if previous else 'no model'}.") from None
    return {"deployment": deployment.name, "model_version": str(version), "revision": record["revision"],
            "changed": changed, "change_cause": record["change_cause"]}


def _restore(deployment: LocalDeployment | KubernetesDeployment, previous: dict[str, Any] | None) -> None:
    if previous is None and isinstance(deployment, LocalDeployment):
        deployment.path.unlink(missing_ok=True)
        log.warning('deployment "%s": removed the record; nothing was serving before', deployment.name)
        return
    record, _ = deployment.apply(previous["model_name"], previous["model_version"],
                                 f"rollback to revision {previous['revision']}: {previous['change_cause']}")
    log.warning('deployment "%s": rolled back to model version %s (revision %d)',
                deployment.name, previous["model_version"], record["revision"])


def roll_out_champion(settings: Settings, promotion: dict[str, Any], airflow_run_id: str | None,
                      client: MlflowClient | None = None) -> dict[str, Any]:
    """Serve the champion chosen by ``promote``. On failure: serving and ``@champion`` go back, one alert, raise."""
    name, version = promotion["model_name"], promotion["champion"]
    if version is None:
        raise RolloutFailed(f"{name} has no @{CHAMPION}: nothing to deploy")
    score = promotion["recall_at_1"] if promotion["promoted"] else promotion.get("champion_recall_at_1")
    cause = change_cause(name, version, airflow_run_id or "manual", HEADLINE_METRIC, score)
    try:
        return deploy(settings, name, version, cause)
    except RolloutFailed as exc:
        restored = None
        if promotion["promoted"]:
            client = client or MlflowClient()
            restored = promotion["previous_champion"]
            if restored:
                client.set_registered_model_alias(name, CHAMPION, restored)
            else:
                client.delete_registered_model_alias(name, CHAMPION)
            log.warning("@%s of %s moved back to %s", CHAMPION, name, restored or "nothing")
        send_alert(Alert(kind="rollback", title=f"rollout of {name} version {version} failed", text=str(exc),
                         fields={"model_name": name, "version": version, "restored_champion": restored,
                                 "airflow_run_id": airflow_run_id}), settings)
        exc.alerted = True
        raise
