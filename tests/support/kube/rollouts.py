"""A fake Argo Rollouts controller (``argoproj.io/v1alpha1`` Rollout, blue-green), written from its documented
behaviour (v1.8), as far as the project's Rollout uses it; a cluster has it only once a test installs it.

- **Template**: from ``spec.workloadRef`` (a Deployment, scaled to zero once the Rollout is healthy with
  ``scaleDown: onsuccess``) or ``spec.template``. Each template is a ReplicaSet ``<rollout>-<hash>`` labelled
  ``rollouts-pod-template-hash``; the first one is stable at once.
- **A new template** gets ``previewReplicaCount`` pods; the preview Service's selector points at them. Once they
  are available, the Rollout pauses (``status.pauseConditions``: ``BlueGreenPause``, phase ``Paused``) until it is
  promoted (the pause conditions cleared, as ``kubectl argo rollouts promote`` does through the status
  subresource). Then the new ReplicaSet is scaled to the Rollout's replicas, and once they are available the
  active Service's selector points at them at once (``status.stableRS``); the old ReplicaSet keeps its pods until
  ``scaleDownDelaySeconds`` have passed (``argo-rollouts.argoproj.io/scale-down-deadline``).
- **Back to a template whose ReplicaSet still has all its pods** (an undo within the scale-down delay): the
  switch is immediate, no pause.
- **Abort** (``status.abort``): the new ReplicaSet goes to zero, the Rollout is ``Degraded`` until its template
  is the stable one again.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

from .store import now

if TYPE_CHECKING:
    from .workloads import Workloads

HASH = "rollouts-pod-template-hash"
SCALE_DOWN = "argo-rollouts.argoproj.io/scale-down-deadline"
REVISION = "rollout.argoproj.io/revision"


class RolloutController:
    def __init__(self, workloads: Workloads):
        self.workloads = workloads
        self.store = workloads.store
        self._paused: set[tuple[str, str, str]] = set()  # (namespace, rollout, hash) paused for promotion once

    def _template(self, ns: str, ro: dict) -> dict | None:
        ref = ro["spec"].get("workloadRef")
        if ref:
            d = self.store.objects.get(("deployments", ns, ref["name"]))
            return copy.deepcopy(d["spec"]["template"]) if d else None
        return copy.deepcopy(ro["spec"].get("template"))

    def _replicaset(self, ns: str, ro: dict, key: str, template: dict, owned: list[dict]) -> dict:
        found = next((rs for rs in owned if rs["metadata"]["labels"].get(HASH) == key), None)
        if found is not None:
            return found
        top = max((int(rs["metadata"]["annotations"].get(REVISION, "0")) for rs in owned), default=0)
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH] = key
        name = f"{ro['metadata']['name']}-{key}"
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
            "name": name, "namespace": ns, "uid": f"{ro['metadata']['uid']}-{key}", "creationTimestamp": now(),
            "generation": 1, "labels": dict(template["metadata"]["labels"]), "annotations": {REVISION: str(top + 1)},
            "ownerReferences": [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": ro["metadata"]["name"],
                                 "uid": ro["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {**ro["spec"]["selector"]["matchLabels"], HASH: key}},
                     "template": template},
            "status": {"replicas": 0, "readyReplicas": 0, "availableReplicas": 0}}
        self.store.objects[("replicasets", ns, name)] = self.store.bump(rs)
        owned.append(rs)
        return rs

    def _point(self, ns: str, service: str, key: str) -> None:
        svc = self.store.objects.get(("services", ns, service))
        if svc is not None and svc["spec"].get("selector", {}).get(HASH) != key:
            svc["spec"].setdefault("selector", {})[HASH] = key
            self.store.bump(svc)

    def _ready(self, ns: str, rs: dict) -> int:
        from .workloads import pod_ready

        return sum(1 for p in self.workloads._pods_of(ns, rs) if pod_ready(p))

    def reconcile(self, ns: str, ro: dict) -> None:
        from .workloads import owned_by, template_hash

        name = ro["metadata"]["name"]
        template = self._template(ns, ro)
        if template is None:
            return
        key = template_hash({"rollout": template})  # Argo's own hash: never a Deployment's ReplicaSet's name
        spec, status = ro["spec"], ro.setdefault("status", {})
        before = copy.deepcopy(status)
        bg = spec["strategy"]["blueGreen"]
        want = spec.get("replicas", 1)
        owned = [rs for rs in self.store.items("replicasets", ns) if owned_by(rs, ro)]
        current = self._replicaset(ns, ro, key, template, owned)
        stable_key = status.get("stableRS") or key
        stable = next(rs for rs in owned if rs["metadata"]["labels"][HASH] == stable_key)
        status.update(currentPodHash=key, stableRS=stable_key)
        if key == stable_key:
            status.pop("abort", None)
            status.pop("pauseConditions", None)
            status["controllerPause"] = False
            self.workloads._scale(current, want)
            for service in (bg["activeService"], bg.get("previewService")):
                if service:
                    self._point(ns, service, key)
            healthy = self._ready(ns, current) >= want
            status["phase"], status["message"] = ("Healthy", "") if healthy else (
                "Progressing", "more replicas need to be available")
        elif status.get("abort"):
            self.workloads._scale(current, 0)
            status["pauseConditions"] = None
            status["phase"], status["message"] = "Degraded", "RolloutAborted: Rollout aborted update to revision"
        else:
            ready = self._ready(ns, current)
            fast = current["spec"].get("replicas", 0) >= want and ready >= want  # still up: an undo while warm
            mark = (ns, name, key)
            preview = bg.get("previewReplicaCount", want)
            auto = bg.get("autoPromotionEnabled", True)
            promoted = fast or (mark in self._paused and not status.get("pauseConditions")) or (auto and ready >= preview)
            if not promoted:
                self.workloads._scale(current, preview)
                if bg.get("previewService"):
                    self._point(ns, bg["previewService"], key)
                if ready >= preview and mark not in self._paused:
                    status["pauseConditions"] = [{"reason": "BlueGreenPause", "startTime": now()}]
                    status["controllerPause"] = True
                    self._paused.add(mark)
                status["phase"] = "Paused" if status.get("pauseConditions") else "Progressing"
                status["message"] = "BlueGreenPause" if status.get("pauseConditions") else "waiting for the preview"
            else:
                self.workloads._scale(current, want)
                if ready >= want:  # the switch: every new request to the new ReplicaSet
                    self._point(ns, bg["activeService"], key)
                    if bg.get("previewService"):
                        self._point(ns, bg["previewService"], key)
                    delay = bg.get("scaleDownDelaySeconds", 30)
                    stable["metadata"]["annotations"][SCALE_DOWN] = time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + delay))
                    self.store.bump(stable)
                    status.update(stableRS=key, phase="Healthy", message="", controllerPause=False)
                    status.pop("pauseConditions", None)
                    self._paused.discard(mark)
                else:
                    status["phase"], status["message"] = "Progressing", "scaling the preview up before the switch"
        for rs in owned:  # old ReplicaSets: kept until their scale-down deadline, then emptied
            if rs["metadata"]["labels"][HASH] in (status["stableRS"], key):
                continue
            deadline = rs["metadata"]["annotations"].get(SCALE_DOWN)
            if deadline is None or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) >= deadline:
                self.workloads._scale(rs, 0)
        pods = [p for rs in owned for p in self.workloads._pods_of(ns, rs)]
        status.update(replicas=len(pods), readyReplicas=sum(self._ready(ns, rs) for rs in owned),
                      availableReplicas=sum(self._ready(ns, rs) for rs in owned),
                      updatedReplicas=len(self.workloads._pods_of(ns, current)),
                      observedGeneration=str(ro["metadata"].get("generation", 1)),
                      blueGreen={"activeSelector": status["stableRS"], "previewSelector": key})
        if status != before:
            self.store.bump(ro)
        ref = spec.get("workloadRef")
        if ref and ref.get("scaleDown") == "onsuccess" and status["phase"] == "Healthy":
            d = self.store.objects.get(("deployments", ns, ref["name"]))
            if d is not None and d["spec"].get("replicas") != 0:
                d["spec"]["replicas"] = 0
                d["metadata"]["generation"] += 1
                self.store.bump(d)
