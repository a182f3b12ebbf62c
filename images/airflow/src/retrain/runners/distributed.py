"""The train stage on several nodes (``RETRAIN_TRAIN_NODES`` > 1): one pod per node, rendezvousing with torchrun's c10d.

Every node runs the single train pod (:func:`retrain.runners.kubernetes.pod_arguments`: image, resources and
GPUs, GPU pool, restricted security context, Secrets, ``/dev/shm``, the XCom sidecar), its command
:func:`retrain_contract.stages.command` with ``nnodes``, the rendezvous endpoint and an id. Two launchers
(``RETRAIN_TRAIN_LAUNCHER``) create those pods:

- ``job`` (plain Kubernetes): an Indexed ``batch/v1`` Job, ``completions = parallelism = nodes``,
  ``backoffLimit: 0`` (one failed pod fails the Job, and the Job controller stops the others), and a
  headless Service of the same name selecting its pods; each pod is ``<job>-<index>`` in the Service's
  subdomain, and the endpoint is index 0's name, ``<job>-0.<job>.<namespace>.svc.<cluster domain>:29400``
  (fully qualified: the index-0 pod finds that name in its own ``/etc/hosts``, so torchrun knows it hosts
  the rendezvous before cluster DNS has the record);
- ``pytorchjob``: a Kubeflow Training Operator ``PyTorchJob`` (``kubeflow.org/v1``), one Master and
  nodes - 1 Workers, the endpoint the Master's own Service ``<name>-master-0:29400``.

Attempts: the objects are named ``embedder-train-<random>`` and that name is the rendezvous id, so every
attempt (a retry, or a reschedule after preemption in the same try) rendezvous afresh; its labels name
the DAG run and try. An attempt first deletes what earlier attempts of this task in this DAG run left,
unless they failed (those are kept for debugging, their pods stopped): a preempted attempt's, or one a
worker that died left running, whose pods would hold their GPUs. Then it creates its objects, waits for
every pod to start (a pod that cannot be scheduled within ``RETRAIN_POD_STARTUP_TIMEOUT_S`` fails the
try, and the objects are deleted so it cannot start later), streams the leader's log (index 0, the
Master) into the task log, and polls every pod. As a pod's stage ends, its result file is read through
the XCom sidecar as KPO reads it, which also stops the sidecar so the pod completes; once a node's stage
has failed (not preempted), the pods still running are deleted, as the Job controller would (a
PyTorchJob keeps them). Then, as for a single pod: exit code 2 on any pod fails without retries; exit 75
or the ``DisruptionTarget`` condition on any pod deletes the objects and reschedules in the same try (the
next attempt resumes from the checkpoint); any other failure fails the try and keeps the objects and the
pods that failed for debugging; success returns rank 0's result and deletes them.

Rank 0 writes the result. c10d ranks nodes by address, so with these names rank 0 is on the leader,
but the task does not rely on it: every pod's file is read, and exactly one may have one.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import generic_api_retry
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.container import container_is_running
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchFailedException
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from retrain import links
from retrain.runners.common import reschedule_after_preemption
from retrain.runners.kubernetes import exit_code, pod_arguments, preempted, train_processes
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract import stages
from retrain_contract.stages import EXIT_BAD_INPUT, RENDEZVOUS_PORT

ATTEMPT_LABEL = "retrain/attempt"  # on every object and pod of one attempt; its value is the objects' name
JOB_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's annotation on each pod
PYTORCHJOB = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs"}
REPLICA_TYPE, REPLICA_INDEX = "training.kubeflow.org/replica-type", "training.kubeflow.org/replica-index"
PYTORCH_CONTAINER = "pytorch"  # the Training Operator configures the container of this name
BACKGROUND = k8s.V1DeleteOptions(propagation_policy="Background")  # a Job's pods go with it (the API's default: orphan)


@dataclass
class PodEnd:
    """How one node's pod ended: its stage's exit code (None: the pod went before it ended), why it counts as
    preempted (None: it does not), and the result file it left (rank 0's; None elsewhere)."""

    name: str
    node: int
    code: int | None
    preempted: str | None = None
    result: dict[str, Any] | None = None


class DistributedStageOperator(KubernetesPodOperator):
    """Run a stage on ``nodes`` pods built by KPO's own pod builder; subclasses say which objects create them."""

    operator_extra_links = (links.MLFLOW_RUN,)
    kind = "objects"

    def __init__(self, *, nodes: int, nproc_per_node: int, preemption_delay_s: float = 30.0,
                 poll_interval_s: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.nodes = nodes
        self.nproc_per_node = nproc_per_node
        self.preemption_delay_s = preemption_delay_s
        self.poll_interval_s = poll_interval_s
        self.attempt: str | None = None  # the name of this attempt's objects, once created

    # ---- what a launcher defines -----------------------------------------------------------------
    def rendezvous_endpoint(self, name: str) -> str:
        raise NotImplementedError

    def render(self, name: str, template: k8s.V1PodTemplateSpec, labels: dict[str, str]) -> list[Any]:
        """The objects of one attempt, in the order they are created."""
        raise NotImplementedError

    def create(self, obj: Any) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Delete one attempt's objects and, with them, its pods."""
        raise NotImplementedError

    def attempts(self, selector: str) -> dict[str, bool]:
        """The attempts whose objects carry these labels: name -> whether the Job (or PyTorchJob) failed."""
        raise NotImplementedError

    def node_of(self, pod: k8s.V1Pod) -> int:
        """The node number of one of the pods (0: the leader, whose log the task streams)."""
        raise NotImplementedError

    # ---- the pods --------------------------------------------------------------------------------
    def render_attempt(self, context: Any, *, dry_run: bool = False) -> tuple[str, list[Any]]:
        """This attempt's name and objects (what :meth:`execute` creates; ``dry_run``: without a cluster, as KPO's).

        The pod is KPO's own, as a single pod would be; its name (``embedder-train-<random>``) names the attempt,
        and its command rendezvous under that name.
        """
        pod = self.build_pod_request_obj(context, dry_run=dry_run)
        name = pod.metadata.name
        base = next(c for c in pod.spec.containers if c.name == self.base_container_name)
        base.command = stages.command("train", nproc_per_node=self.nproc_per_node, nnodes=self.nodes,
                                      rdzv_endpoint=self.rendezvous_endpoint(name), rdzv_id=name)
        labels = {**(pod.metadata.labels or {}), ATTEMPT_LABEL: name}
        template = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels, annotations=pod.metadata.annotations),
                                         spec=pod.spec)
        return name, self.render(name, template, labels)

    @generic_api_retry
    def _pods(self, name: str) -> list[k8s.V1Pod]:
        return self.client.list_namespaced_pod(self.namespace, label_selector=f"{ATTEMPT_LABEL}={name}").items

    # ---- the task --------------------------------------------------------------------------------
    def execute(self, context: Any) -> dict[str, Any]:
        self.name = self._set_name(self.name)
        labels = self._get_ti_pod_labels(context, include_try_number=False)  # this DAG run and task, every try
        for old, failed in self.attempts(",".join(f"{k}={v}" for k, v in sorted(labels.items()))).items():
            if not failed:  # preempted, or left running by a worker that died: its pods would hold their GPUs
                self.log.info("deleting %s %s, an earlier attempt that did not fail", self.kind, old)
                self.delete(old)
        name, objects = self.render_attempt(context)
        self.log.info("running %s as %s %s on %d nodes, world size %d (processes per node: %d)", self.task_id,
                      self.kind, name, self.nodes, self.nodes * self.nproc_per_node, self.nproc_per_node)
        for obj in objects:
            self.create(obj)
        self.attempt = name
        context["ti"].xcom_push(key="attempt", value={"name": name, "namespace": self.namespace, "kind": self.kind})
        pods = self._started_pods(name)
        ends = self._follow(name, pods)
        return self._outcome(name, ends)

    def _started_pods(self, name: str) -> list[k8s.V1Pod]:
        """Every node's pod, once each has started; a pod that does not start in time ends the attempt."""
        try:
            pods = poll(lambda: (found if len(found := self._pods(name)) >= self.nodes else None),
                        timeout_s=self.startup_timeout_seconds, interval_s=self.poll_interval_s,
                        what=f"{self.nodes} pods of {self.kind} {name}")
            for pod in sorted(pods, key=self.node_of):
                self.await_pod_start(pod)
        except (PodLaunchFailedException, TimeoutError) as exc:
            self.log.warning("deleting %s %s: not all of its pods started", self.kind, name)
            self.delete(name)
            raise AirflowException(f"{self.kind} {name}: {exc}") from exc
        return pods

    def _follow(self, name: str, pods: list[k8s.V1Pod]) -> list[PodEnd]:
        """Stream the leader's log while polling every pod until each one's stage has ended."""
        leader = min(pods, key=self.node_of)
        stream = threading.Thread(target=self._stream_log, args=(leader,), daemon=True, name=f"log-{leader.metadata.name}")
        stream.start()
        ends: dict[str, PodEnd] = {}
        disrupted: dict[str, str] = {}  # a pod the API marked for disruption may be gone before it is seen ended
        stopping: set[str] = set()

        def all_ended() -> bool:
            current = {p.metadata.name: p for p in self._pods(name)}
            for pod in pods:
                pod_name = pod.metadata.name
                if pod_name in ends:
                    continue
                remote = current.get(pod_name)
                if remote is None:
                    ends[pod_name] = PodEnd(pod_name, self.node_of(pod), None, disrupted.get(pod_name))
                    continue
                reason = preempted(remote, self.base_container_name)
                if reason:
                    disrupted[pod_name] = reason
                code = exit_code(remote, self.base_container_name)
                if code is not None:
                    ends[pod_name] = PodEnd(pod_name, self.node_of(pod), code, reason, self._result(remote))
                    self.log.info("pod %s (node %d) ended with exit code %d", pod_name, ends[pod_name].node, code)
            failed = next((e for e in ends.values() if e.code not in (None, 0) and not e.preempted), None)
            if failed:  # the other ranks cannot go on without it; a PyTorchJob (cleanPodPolicy None) would leave them
                for pod_name in current.keys() - ends.keys() - stopping:
                    self.log.info("stopping pod %s: node %d failed", pod_name, failed.node)
                    self.pod_manager.delete_pod(current[pod_name])
                    stopping.add(pod_name)
            return len(ends) == len(pods)

        poll(all_ended, timeout_s=float("inf"), interval_s=self.poll_interval_s)
        stream.join(timeout=60)
        return sorted(ends.values(), key=lambda e: e.node)

    def _stream_log(self, pod: k8s.V1Pod) -> None:
        try:
            self.pod_manager.fetch_container_logs(
                pod=pod, container_name=self.base_container_name, follow=True,
                container_name_log_prefix_enabled=self.container_name_log_prefix_enabled,
                log_formatter=self.log_formatter)
        except Exception as exc:  # the pod went (the Job failed, or the task was stopped): its log ends here
            self.log.info("stopped following the log of pod %s: %s", pod.metadata.name, exc)

    def _result(self, pod: k8s.V1Pod) -> dict[str, Any] | None:
        """The pod's result file (rank 0's pod has one), read through the XCom sidecar, which then stops.

        ``pod`` is as last listed: it may be gone by now (the Job controller stops a failed Job's pods).
        """
        if not self.do_xcom_push or not container_is_running(pod, PodDefaults.SIDECAR_CONTAINER_NAME):
            return None
        try:
            return self.extract_xcom(pod)
        except Exception as exc:
            self.log.warning("could not read the result of pod %s: %s", pod.metadata.name, exc)
            return None

    def _last_lines(self, pod_name: str, lines: int = 20) -> str:
        with contextlib.suppress(Exception):
            pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=pod_name, namespace=self.namespace))
            logs = self.pod_manager.read_pod_logs(pod, self.base_container_name, tail_lines=lines, follow=False)
            return b"".join(logs).decode(errors="replace").rstrip()
        return "(its log is gone)"

    def _outcome(self, name: str, ends: list[PodEnd]) -> dict[str, Any]:
        where = f"{self.kind} {name}"
        for end in ends:
            if end.code == EXIT_BAD_INPUT:
                raise AirflowFailException(
                    f"stage {self.task_id} rejected its input (exit code {EXIT_BAD_INPUT}) on pod {end.name} "
                    f"(node {end.node}); not retrying. Its last lines:\n{self._last_lines(end.name)}")
        reason = next((f"pod {e.name} (node {e.node}): {e.preempted}" for e in ends if e.preempted), None)
        if reason and not self._killed:
            self.log.warning("%s was preempted (%s); deleting it and rescheduling the task in %.0f s, same try",
                             where, reason, self.preemption_delay_s)
            self.delete(name)
            raise reschedule_after_preemption(self.preemption_delay_s)
        failed = sorted((e for e in ends if e.code != 0), key=lambda e: (e.code is None, e.node))  # causes first
        if failed:
            first = failed[0]
            what = "was deleted before its stage ended" if first.code is None else f"exited {first.code}"
            raise AirflowException(
                f"stage {self.task_id} failed on {where}: pod {first.name} (node {first.node}) {what}; "
                f"{self.kind} and pods are kept for debugging. Its last lines:\n{self._last_lines(first.name)}")
        results = [e for e in ends if e.result is not None]
        if len(results) != 1:
            raise AirflowException(f"stage {self.task_id} on {where}: {len(results)} pods wrote a result "
                                   f"({', '.join(e.name for e in results) or 'none'}); rank 0 alone writes one")
        self.log.info("rank 0's result came from pod %s (node %d); deleting %s", results[0].name, results[0].node, where)
        self.delete(name)
        return results[0].result  # type: ignore[return-value]

    def on_kill(self) -> None:
        self._killed = True
        if self.attempt:
            self.delete(self.attempt)


