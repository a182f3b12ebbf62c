"""A fake Deployment controller: rolls a changed pod template out and reports it as the real one does.

It keeps each Deployment's pod templates, one per revision, and after a template change surges one new
pod at a time (``maxUnavailable`` 0), reporting ``observedGeneration``, updated/ready/available replicas
and the ``Progressing`` condition, up to ``ProgressDeadlineExceeded`` when the new pods never become
ready. Once the new pods are all available, the Service sends traffic to them.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Callable

from .store import Store, condition, now

REVISION = "deployment.kubernetes.io/revision"


class DeploymentController:
    def __init__(self, store: Store, on_available: Callable[[str, str, dict], None]):
        self.store = store
        self.delay = 0.3  # seconds between the controller's steps
        self.pod_ready: Callable[[dict], bool] = lambda template: True  # do a template's new pods become ready?
        self.revisions: dict[tuple[str, str], list[dict]] = {}  # pod templates, one per revision
        self._on_available = on_available  # (namespace, name, template): the template's pods are all available

    def add(self, deployment: dict, ready: Callable[[dict], bool] | None = None) -> None:
        """Create a Deployment already rolled out; ``ready(pod_template)`` says if its new pods become ready."""
        deployment = copy.deepcopy(deployment)
        meta = deployment["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        meta.setdefault("annotations", {})[REVISION] = "1"
        replicas = deployment["spec"].get("replicas", 1)
        deployment["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                                "readyReplicas": replicas, "availableReplicas": replicas, "conditions": [
                                    condition("Progressing", "True", "NewReplicaSetAvailable")]}
        self.store.objects[("deployments", meta["namespace"], meta["name"])] = self.store.bump(deployment)
        self._on_available(meta["namespace"], meta["name"], deployment["spec"]["template"])
        self.pod_ready = ready or (lambda template: True)
        self.revisions[(meta["namespace"], meta["name"])] = [copy.deepcopy(deployment["spec"]["template"])]

    def spec_changed(self, ns: str, name: str, obj: dict, before: dict) -> None:
        """The API server changed the spec (and the generation): a new template is a new revision, rolled out."""
        if obj["spec"]["template"] == before["template"]:
            return
        history = self.revisions.setdefault((ns, name), [])
        history.append(copy.deepcopy(obj["spec"]["template"]))
        obj["metadata"]["annotations"][REVISION] = str(len(history))
        self.store.spawn(self._roll(ns, name, obj["metadata"]["generation"]))

    async def _roll(self, ns: str, name: str, generation: int) -> None:
        """Surge one new pod at a time (maxUnavailable 0), as the real controller would report it."""
        obj = self.store.objects[("deployments", ns, name)]
        await asyncio.sleep(self.delay)  # status is stale for a moment after the patch
        if obj["metadata"]["generation"] != generation:
            return
        want = obj["spec"].get("replicas", 1)
        deadline = asyncio.get_running_loop().time() + obj["spec"].get("progressDeadlineSeconds", 600)
        st = obj["status"]
        st.update(observedGeneration=generation, updatedReplicas=0, replicas=want)
        st["conditions"] = [condition("Progressing", "True", "ReplicaSetUpdated")]
        self.store.bump(obj)
        ready = self.pod_ready(obj["spec"]["template"])
        while st["updatedReplicas"] < want:
            await asyncio.sleep(self.delay)  # the controller's tick
            if obj["metadata"]["generation"] != generation:
                return
            if not ready:
                st.update(replicas=want + 1, updatedReplicas=1, unavailableReplicas=1)
                if asyncio.get_running_loop().time() > deadline:
                    st["conditions"] = [condition("Progressing", "False", "ProgressDeadlineExceeded",
                                                  f'ReplicaSet "{name}" has timed out progressing.')]
                    self.store.bump(obj)
                    return
                self.store.bump(obj)
                continue
            st.update(updatedReplicas=st["updatedReplicas"] + 1, replicas=want + 1)
            self.store.bump(obj)
        st.update(replicas=want, readyReplicas=want, availableReplicas=want, unavailableReplicas=0)
        st["conditions"] = [condition("Progressing", "True", "NewReplicaSetAvailable")]
        self._on_available(ns, name, obj["spec"]["template"])
        self.store.bump(obj)
