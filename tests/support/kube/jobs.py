"""A fake Job controller (``batch/v1``): runs a Job's pods and reports the Job as the real controller does.

For an Indexed Job it creates one pod per index (``parallelism`` at a time, as many as ``completions``),
each named ``<job>-<index>-<random>``, with the hostname ``<job>-<index>``, the index in the annotation and
label ``batch.kubernetes.io/job-completion-index`` and in ``$JOB_COMPLETION_INDEX``, the labels
``batch.kubernetes.io/job-name`` and ``controller-uid``, and an owner reference to the Job. It follows the
pods: ``active``/``ready``/``succeeded``/``failed`` and ``completedIndexes``; every index succeeded ends in
``SuccessCriteriaMet`` and ``Complete``; more failed pods than ``backoffLimit`` end in ``FailureTarget``,
the active pods deleted, then ``Failed`` (``BackoffLimitExceeded``). Pods are not replaced: the project
runs its Jobs with ``backoffLimit: 0``, and a replacement would need a retry policy this emulator lacks.
"""

from __future__ import annotations

import copy
import secrets
import string
from collections.abc import Callable

from .store import Store, condition, now

INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "batch.kubernetes.io/job-name"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"


def _suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def _base_exit(pod: dict) -> int | None:
    """0 for a pod that succeeded, 1 for one that failed, None while it runs (what the controller counts)."""
    return {"Succeeded": 0, "Failed": 1}.get(pod["status"].get("phase", ""))


def _ranges(indexes: list[int]) -> str:
    """``completedIndexes`` as the API writes it: ``"0-2,5"``."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


class JobController:
    def __init__(self, store: Store, create_pod: Callable[[str, dict], dict], delete_pod: Callable[[str, str], None]):
        self.store = store
        self._create_pod = create_pod  # as the API server creates one (recorded, started by the kubelet)
        self._delete_pod = delete_pod

    def admit(self, ns: str, job: dict) -> str | None:
        """Why the API server refuses ``job`` (None: it is valid, as far as this emulator checks)."""
        spec = job.get("spec", {})
        if spec.get("completionMode", "NonIndexed") != "Indexed":
            return "spec.completionMode: only Indexed Jobs are emulated"
        if not isinstance(spec.get("completions"), int):
            return "spec.completions: Required value: when completion mode is Indexed"
        if spec.get("parallelism", 1) < spec["completions"]:
            return "spec.parallelism: this emulator runs every index at once (parallelism = completions)"
        if spec["template"]["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
            return 'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"'
        return None

    def created(self, ns: str, job: dict) -> None:
        """The API server stored ``job``: default its spec, start its status and its pods."""
        spec, uid = job["spec"], job["metadata"]["uid"]
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("selector", {"matchLabels": {CONTROLLER_UID: uid}})
        template_meta = spec["template"].setdefault("metadata", {})
        template_meta["labels"] = {**(template_meta.get("labels") or {}), CONTROLLER_UID: uid,
                                   JOB_NAME: job["metadata"]["name"]}
        job["status"] = {"startTime": now(), "active": 0, "ready": 0, "succeeded": 0, "failed": 0,
                         "terminating": 0, "uncountedTerminatedPods": {}}
        self.store.spawn(self._run(ns, job["metadata"]["name"], uid))

    def _pod(self, ns: str, job: dict, index: int) -> dict:
        meta, template = job["metadata"], copy.deepcopy(job["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        pod_meta.pop("name", None)
        pod_meta["name"] = f"{meta['name']}-{index}-{_suffix()}"
        pod_meta["labels"] = {**pod_meta.get("labels", {}), JOB_NAME: meta["name"], "job-name": meta["name"],
                              CONTROLLER_UID: meta["uid"], "controller-uid": meta["uid"], INDEX: str(index)}
        pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), INDEX: str(index)}
        pod_meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                        "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]
        spec = template["spec"]
        spec.setdefault("hostname", f"{meta['name']}-{index}")
        for container in spec["containers"]:
            container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{INDEX}']"}}})
        return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}

    def _pods(self, ns: str, uid: str) -> list[dict]:
        return [p for p in self.store.items("pods", ns) if p["metadata"].get("labels", {}).get(CONTROLLER_UID) == uid]

    async def _run(self, ns: str, name: str, uid: str) -> None:
        job = self.store.objects[("jobs", ns, name)]
        spec = job["spec"]
        for index in range(spec["completions"]):
            self._create_pod(ns, self._pod(ns, job, index))
        seen = 0
        while not self.store.stopping:
            current = self.store.objects.get(("jobs", ns, name))
            if current is None or current["metadata"]["uid"] != uid:
                return  # deleted: its pods went with it (or were orphaned) in the API server
            if self._reconcile(ns, current):
                return
            seen = self.store.changes.count
            await self.store.changes.wait_past(seen)

    def _reconcile(self, ns: str, job: dict) -> bool:
        """Bring the Job's status up to its pods; True once it has finished."""
        spec, status = job["spec"], job["status"]
        pods = self._pods(ns, job["metadata"]["uid"])
        ended = {int(p["metadata"]["annotations"][INDEX]): _base_exit(p) for p in pods}
        done = sorted(i for i, code in ended.items() if code == 0)
        failed = sum(1 for code in ended.values() if code not in (None, 0))
        active = [p for p in pods if _base_exit(p) is None]
        update = {"active": len(active), "ready": sum(1 for p in active if p["status"].get("phase") == "Running"),
                  "succeeded": len(done), "failed": failed}
        if done:
            update["completedIndexes"] = _ranges(done)
        finished = False
        if failed > spec["backoffLimit"]:
            message = "Job has reached the specified backoff limit"
            status["conditions"] = [condition("FailureTarget", "True", "BackoffLimitExceeded", message)]
            for pod in active:  # the controller stops what still runs
                self._delete_pod(ns, pod["metadata"]["name"])
            status["conditions"].append(condition("Failed", "True", "BackoffLimitExceeded", message))
            update.update(active=0, ready=0)
            finished = True
        elif len(done) == spec["completions"]:
            status["conditions"] = [condition("SuccessCriteriaMet", "True", "CompletionsReached",
                                              "Reached expected number of succeeded pods"),
                                    condition("Complete", "True", "CompletionsReached",
                                              "Reached expected number of succeeded pods")]
            update["completionTime"] = now()
            finished = True
        if finished or any(status.get(k) != v for k, v in update.items()):
            status.update(update)
            self.store.bump(job)
        return finished
