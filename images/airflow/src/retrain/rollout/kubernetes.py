"""What serves on Kubernetes: the serving Deployment (track ``stable``), its preview Deployment and the serving
Service, driven through the API as the deploy step's Role allows (get and patch of those three, nothing else).

- **preview**: the preview Deployment pins the new version (``MODEL_NAME``/``MODEL_VERSION``, never an alias),
  does not mirror (``SERVING_MIRROR_RATE=0``) and runs ``RETRAIN_PREVIEW_REPLICAS`` pods; the stable pods mirror
  a sample of their requests to it through the preview Service;
- **switch**: before it, the preview gets as many replicas as the HPA gave the stable Deployment; the switch is
  one patch of the serving Service, its selector's ``retrain/track`` from ``stable`` to ``preview``, with the
  deploy step's mark; every new request goes to the new version, and the stable pods stay warm;
- **switch back**: the same patch the other way, while the old version is warm;
- **settle**, after the warm window: the stable Deployment is rolled to the new version while the Service still
  points at the preview (no client sees the rolling update), the Service goes back to ``stable``, the preview
  to zero replicas. So every version that served is a revision of the serving Deployment, and
  ``kubectl rollout history deployment/embedder-serving`` lists each with its change-cause: the model version,
  the Airflow run and its headline metric.

An operator's ``kubectl rollout undo deployment/embedder-serving`` changes the stable template without the
mark on the Service: the next run sees what serves differ from the mark (:mod:`retrain.rollout.ownership`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from retrain.rollout.targets import Mark, RolloutFailed, ServingState, _answered_by
from retrain.settings import Settings
from retrain.waiting import poll, retry
from retrain_contract.serving import (
    MIRROR_RATE_ENV,
    MODEL_NAME_ENV,
    MODEL_VERSION_ENV,
    PREVIEW,
    STABLE,
    TRACK_LABEL,
    Pin,
)

CHANGE_CAUSE = "kubernetes.io/change-cause"
REVISION = "deployment.kubernetes.io/revision"
MARK = "retrain.embedder/mark"  # on the serving Service: what the deploy step last did (JSON)
SERVING = "retrain.embedder/serving"  # on the serving Service: the change-cause of what serves now
WARM_UNTIL = "retrain.embedder/warm-until"  # on the serving Service, after a switch: when the old version goes
VERSION_LABEL = "retrain/model-version"
SMP = "application/strategic-merge-patch+json"
TRANSIENT = {429, 500, 502, 503, 504}  # API errors that a retry may not meet again
API_ATTEMPTS = 3


def rollout_status(d: dict[str, Any], name: str) -> tuple[bool, str]:
    """(done, progress) of a Deployment in ``kubectl rollout status``'s words; RolloutFailed past its deadline."""
    st = d.get("status") or {}
    if (d["metadata"].get("generation") or 0) > (st.get("observedGeneration") or 0):
        return False, "Waiting for deployment spec update to be observed..."
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            raise RolloutFailed(f'deployment "{name}" exceeded its progress deadline')
    want, updated = d["spec"].get("replicas", 1), st.get("updatedReplicas") or 0
    if updated < want:
        return False, (f'Waiting for deployment "{name}" rollout to finish: {updated} out of {want} new replicas have been '
                       "updated...")
    if (st.get("replicas") or 0) > updated:
        return False, (f'Waiting for deployment "{name}" rollout to finish: {st["replicas"] - updated} old replicas are '
                       "pending termination...")
    if (st.get("availableReplicas") or 0) < updated:
        return False, (f'Waiting for deployment "{name}" rollout to finish: {st.get("availableReplicas") or 0} of '
                       f"{updated} updated replicas are available...")
    return True, f'deployment "{name}" successfully rolled out'