class IndexedJobStageOperator(DistributedStageOperator):
    """The nodes as an Indexed ``batch/v1`` Job and a headless Service (plain Kubernetes; no operator needed)."""

    kind = "Job"

    def __init__(self, *, cluster_domain: str = "cluster.local", **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster_domain = cluster_domain

    def rendezvous_endpoint(self, name: str) -> str:
        return f"{name}-0.{name}.{self.namespace}.svc.{self.cluster_domain}:{RENDEZVOUS_PORT}"

    def render(self, name: str, template: k8s.V1PodTemplateSpec, labels: dict[str, str]) -> list[Any]:
        template.spec.subdomain = name  # with the Indexed Job's hostname <job>-<index>: <job>-<index>.<job>.<ns>.svc
        meta = k8s.V1ObjectMeta(name=name, namespace=self.namespace, labels=labels)
        service = k8s.V1Service(api_version="v1", kind="Service", metadata=meta, spec=k8s.V1ServiceSpec(
            cluster_ip="None", selector={ATTEMPT_LABEL: name},
            publish_not_ready_addresses=True,  # names resolve as soon as pods have addresses, before they are ready
            ports=[k8s.V1ServicePort(name="rendezvous", port=RENDEZVOUS_PORT, target_port=RENDEZVOUS_PORT)]))
        job = k8s.V1Job(api_version="batch/v1", kind="Job", metadata=meta, spec=k8s.V1JobSpec(
            completion_mode="Indexed", completions=self.nodes, parallelism=self.nodes, backoff_limit=0,
            template=template))
        return [service, job]  # the Service first: pods resolve their peers' names from the start

    @generic_api_retry
    def create(self, obj: Any) -> None:
        if isinstance(obj, k8s.V1Service):
            self.client.create_namespaced_service(self.namespace, obj)
        else:
            self.hook.batch_v1_client.create_namespaced_job(self.namespace, obj)

    @generic_api_retry
    def delete(self, name: str) -> None:
        for remove in (self.hook.batch_v1_client.delete_namespaced_job, self.client.delete_namespaced_service):
            try:
                remove(name, self.namespace, body=BACKGROUND)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    @generic_api_retry
    def attempts(self, selector: str) -> dict[str, bool]:
        return {job.metadata.name: any(c.type == "Failed" and c.status == "True" for c in job.status.conditions or [])
                for job in self.hook.batch_v1_client.list_namespaced_job(self.namespace, label_selector=selector).items}

    def node_of(self, pod: k8s.V1Pod) -> int:
        return int((pod.metadata.annotations or {})[JOB_INDEX])


class PyTorchJobStageOperator(DistributedStageOperator):
    """The nodes as a Kubeflow ``PyTorchJob``: one Master and nodes - 1 Workers (needs the Training Operator)."""

    kind = "PyTorchJob"

    def rendezvous_endpoint(self, name: str) -> str:
        return f"{name}-master-0:{RENDEZVOUS_PORT}"  # the Master's own (headless) Service, made by the operator

    def render(self, name: str, template: k8s.V1PodTemplateSpec, labels: dict[str, str]) -> list[Any]:
        base = next(c for c in template.spec.containers if c.name == PYTORCH_CONTAINER)
        # The operator's Services expose the container port of this name: the rendezvous.
        base.ports = [k8s.V1ContainerPort(name="pytorchjob-port", container_port=RENDEZVOUS_PORT)]
        pod = ApiClient().sanitize_for_serialization(template)

        def replicas(count: int) -> dict[str, Any]:
            return {"replicas": count, "restartPolicy": "Never", "template": pod}

        return [{
            "apiVersion": f"{PYTORCHJOB['group']}/{PYTORCHJOB['version']}", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": {
                # One failed pod fails the job; pods stay until it is deleted (their logs and result files).
                "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
                "nprocPerNode": str(self.nproc_per_node),
                "pytorchReplicaSpecs": {"Master": replicas(1), "Worker": replicas(self.nodes - 1)},
            },
        }]

    def _call(self, method: str, **kwargs: Any) -> Any:
        """A CustomObjectsApi call on PyTorchJobs; a 404 of the resource itself says the operator is missing."""
        try:
            return generic_api_retry(getattr(self.hook.custom_object_client, method))(
                namespace=self.namespace, **PYTORCHJOB, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and "name" not in kwargs:  # the resource, not one object, is not found: no CRD
                raise AirflowFailException(
                    "PyTorchJob (kubeflow.org/v1) is not a resource of this cluster: install the Kubeflow Training "
                    "Operator, or set RETRAIN_TRAIN_LAUNCHER=job (an Indexed Job, no operator needed)") from exc
            raise

    def create(self, obj: Any) -> None:
        self._call("create_namespaced_custom_object", body=obj)

    def delete(self, name: str) -> None:
        try:
            self._call("delete_namespaced_custom_object", name=name, body=BACKGROUND)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def attempts(self, selector: str) -> dict[str, bool]:
        found = self._call("list_namespaced_custom_object", label_selector=selector)
        return {obj["metadata"]["name"]: any(c.get("type") == "Failed" and c.get("status") == "True"
                                             for c in (obj.get("status") or {}).get("conditions", []))
                for obj in found.get("items", [])}

    def node_of(self, pod: k8s.V1Pod) -> int:
        labels = pod.metadata.labels or {}
        return 0 if labels[REPLICA_TYPE].lower() == "master" else 1 + int(labels[REPLICA_INDEX])


def distributed_train_operator(arguments: list[str], settings: Settings, **kwargs: Any) -> DistributedStageOperator:
    """The train task on ``RETRAIN_TRAIN_NODES`` pods, created by the launcher ``RETRAIN_TRAIN_LAUNCHER`` picks."""
    pod = settings.pods
    common = {**pod_arguments("train", arguments, True, settings), **kwargs}
    common.update(nodes=pod.train_nodes, nproc_per_node=train_processes(settings), deferrable=False)
    if pod.train_launcher == "pytorchjob":
        return PyTorchJobStageOperator(base_container_name=PYTORCH_CONTAINER, **common)
    return IndexedJobStageOperator(cluster_domain=pod.cluster_domain, **common)
