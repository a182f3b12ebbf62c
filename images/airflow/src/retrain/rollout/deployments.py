"""What serves, as a Deployment: local mode's serving record and the Kubernetes Deployment, behind one protocol.

Both pin a model **version** (never an alias), so rolling back brings the old model back; each change
is a new revision with a change-cause, and the revision a rollback restores is recorded with the
change. Waiting is done the way ``kubectl rollout status`` does it, in one loop for both
(:func:`wait_for_rollout`); each Deployment says only whether it is done and how far it got.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import requests
from airflow.sdk.exceptions import AirflowFailException

from retrain.settings import Settings
from retrain.waiting import poll

log = logging.getLogger(__name__)
REVISION_HISTORY_LIMIT = 10
HISTORY_FIELDS = ("revision", "model_name", "model_version", "change_cause", "updated_at", "applied_by_run")


class RolloutFailed(AirflowFailException):
    """The new version did not serve. A rollback is a verdict: the task fails without retries.

    ``rolled_back_to`` is the revision that serves again (None when nothing was rolled back),
    ``failed_revision`` the one that did not serve; ``alerted`` is set once the rollback's own alert
    went out, so the task's failure callback sends no second one.
    """

    def __init__(self, message: str, *, rolled_back_to: dict[str, Any] | None = None,
                 failed_revision: int | None = None):
        super().__init__(message)
        self.rolled_back_to = rolled_back_to
        self.failed_revision = failed_revision
        self.alerted = False


class Deployment(Protocol):
    """The serving Deployment, wherever it runs."""

    name: str

    def read(self) -> dict[str, Any] | None:
        """The current revision: ``model_name``, ``model_version``, ``revision``, ``change_cause``, ``applied_by_run``."""

    def apply(self, model_name: str, version: str, change_cause: str, run_id: str = "") -> tuple[dict[str, Any], bool]:
        """Pin ``version``; returns (revision, changed). Re-applying the pinned version changes nothing."""

    def rollback_target(self, run_id: str) -> dict[str, Any] | None:
        """The revision before the current one, if Airflow run ``run_id`` made the current one."""

    def rollout_status(self, version: str) -> tuple[bool, str]:
        """(done, progress in kubectl's words); raises RolloutFailed when it can no longer succeed."""


def wait_for_rollout(deployment: Deployment, version: str, timeout_s: float, poll_s: float) -> None:
    """Block until ``deployment`` serves ``version`` (as ``kubectl rollout status``); RolloutFailed after ``timeout_s``."""
    last: list[str] = [""]

    def done() -> bool:
        finished, message = deployment.rollout_status(version)
        if message != last[0]:
            log.info(message)
            last[0] = message
        return finished

    poll(done, timeout_s=timeout_s, interval_s=poll_s, on_timeout=lambda: RolloutFailed(
        f'deployment "{deployment.name}" did not serve model version {version} within {timeout_s:.0f}s: {last[0]}'))


def change_cause(model_name: str, version: str, run_id: str, metric: str, value: float | None) -> str:
    score = f"{metric}={value:.4f}" if value is not None else f"{metric}=n/a"
    return f"model {model_name} version {version} from Airflow run {run_id}: {score}"


@dataclass(frozen=True)
class ServingStatus:
    reachable: bool
    version: str | None = None
    ready: bool = False
    error: str | None = None


class LocalDeployment:
    """Local mode's Deployment: a desired-state record (JSON) that the serving process follows."""

    name = "embedder-serving"

    def __init__(self, state_uri: str, serving_url: str):
        parsed = urlparse(state_uri)
        if parsed.scheme not in ("", "file"):
            raise ValueError(f"local serving state must be a file:// URI, got {state_uri!r}")
        self.path = Path(parsed.path if parsed.scheme else state_uri)
        self.serving_url = serving_url

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def apply(self, model_name: str, version: str, change_cause: str, run_id: str = "") -> tuple[dict[str, Any], bool]:
        current = self.read()
        if current and current["model_name"] == model_name and current["model_version"] == str(version):
            return current, False
        history = (current or {}).get("history", [])
        if current:
            history = [*history, {k: current.get(k) for k in HISTORY_FIELDS}]
        record = {
            "model_name": model_name,
            "model_version": str(version),
            "revision": (current or {}).get("revision", 0) + 1,
            "change_cause": change_cause,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "applied_by_run": run_id,
            "history": history[-REVISION_HISTORY_LIMIT:],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.path)
        return record, True

    def rollback_target(self, run_id: str) -> dict[str, Any] | None:
        current = self.read()
        if not current or not run_id or current.get("applied_by_run") != run_id or not current.get("history"):
            return None
        return current["history"][-1]

    def status(self) -> ServingStatus:
        try:
            meta = requests.get(f"{self.serving_url}/metadata", timeout=5).json()
        except (requests.RequestException, ValueError):
            return ServingStatus(False)
        return ServingStatus(True, meta.get("model_version"), bool(meta.get("ready")), meta.get("last_error"))

    def rollout_status(self, version: str) -> tuple[bool, str]:
        st = self.status()
        if st.reachable and st.version == str(version) and st.ready:
            return True, f'deployment "{self.name}" successfully rolled out (serving model version {version})'
        if not st.reachable:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: serving process not reachable '
                           f"at {self.serving_url} (start it with `make up`)")
        detail = f"; last error: {st.error}" if st.error else ""
        return False, (f'Waiting for deployment "{self.name}" rollout to finish: serving version '
                       f"{st.version or 'none'}, want {version}{detail}")


