"""The Deployment, ReplicaSet and HorizontalPodAutoscaler controllers, as the real ones behave where it shows.

- **Revisions are ReplicaSets.** A Deployment's pod template, hashed, names its ReplicaSet
  (``<deployment>-<pod-template-hash>``); a template seen before (``kubectl rollout undo``) reuses its
  ReplicaSet. The newest gets the next ``deployment.kubernetes.io/revision`` and the Deployment's
  ``kubernetes.io/change-cause``, which is what ``kubectl rollout history`` lists; old ReplicaSets scaled
  to zero are kept up to ``revisionHistoryLimit``.
- **Rolling updates** surge new pods (``maxSurge``) and remove old ones only as new ones are ready
  (``maxUnavailable``); the status reports ``observedGeneration``, updated/ready/available replicas and the
  ``Progressing`` condition, up to ``ProgressDeadlineExceeded`` when the new pods never become ready.
- **ReplicaSets** create and delete pods to their ``replicas`` (pods owned by them, readiness from the kubelet).
- **Argo Rollouts' blue-green** Rollouts, once a test installs the CRD (:mod:`.rollouts`);
- **The HPA** owns its target's ``spec.replicas`` (a Deployment or a Rollout): it sets it to
  :attr:`Workloads.hpa_replicas` (the metrics a test decides), kept within ``minReplicas``..``maxReplicas``.

The controllers run on the emulator's loop, woken by every change to the store and every :attr:`tick`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import secrets
import string
import time
from collections.abc import Callable

from .store import Store, condition, now, selector_matches

log = logging.getLogger(__name__)
REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"
HASH = "pod-template-hash"
# What a Deployment's annotations do not pass on to its ReplicaSets (as the controller skips them).
SKIPPED = {REVISION, "deployment.kubernetes.io/revision-history", "deployment.kubernetes.io/desired-replicas",
           "deployment.kubernetes.io/max-replicas", "kubectl.kubernetes.io/last-applied-configuration"}


def template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def pod_ready(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in pod["status"].get("conditions", []))


def owned_by(obj: dict, owner: dict) -> bool:
    return any(ref.get("uid") == owner["metadata"]["uid"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


def _match_labels(selector: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items())


def _int_or_percent(value, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = int(value[:-1]) * total / 100
        return int(-(-share // 1)) if round_up else int(share)
    return int(value)


class Workloads:
    def __init__(self, store: Store, create_pod: Callable[[str, dict], dict], delete_pod: Callable[[str, str], None]):
        self.store = store
        self._create_pod, self._delete_pod = create_pod, delete_pod
        self.tick = 0.1  # seconds between passes when nothing changes
        self.hpa_replicas: int | None = None  # what the HPA's metrics ask for (None: its minimum)
        self._progress: dict[tuple[str, str], float] = {}  # deployment -> when it last made progress
        self._new_ready: dict[tuple[str, str], tuple[str, int]] = {}  # deployment -> (new ReplicaSet, ready pods)
        self.failures: list[str] = []  # what a controller pass raised (KubeEmulator.stop fails the test on it)
        from .rollouts import RolloutController

        self.rollouts = RolloutController(self)

    async def run(self) -> None:
        while not self.store.stopping:
            seen = self.store.changes.count
            try:
                self.reconcile()
            except Exception as exc:  # a controller bug: loud, and the controllers keep running (as a real one's would)
                log.exception("the emulator's controllers failed a pass")
                self.failures.append(repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.store.changes.wait_past(seen), timeout=self.tick)

    def reconcile(self) -> None:
        for (resource, ns, _), obj in list(self.store.objects.items()):
            if resource == "horizontalpodautoscalers":
                self._autoscale(ns, obj)
        for (resource, ns, _), obj in list(self.store.objects.items()):
            if resource == "rollouts":
                self.rollouts.reconcile(ns, obj)
        for (resource, ns, _), obj in list(self.store.objects.items()):
            if resource == "deployments":
                self._deployment(ns, obj)
        for (resource, ns, _), obj in list(self.store.objects.items()):
            if resource == "replicasets":
                self._replicaset(ns, obj)

    # -- the HPA ----------------------------------------------------------------------------------------
    def _autoscale(self, ns: str, hpa: dict) -> None:
        ref = hpa["spec"]["scaleTargetRef"]
        target = self.store.objects.get(("rollouts" if ref["kind"] == "Rollout" else "deployments", ns, ref["name"]))
        if target is None:
            return
        low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
        desired = max(low, min(high, self.hpa_replicas if self.hpa_replicas is not None else low))
        if target["spec"].get("replicas") != desired:
            target["spec"]["replicas"] = desired  # through the scale subresource: a spec change
            target["metadata"]["generation"] += 1
            self.store.bump(target)
        status = {"currentReplicas": target["status"].get("replicas", 0), "desiredReplicas": desired}
        if hpa.get("status") != status:
            hpa["status"] = status
            self.store.bump(hpa)

    # -- Deployments ------------------------------------------------------------------------------------
    def replicasets_of(self, ns: str, deployment: dict) -> list[dict]:
        return sorted((rs for rs in self.store.items("replicasets", ns) if owned_by(rs, deployment)),
                      key=lambda rs: int(rs["metadata"].get("annotations", {}).get(REVISION, "0")))

    def _deployment(self, ns: str, d: dict) -> None:
        spec, meta = d["spec"], d["metadata"]
        want = spec.get("replicas", 1)
        owned = self.replicasets_of(ns, d)
        template_key = template_hash(spec["template"])
        new = next((rs for rs in owned if rs["metadata"]["labels"].get(HASH) == template_key), None)
        top = max((int(rs["metadata"]["annotations"].get(REVISION, "0")) for rs in owned), default=0)
        if new is None:
            new = self._new_replicaset(ns, d, template_key, top + 1)
            owned.append(new)
            self._progress[(ns, meta["name"])] = time.monotonic()
        elif int(new["metadata"]["annotations"].get(REVISION, "0")) < top:  # an older revision again (undo)
            new["metadata"]["annotations"][REVISION] = str(top + 1)
            self._progress[(ns, meta["name"])] = time.monotonic()
            self.store.bump(new)
        inherited = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in SKIPPED}
        if any(new["metadata"]["annotations"].get(k) != v for k, v in inherited.items()):
            new["metadata"]["annotations"].update(inherited)
            self.store.bump(new)
        revision = new["metadata"]["annotations"][REVISION]
        if (meta.get("annotations") or {}).get(REVISION) != revision:
            meta.setdefault("annotations", {})[REVISION] = revision
            self.store.bump(d)
        olds = [rs for rs in owned if rs is not new]
        if not spec.get("paused"):
            self._roll(ns, d, new, olds, want)
        self._status(ns, d, new, owned, want)
        limit = spec.get("revisionHistoryLimit", 10)
        idle = [rs for rs in olds if rs["spec"].get("replicas", 0) == 0 and not self._pods_of(ns, rs)]
        for rs in idle[: max(0, len(idle) - limit)]:
            self.store.objects.pop(("replicasets", ns, rs["metadata"]["name"]), None)
            self.store.changes.advance()

    def _new_replicaset(self, ns: str, d: dict, key: str, revision: int) -> dict:
        template = copy.deepcopy(d["spec"]["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH] = key
        name = f"{d['metadata']['name']}-{key}"
        annotations = {k: v for k, v in (d["metadata"].get("annotations") or {}).items() if k not in SKIPPED}
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
            "name": name, "namespace": ns, "uid": secrets.token_hex(16), "creationTimestamp": now(), "generation": 1,
            "labels": dict(template["metadata"]["labels"]),
            "annotations": {**annotations, REVISION: str(revision)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": d["metadata"]["name"],
                                 "uid": d["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {**d["spec"]["selector"]["matchLabels"], HASH: key}},
                     "template": template},
            "status": {"replicas": 0, "readyReplicas": 0, "availableReplicas": 0, "observedGeneration": 1}}
        self.store.objects[("replicasets", ns, name)] = self.store.bump(rs)
        return rs

    def _roll(self, ns: str, d: dict, new: dict, olds: list[dict], want: int) -> None:
        rolling = (d["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        surge = _int_or_percent(rolling.get("maxSurge", "25%"), want, round_up=True)
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), want, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        total = new["spec"].get("replicas", 0) + sum(rs["spec"].get("replicas", 0) for rs in olds)
        if new["spec"].get("replicas", 0) > want:
            self._scale(new, want)
        elif new["spec"].get("replicas", 0) < want:
            room = want + surge - total
            if room > 0 or not olds:
                self._scale(new, min(want, new["spec"].get("replicas", 0) + max(room, 0 if olds else want)))
        ready = sum(1 for p in self._pods_of(ns, new) if pod_ready(p)) + sum(
            1 for rs in olds for p in self._pods_of(ns, rs) if pod_ready(p))
        removable = ready - (want - unavailable)
        for rs in olds:  # oldest first
            current = rs["spec"].get("replicas", 0)
            if current == 0:
                continue
            not_ready = sum(1 for p in self._pods_of(ns, rs) if not pod_ready(p))
            drop = min(current, max(removable, 0) + not_ready)
            if drop:
                self._scale(rs, current - drop)
                removable -= drop - not_ready

    def _scale(self, rs: dict, replicas: int) -> None:
        if rs["spec"].get("replicas") != replicas:
            rs["spec"]["replicas"] = replicas
            rs["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] = str(replicas)
            self.store.bump(rs)

    def _status(self, ns: str, d: dict, new: dict, owned: list[dict], want: int) -> None:
        pods = [p for rs in owned for p in self._pods_of(ns, rs)]
        new_pods = self._pods_of(ns, new)
        ready = sum(1 for p in pods if pod_ready(p))
        new_ready = sum(1 for p in new_pods if pod_ready(p))
        key = (ns, d["metadata"]["name"])
        if self._new_ready.get(key) != (new["metadata"]["name"], new_ready):  # progress: a new pod became ready
            self._new_ready[key] = (new["metadata"]["name"], new_ready)
            self._progress[key] = time.monotonic()
        complete = len(new_pods) == want == len(pods) and ready == want
        stalled = not complete and time.monotonic() - self._progress.get(key, time.monotonic()) > \
            d["spec"].get("progressDeadlineSeconds", 600)
        rs_name = new["metadata"]["name"]
        if complete:
            progressing = ("True", "NewReplicaSetAvailable", f'ReplicaSet "{rs_name}" has successfully progressed.')
        elif stalled:
            progressing = ("False", "ProgressDeadlineExceeded", f'ReplicaSet "{rs_name}" has timed out progressing.')
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
        available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.") if ready >= min(
            want, 1) else ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        previous = d.get("status") or {}
        old = {c["type"]: c for c in previous.get("conditions", [])}
        conditions = [old[kind] if kind in old and (old[kind]["status"], old[kind]["reason"]) == value[:2]
                      else condition(kind, *value) for kind, value in (("Available", available),
                                                                        ("Progressing", progressing))]
        status = {"observedGeneration": d["metadata"]["generation"], "replicas": len(pods),
                  "updatedReplicas": len(new_pods), "readyReplicas": ready, "availableReplicas": ready,
                  "unavailableReplicas": max(0, len(pods) - ready), "conditions": conditions}
        if previous != status:
            d["status"] = status
            self.store.bump(d)

    # -- ReplicaSets ------------------------------------------------------------------------------------
    def _pods_of(self, ns: str, rs: dict) -> list[dict]:
        return [p for p in self.store.items("pods", ns) if owned_by(p, rs)
                and not p["metadata"].get("deletionTimestamp")]

    def _replicaset(self, ns: str, rs: dict) -> None:
        pods = self._pods_of(ns, rs)
        want = rs["spec"].get("replicas", 0)
        for _ in range(want - len(pods)):
            template = copy.deepcopy(rs["spec"]["template"])
            name = f"{rs['metadata']['name']}-{_suffix()}"
            self._create_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "labels": template["metadata"].get("labels", {}),
                "annotations": template["metadata"].get("annotations", {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                                     "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
                "spec": template["spec"]})
        if len(pods) > want:  # not-ready pods first, then the newest
            doomed = sorted(pods, key=lambda p: (pod_ready(p), p["metadata"]["creationTimestamp"]))[: len(pods) - want]
            for pod in doomed:
                self._delete_pod(ns, pod["metadata"]["name"])
        pods = self._pods_of(ns, rs)
        ready = sum(1 for p in pods if pod_ready(p))
        status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready,
                  "observedGeneration": rs["metadata"]["generation"], "fullyLabeledReplicas": len(pods)}
        if rs.get("status") != status:
            rs["status"] = status
            self.store.bump(rs)


def selector_of(obj: dict) -> str:
    """A Deployment's or ReplicaSet's label selector, as a query string."""
    return _match_labels(obj["spec"]["selector"])


__all__ = ["REVISION", "Workloads", "pod_ready", "selector_matches", "selector_of", "template_hash"]
