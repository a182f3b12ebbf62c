"""A fake Kubeflow Training Operator (``kubeflow.org/v1`` PyTorchJob), as far as the project uses one.

A cluster has the operator only when a test installs it (:attr:`TrainingOperator.installed`); without
it ``pytorchjobs`` is not a resource of the API (404), as without the CRD. For a PyTorchJob it does what
the operator's PyTorch controller does for replicas with ``restartPolicy: Never`` and no elastic policy:

- a pod per replica, ``<job>-master-0`` and ``<job>-worker-<i>``, from the replica's template, labelled
  ``training.kubeflow.org/job-name``, ``operator-name``, ``replica-type`` (``master``, ``worker``),
  ``replica-index`` (and ``job-role: master``), owned by the PyTorchJob;
- in the ``pytorch`` container, the environment it injects: ``MASTER_ADDR`` (``<job>-master-0``),
  ``MASTER_PORT`` (the container port ``pytorchjob-port``), ``WORLD_SIZE`` and ``RANK`` (replicas, in
  processes when ``nprocPerNode`` is set), ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``,
  ``PYTHONUNBUFFERED``;
- a headless Service per pod, of the pod's name, selecting it, with that port (so ``<job>-master-0``
  resolves, :mod:`.dns`);
- the status: ``Created``, then ``Running``, then ``Succeeded`` when the Master succeeded, or
  ``Failed`` when a pod failed (``runPolicy.backoffLimit`` 0: the project's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .store import Store, condition, now

GROUP = "training.kubeflow.org"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456  # the operator's, when the container names no port
CONTAINER = "pytorch"


class TrainingOperator:
    def __init__(self, store: Store, create_pod: Callable[[str, dict], dict], create_service: Callable[[str, dict], dict]):
        self.store = store
        self.installed = False  # the CRD and the operator: a test installs them
        self._create_pod = create_pod
        self._create_service = create_service

    def admit(self, ns: str, job: dict) -> str | None:
        replicas = job.get("spec", {}).get("pytorchReplicaSpecs", {})
        if set(replicas) - {"Master", "Worker"} or replicas.get("Master", {}).get("replicas") != 1:
            return "spec.pytorchReplicaSpecs: one Master and any number of Workers"
        for kind, spec in replicas.items():
            if not any(c["name"] == CONTAINER for c in spec["template"]["spec"]["containers"]):
                return f"spec.pytorchReplicaSpecs[{kind}]: the template has no container named {CONTAINER!r}"
        return None

    def created(self, ns: str, job: dict) -> None:
        job["status"] = {"conditions": [condition("Created", "True", "PyTorchJobCreated",
                                                  f"PyTorchJob {job['metadata']['name']} is created.")],
                         "replicaStatuses": {}, "startTime": now()}
        self.store.spawn(self._run(ns, job["metadata"]["name"], job["metadata"]["uid"]))

    def _pods(self, ns: str, job: dict) -> list[tuple[int, dict]]:
        """(its port, pod) for every replica, Master first."""
        meta, spec = job["metadata"], job["spec"]
        replicas = spec["pytorchReplicaSpecs"]
        nodes = sum(r.get("replicas", 1) for r in replicas.values())
        procs = int(spec.get("nprocPerNode") or 1)
        out = []
        for kind in ("Master", "Worker"):
            for index in range(replicas.get(kind, {}).get("replicas", 0)):
                template = copy.deepcopy(replicas[kind]["template"])
                name = f"{meta['name']}-{kind.lower()}-{index}"
                node = 0 if kind == "Master" else index + 1
                labels = {**(template.get("metadata") or {}).get("labels", {}), f"{GROUP}/job-name": meta["name"],
                          f"{GROUP}/operator-name": "pytorchjob-controller", f"{GROUP}/replica-type": kind.lower(),
                          f"{GROUP}/replica-index": str(index)}
                if kind == "Master":
                    labels[f"{GROUP}/job-role"] = "master"
                pod_meta = {**(template.get("metadata") or {}), "name": name, "labels": labels, "ownerReferences": [
                    {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": meta["name"], "uid": meta["uid"],
                     "controller": True, "blockOwnerDeletion": True}]}
                spec_ = template["spec"]
                spec_["restartPolicy"] = replicas[kind].get("restartPolicy", "Never")
                container = next(c for c in spec_["containers"] if c["name"] == CONTAINER)
                port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == PORT_NAME),
                            DEFAULT_PORT)
                container.setdefault("env", []).extend({"name": k, "value": str(v)} for k, v in {
                    "PYTHONUNBUFFERED": "1", "MASTER_ADDR": f"{meta['name']}-master-0", "MASTER_PORT": port,
                    "WORLD_SIZE": nodes * procs, "RANK": node, "PET_NNODES": nodes, "PET_NODE_RANK": node,
                    "PET_NPROC_PER_NODE": procs}.items())
                out.append((port, {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec_}))
        return out

    async def _run(self, ns: str, name: str, uid: str) -> None:
        job = self.store.objects[("pytorchjobs", ns, name)]
        for port, pod in self._pods(ns, job):
            selector = {k: v for k, v in pod["metadata"]["labels"].items() if k.startswith(GROUP)}
            self._create_service(ns, {"metadata": {"name": pod["metadata"]["name"], "labels": selector,
                                                   "ownerReferences": pod["metadata"]["ownerReferences"]},
                                      "spec": {"clusterIP": "None", "selector": selector,
                                               "ports": [{"name": PORT_NAME, "port": port, "targetPort": port}]}})
            self._create_pod(ns, pod)
        seen = 0
        while not self.store.stopping:
            current = self.store.objects.get(("pytorchjobs", ns, name))
            if current is None or current["metadata"]["uid"] != uid:
                return
            if self._reconcile(ns, current, uid):
                return
            seen = self.store.changes.count
            await self.store.changes.wait_past(seen)

    def _reconcile(self, ns: str, job: dict, uid: str) -> bool:
        pods = [p for p in self.store.items("pods", ns)
                if any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])]
        phases = {(p["metadata"]["labels"][f"{GROUP}/replica-type"], p["status"].get("phase")) for p in pods}
        status, kinds = job["status"], [c["type"] for c in job["status"]["conditions"]]
        if ("master", "Succeeded") in phases:
            status["conditions"].append(condition("Succeeded", "True", "PyTorchJobSucceeded",
                                                  f"PyTorchJob {job['metadata']['name']} is successfully completed."))
        elif any(phase == "Failed" for _, phase in phases):
            status["conditions"].append(condition("Failed", "True", "PyTorchJobFailed",
                                                  f"PyTorchJob {job['metadata']['name']} is failed."))
        elif "Running" not in kinds and any(phase == "Running" for _, phase in phases):
            status["conditions"].append(condition("Running", "True", "PyTorchJobRunning",
                                                  f"PyTorchJob {job['metadata']['name']} is running."))
        else:
            return False
        self.store.bump(job)
        return status["conditions"][-1]["type"] in ("Succeeded", "Failed")