class KubernetesDeployment:
    """The serving Deployment: its pod template pins ``MODEL_NAME``/``MODEL_VERSION`` (never an alias).

    Roll forward is a strategic merge patch of the container's env, a model-version label on the pod
    template, and ``kubernetes.io/change-cause`` (what ``kubectl rollout history`` shows). The rollout
    is done only when the controller has observed the new generation, every replica is updated, no
    old replica remains and every updated replica is available; ``ProgressDeadlineExceeded`` fails it.
    """

    CHANGE_CAUSE = "kubernetes.io/change-cause"
    REVISION = "deployment.kubernetes.io/revision"
    APPLIED_BY = "retrain.embedder/applied-by-run"  # the Airflow run that made the current revision
    ROLLBACK_TO = "retrain.embedder/rollback-to"  # the revision before it, as JSON: what a rollback restores

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
                "revision": int(annotations.get(self.REVISION, 0)), "change_cause": annotations.get(self.CHANGE_CAUSE, ""),
                "applied_by_run": annotations.get(self.APPLIED_BY, ""),
                "rollback_to": json.loads(annotations[self.ROLLBACK_TO]) if annotations.get(self.ROLLBACK_TO) else None}

    def apply(self, model_name: str, version: str, change_cause: str, run_id: str = "") -> tuple[dict[str, Any], bool]:
        """Patch the pod template to ``version``; the same patch records what a rollback would restore."""
        current = self.read()
        if current and (current["model_name"], current["model_version"]) == (model_name, str(version)):
            return current, False
        previous = {k: current[k] for k in ("model_name", "model_version", "revision", "change_cause")}
        body = {
            "metadata": {"annotations": {self.CHANGE_CAUSE: change_cause, self.APPLIED_BY: run_id,
                                         self.ROLLBACK_TO: json.dumps(previous, sort_keys=True)}},
            "spec": {"template": {
                "metadata": {"labels": {"retrain/model-version": str(version)}},
                "spec": {"containers": [{"name": self.container, "env": [
                    {"name": "MODEL_NAME", "value": model_name}, {"name": "MODEL_VERSION", "value": str(version)}]}]},
            }},
        }
        self.api.patch_namespaced_deployment(self.name, self.namespace, body,
                                             _content_type="application/strategic-merge-patch+json")
        return self.read(), True

    def rollback_target(self, run_id: str) -> dict[str, Any] | None:
        current = self.read()
        if not current or not run_id or current["applied_by_run"] != run_id:
            return None
        return current["rollback_to"]

    def rollout_status(self, version: str = "") -> tuple[bool, str]:
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


def deployment_for(settings: Settings) -> Deployment:
    if settings.runner == "kubernetes":
        return KubernetesDeployment(settings.serving_deployment, settings.pods.namespace, "server",
                                    settings.pods.conn_id)
    return LocalDeployment(settings.serving_state_uri, settings.serving_url)
