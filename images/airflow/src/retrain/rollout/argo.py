"""What serves where Argo Rollouts runs (``RETRAIN_SERVING_ROLLOUT=argo``, ``k8s/components/argo-rollouts``): the
serving Rollout (blue-green, its template from the serving Deployment through ``workloadRef``), driven as
``kubectl argo rollouts`` drives one, within the deploy step's Role.

- **preview**: pin the version in the serving Deployment's template (so ``kubectl rollout history
  deployment/embedder-serving`` still names it); Argo starts the preview ReplicaSet behind the preview Service
  and pauses (``BlueGreenPause``) once it is available;
- **switch**: the mark on the Rollout, then promote (the status subresource's ``pauseConditions`` cleared, as
  ``kubectl argo rollouts promote`` does); Argo scales the preview to the active size and switches the serving
  Service at once; the old ReplicaSet stays up for ``scaleDownDelaySeconds``, the warm window;
- **switch back** and **drop the preview**: the template goes back to the version that serves (or served),
  whose ReplicaSet Argo still runs: an immediate switch, or an abandoned preview;
- **settle**: nothing: Argo scales the old ReplicaSet down itself.

What serves is the stable ReplicaSet's template (``status.stableRS``), read from the ReplicaSet.
"""

from __future__ import annotations

import json
from typing import Any

from retrain.rollout.kubernetes import MARK, KubernetesServing
from retrain.rollout.targets import Mark, RolloutFailed, ServingState, _answered_by
from retrain.settings import Settings
from retrain_contract.serving import Pin

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "rollouts"
MERGE = "application/merge-patch+json"


class ArgoServing(KubernetesServing):
    """The serving Rollout; the pin is written in the Deployment it takes its template from."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ArgoServing:  # type: ignore[override]
        return super().from_settings(settings)  # type: ignore[return-value]

    def _custom(self) -> Any:
        from kubernetes.client import CustomObjectsApi

        apps, _ = self._clients()
        return CustomObjectsApi(apps.api_client)

    def _rollout(self) -> dict[str, Any]:
        return self._api(f"get rollout {self.name}", lambda: self._custom().get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name))

    def _patch_rollout(self, body: dict[str, Any], status: bool = False) -> None:
        custom = self._custom()
        call = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
        self._api(f"patch rollout {self.name}{'/status' if status else ''}", lambda: call(
            GROUP, VERSION, self.namespace, PLURAL, self.name, body, _content_type=MERGE))

    def _replicaset_pin(self, key: str | None) -> Pin | None:
        if not key:
            return None
        apps, _ = self._clients()
        rs = json.loads(self._api(f"get replicaset {self.name}-{key}", lambda: apps.read_namespaced_replica_set(
            f"{self.name}-{key}", self.namespace, _preload_content=False)).data)
        return self._pin(rs)

    def read(self) -> ServingState:
        ro = self._rollout()
        status = ro.get("status") or {}
        annotations = ro["metadata"].get("annotations") or {}
        mark = Mark.from_json(json.loads(annotations[MARK])) if annotations.get(MARK) else None
        stable_key, current_key = status.get("stableRS"), status.get("currentPodHash")
        active = self._replicaset_pin(stable_key)
        template = self._deployment(self.name)
        previewing = self._pin(template) if current_key and current_key != stable_key and not status.get("abort") \
            else None
        revision = int((template["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", "0"))
        cause = (template["metadata"].get("annotations") or {}).get("kubernetes.io/change-cause", "") \
            if previewing is None else (mark.reason if mark else "")
        return ServingState(active, revision, cause, previewing, None, 0.0, mark)

    def start_preview(self, pin: Pin, cause: str, run_id: str) -> None:
        if self._pin(self._deployment(self.name)) != pin:
            self._patch_deployment(self.name, self._pin_patch(pin, cause))

    def preview_status(self, pin: Pin) -> tuple[bool, str]:
        ro = self._rollout()
        status = ro.get("status") or {}
        if status.get("abort"):
            raise RolloutFailed(f'rollout "{self.name}" was aborted: {status.get("message", "")}')
        if self._pin(self._deployment(self.name)) != pin:
            return False, f'the template of rollout "{self.name}" does not pin {pin}'
        paused = any(c.get("reason") == "BlueGreenPause" for c in status.get("pauseConditions") or [])
        if not paused:
            return False, f'rollout "{self.name}" {status.get("phase", "Progressing")}: {status.get("message", "")}'
        return _answered_by(self.preview_url, pin, "the preview")

    def scale_preview(self) -> None:
        """Argo scales the preview to the active size itself, once promoted."""

    def switch(self, pin: Pin, cause: str, mark: Mark, warm_s: float) -> None:
        self.set_mark(mark)
        self._patch_rollout({"status": {"pauseConditions": None}}, status=True)  # kubectl argo rollouts promote

    def switch_back(self, pin: Pin, cause: str, mark: Mark) -> None:
        self.set_mark(mark)
        self._patch_deployment(self.name, self._pin_patch(pin, cause))  # its ReplicaSet is still up: immediate

    def active_status(self, pin: Pin) -> tuple[bool, str]:
        ro = self._rollout()
        status = ro.get("status") or {}
        if self._replicaset_pin(status.get("stableRS")) != pin:
            return False, f'rollout "{self.name}" {status.get("phase", "")}: not yet switched to {pin}'
        if status.get("phase") != "Healthy":
            return False, f'rollout "{self.name}" {status.get("phase", "")}: {status.get("message", "")}'
        return _answered_by(self.serving_url, pin, f'service "{self.name}"')

    def drop_preview(self) -> None:
        ro = self._rollout()
        stable = self._replicaset_pin((ro.get("status") or {}).get("stableRS"))
        if stable is not None and self._pin(self._deployment(self.name)) != stable:
            self._patch_deployment(self.name, self._pin_patch(stable, "the preview was rejected: back to what serves"))

    def settle(self, pin: Pin, cause: str) -> None:
        """Argo scales the old ReplicaSet down after scaleDownDelaySeconds."""

    def set_mark(self, mark: Mark) -> None:
        self._patch_rollout({"metadata": {"annotations": {MARK: json.dumps(mark.to_json())}}})