class KubernetesServing:
    def __init__(self, name: str, preview: str, namespace: str, container: str, conn_id: str, serving_url: str,
                 preview_url: str, preview_replicas: int, timeout_s: float, poll_s: float, apps: Any = None,
                 core: Any = None):
        self.name, self.preview, self.namespace, self.container, self.conn_id = name, preview, namespace, container, conn_id
        self.serving_url, self.preview_url = serving_url, preview_url
        self.preview_replicas, self.timeout_s, self.poll_s = preview_replicas, timeout_s, poll_s
        self._apps, self._core = apps, core

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesServing:
        return cls(settings.serving_deployment, settings.rollout.preview_deployment, settings.pods.namespace, "server",
                   settings.pods.conn_id, settings.serving_url, settings.rollout.preview_url,
                   settings.rollout.preview_replicas, settings.deploy_timeout_s, settings.deploy_poll_s)

    def _clients(self) -> tuple[Any, Any]:
        if self._apps is None or self._core is None:
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
            from kubernetes.client import AppsV1Api, CoreV1Api

            api_client = KubernetesHook(conn_id=self.conn_id).api_client
            self._apps, self._core = AppsV1Api(api_client), CoreV1Api(api_client)
        return self._apps, self._core

    # -- reading and patching, as plain JSON; a transient API error is retried (every patch is idempotent) -----
    def _api(self, what: str, call: Callable[[], Any]) -> Any:
        return retry(call, attempts=API_ATTEMPTS, what=what, min_wait_s=0.5, max_wait_s=4,
                     when=lambda exc: getattr(exc, "status", None) in TRANSIENT)

    def _deployment(self, name: str) -> dict[str, Any]:
        apps, _ = self._clients()
        return json.loads(self._api(f"get deployment {name}", lambda: apps.read_namespaced_deployment(
            name, self.namespace, _preload_content=False)).data)

    def _service(self) -> dict[str, Any]:
        _, core = self._clients()
        return json.loads(self._api(f"get service {self.name}", lambda: core.read_namespaced_service(
            self.name, self.namespace, _preload_content=False)).data)

    def _patch_deployment(self, name: str, body: dict[str, Any]) -> None:
        apps, _ = self._clients()
        self._api(f"patch deployment {name}", lambda: apps.patch_namespaced_deployment(
            name, self.namespace, body, _content_type=SMP))

    def _patch_service(self, body: dict[str, Any]) -> None:
        _, core = self._clients()
        self._api(f"patch service {self.name}", lambda: core.patch_namespaced_service(
            self.name, self.namespace, body, _content_type=SMP))

    def _pin(self, d: dict[str, Any]) -> Pin | None:
        container = next(c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == self.container)
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        return Pin(env[MODEL_NAME_ENV], env[MODEL_VERSION_ENV]) if env.get(MODEL_NAME_ENV) and env.get(MODEL_VERSION_ENV) \
            else None

    def _pin_patch(self, pin: Pin, cause: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        env = [{"name": MODEL_NAME_ENV, "value": pin.model_name}, {"name": MODEL_VERSION_ENV, "value": pin.model_version},
               *({"name": k, "value": v} for k, v in (extra_env or {}).items())]
        return {"metadata": {"annotations": {CHANGE_CAUSE: cause}}, "spec": {"template": {
            "metadata": {"labels": {VERSION_LABEL: pin.model_version}},
            "spec": {"containers": [{"name": self.container, "env": env}]}}}}

    # -- the protocol -------------------------------------------------------------------------------------
    def read(self) -> ServingState:
        svc, stable, preview = self._service(), self._deployment(self.name), self._deployment(self.preview)
        annotations = svc["metadata"].get("annotations") or {}
        track = (svc["spec"].get("selector") or {}).get(TRACK_LABEL, STABLE)
        mark = Mark.from_json(json.loads(annotations[MARK])) if annotations.get(MARK) else None
        stable_pin, preview_pin = self._pin(stable), self._pin(preview)
        revision = int((stable["metadata"].get("annotations") or {}).get(REVISION, "0"))
        cause = annotations.get(SERVING) or (stable["metadata"].get("annotations") or {}).get(CHANGE_CAUSE, "")
        if track == PREVIEW:
            return ServingState(preview_pin, revision, cause, None, stable_pin, float(annotations.get(WARM_UNTIL, 0)),
                                mark)
        previewing = preview_pin if preview["spec"].get("replicas", 1) else None
        return ServingState(stable_pin, revision, cause, previewing, None, 0.0, mark)

    def start_preview(self, pin: Pin, cause: str, run_id: str) -> None:
        current = self._deployment(self.preview)
        if self._pin(current) == pin and current["spec"].get("replicas", 1) >= self.preview_replicas:
            return  # a retry: the preview is up (perhaps already scaled for the switch); leave it as it is
        body = self._pin_patch(pin, cause, {MIRROR_RATE_ENV: "0"})
        body["spec"]["replicas"] = self.preview_replicas
        self._patch_deployment(self.preview, body)

    def preview_status(self, pin: Pin) -> tuple[bool, str]:
        d = self._deployment(self.preview)
        if self._pin(d) != pin:
            return False, f'deployment "{self.preview}" does not pin {pin}'
        done, message = rollout_status(d, self.preview)
        return _answered_by(self.preview_url, pin, "the preview") if done else (False, message)

    def scale_preview(self) -> None:
        replicas = max(self._deployment(self.name)["spec"].get("replicas", 1), self.preview_replicas)
        self._patch_deployment(self.preview, {"spec": {"replicas": replicas}})

    def switch(self, pin: Pin, cause: str, mark: Mark, warm_s: float) -> None:
        if self._pin(self._deployment(self.preview)) != pin:
            raise RolloutFailed(f'cannot switch to {pin}: deployment "{self.preview}" does not pin it')
        self._patch_service({"metadata": {"annotations": {MARK: json.dumps(mark.to_json()), SERVING: cause,
                                                          WARM_UNTIL: f"{time.time() + warm_s:.3f}"}},
                             "spec": {"selector": {TRACK_LABEL: PREVIEW}}})

    def switch_back(self, pin: Pin, cause: str, mark: Mark) -> None:
        track = next((t for t, d in ((STABLE, self.name), (PREVIEW, self.preview))
                      if self._pin(self._deployment(d)) == pin), None)
        if track is None:
            raise RolloutFailed(f"cannot switch back to {pin}: neither {self.name} nor {self.preview} runs it any more")
        self._patch_service({"metadata": {"annotations": {MARK: json.dumps(mark.to_json()), SERVING: cause,
                                                          WARM_UNTIL: None}},
                             "spec": {"selector": {TRACK_LABEL: track}}})

    def active_status(self, pin: Pin) -> tuple[bool, str]:
        svc = self._service()
        track = (svc["spec"].get("selector") or {}).get(TRACK_LABEL, STABLE)
        name = self.preview if track == PREVIEW else self.name
        d = self._deployment(name)
        if self._pin(d) != pin:
            return False, f'the serving Service sends clients to deployment "{name}", which pins {self._pin(d)}, not {pin}'
        done, message = rollout_status(d, name)
        return _answered_by(self.serving_url, pin, f'service "{self.name}"') if done else (False, message)

    def drop_preview(self) -> None:
        svc = self._service()
        if (svc["spec"].get("selector") or {}).get(TRACK_LABEL) != PREVIEW:
            self._patch_deployment(self.preview, {"spec": {"replicas": 0}})

    def settle(self, pin: Pin, cause: str) -> None:
        svc = self._service()
        if (svc["spec"].get("selector") or {}).get(TRACK_LABEL) == PREVIEW:
            if self._pin(self._deployment(self.preview)) != pin:
                raise RolloutFailed(f'cannot settle {pin}: the serving Service sends clients to "{self.preview}", '
                                    "which pins another version")
            self._patch_deployment(self.name, self._pin_patch(pin, cause))  # out of the clients' sight
            poll(lambda: rollout_status(self._deployment(self.name), self.name)[0], timeout_s=self.timeout_s,
                 interval_s=self.poll_s, what=f'deployment "{self.name}" rolled to {pin} behind the preview')
            self._patch_service({"metadata": {"annotations": {SERVING: cause, WARM_UNTIL: None}},
                                 "spec": {"selector": {TRACK_LABEL: STABLE}}})
        elif (svc["spec"].get("selector") or {}).get(TRACK_LABEL) != STABLE and self._pin(self._deployment(self.name)) == pin:
            self._patch_service({"spec": {"selector": {TRACK_LABEL: STABLE}}})  # a fresh install's first settle
        self._patch_deployment(self.preview, {"spec": {"replicas": 0}})

    def set_mark(self, mark: Mark) -> None:
        self._patch_service({"metadata": {"annotations": {MARK: json.dumps(mark.to_json())}}})
