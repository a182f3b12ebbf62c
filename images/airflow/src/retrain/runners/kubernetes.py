"""Kubernetes mode: each stage as a ``KubernetesPodOperator`` pod built from its stage spec.

Every pod, the XCom sidecar included, meets the Pod Security Standard ``restricted`` profile. The
train stage requests ``nvidia.com/gpu`` (``RETRAIN_GPU_COUNT`` of them, one torchrun process each,
with CPU, memory and a memory-backed ``/dev/shm`` per process), lands on the GPU pool (node affinity
on a configurable label, toleration ``nvidia.com/gpu:NoSchedule``); the other stages keep off that
pool. Credentials come only from Kubernetes Secrets (``envFrom``), so no secret value is ever part
of a rendered pod. :func:`pod_arguments` is that pod, once: the train stage on several nodes
(:mod:`retrain.runners.distributed`) runs the same pod in each of its replicas.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from retrain import links
from retrain.runners.common import reschedule_after_preemption
from retrain.settings import PodSettings, Settings
from retrain_contract import stages
from retrain_contract.stages import EXIT_BAD_INPUT, EXIT_PREEMPTED

GPU_RESOURCE = "nvidia.com/gpu"
TRAIN_GRACE_S = 120
SHM_PER_PROCESS_GI = 8  # /dev/shm per training process: its DataLoader workers hand batches over through it


def restricted_container_context() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(allow_privilege_escalation=False, run_as_non_root=True,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]),
                                 seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def exit_code(pod: Any, container: str) -> int | None:
    for status in getattr(getattr(pod, "status", None), "container_statuses", None) or []:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def preempted(pod: Any, container: str) -> str | None:
    """Why ``pod`` counts as preempted, or None: the stage's own exit code, or the API's disruption condition."""
    if exit_code(pod, container) == EXIT_PREEMPTED:
        return f"the stage saved a checkpoint on SIGTERM and exited {EXIT_PREEMPTED}"
    for condition in getattr(getattr(pod, "status", None), "conditions", None) or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            return f"DisruptionTarget: {condition.reason or 'disrupted'} {condition.message or ''}".strip()
    return None


class StagePodOperator(KubernetesPodOperator):
    """KPO for a stage, with two differences in what happens when a pod does not succeed.

    A pod that never finished (Pending or Running at cleanup: an unschedulable GPU pod past its
    start-up timeout) is deleted, so it cannot start later; failed pods are still kept. A stage
    that rejected its input (exit code 2) fails the task without retries, as in local mode. A
    stage stopped by a node's preemption (it saved a checkpoint and exited 75, or the pod carries
    the ``DisruptionTarget`` condition) is rescheduled in the same try, so it does not use up a
    retry, and resumes from its checkpoint in a new pod.
    """

    operator_extra_links = (links.MLFLOW_RUN,)

    def __init__(self, *, preemption_delay_s: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.preemption_delay_s = preemption_delay_s

    def cleanup(self, pod, remote_pod, xcom_result=None, context=None):
        try:
            return super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowException as exc:
            if exit_code(remote_pod, self.base_container_name) == EXIT_BAD_INPUT:
                raise AirflowFailException(
                    f"stage {self.task_id} rejected its input (exit code {EXIT_BAD_INPUT}); not retrying. {exc}"
                ) from exc
            reason = preempted(remote_pod, self.base_container_name)
            if reason and not self._killed:
                self.log.warning("pod %s was preempted (%s); rescheduling the task in %.0f s, same try",
                                 remote_pod.metadata.name, reason, self.preemption_delay_s)
                raise reschedule_after_preemption(self.preemption_delay_s) from exc
            raise

    def process_pod_deletion(self, pod, *, reraise=True):
        phase = getattr(getattr(pod, "status", None), "phase", None)
        if pod is not None and phase in ("Pending", "Running"):
            self.log.info("Deleting pod %s: it never finished (phase %s)", pod.metadata.name, phase)
            self.pod_manager.delete_pod(pod)
            return True
        return super().process_pod_deletion(pod, reraise=reraise)


def train_processes(settings: Settings) -> int:
    """Training processes per train pod: one per GPU it requests (one on a CPU-only cluster)."""
    return max(settings.pods.gpu_count, 1)


def _times(quantity: str, n: int) -> str:
    """A resource quantity ``n`` times over: ``_times("16Gi", 2) == "32Gi"``, ``_times("500m", 2) == "1000m"``."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return f"{float(number) * n:g}{unit}"


def pod_arguments(name: str, arguments: list[str], gpu: bool, settings: Settings) -> dict[str, Any]:
    """KubernetesPodOperator's arguments for the pod of stage ``name``: its command, resources, placement, security.

    The train stage with N GPUs runs N processes under torchrun (:func:`retrain_contract.stages.command`), and
    its CPU and memory requests and limits and its ``/dev/shm`` are per process (``Resources`` of one GPU).
    """
    pod: PodSettings = settings.pods
    gpu = gpu and pod.gpu_count > 0
    procs = train_processes(settings) if gpu else 1
    res = pod.resources[name]
    requests = {"cpu": _times(res.cpu, procs), "memory": _times(res.memory, procs),
                "ephemeral-storage": res.ephemeral_storage}
    limits = {"memory": _times(res.memory_limit or res.memory, procs), "ephemeral-storage": res.ephemeral_storage}
    if res.cpu_limit:
        limits["cpu"] = _times(res.cpu_limit, procs)
    label_key, label_value = pod.gpu_node_label
    on_gpu_pool = k8s.V1NodeSelectorRequirement(key=label_key, operator="In" if gpu else "NotIn", values=[label_value])
    volumes, mounts, tolerations, pool = [], [], [], {}
    if gpu:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(pod.gpu_count)
        tolerations = [k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
        volumes = [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=f"{SHM_PER_PROCESS_GI * procs}Gi"))]
        mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
        pool = {"pool": pod.gpu_pool}
    return dict(
        task_id=name,
        name=f"embedder-{name.replace('_', '-')}",
        kubernetes_conn_id=pod.conn_id,
        namespace=pod.namespace,
        image=pod.image,
        cmds=stages.command(name, nproc_per_node=procs),
        arguments=arguments,
        env_vars={**settings.stage_env(), "EMBEDDER_IMAGE": pod.image},
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s, optional=False)) for s in pod.secrets],
        labels={"app.kubernetes.io/part-of": "retrain-embedder", "retrain/stage": name,
                "retrain/model": settings.model_name},
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        affinity=k8s.V1Affinity(node_affinity=k8s.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                node_selector_terms=[k8s.V1NodeSelectorTerm(match_expressions=[on_gpu_pool])]))),
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=mounts,
        service_account_name=pod.service_account,
        automount_service_account_token=False,
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001, fs_group=10001,
                                                  seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=restricted_container_context(),
        xcom_sidecar_container_security_context=restricted_container_context(),
        do_xcom_push=True,
        get_logs=True,
        startup_timeout_seconds=pod.startup_timeout_s,
        preemption_delay_s=settings.preemption_delay_s,
        # Time between SIGTERM and SIGKILL: the train stage finishes its step and saves a checkpoint.
        termination_grace_period=TRAIN_GRACE_S if name == "train" else None,
        **pool,
    )


def stage_pod_operator(name: str, arguments: list[str], gpu: bool, settings: Settings, **kwargs: Any):
    """The KubernetesPodOperator for one stage: same command and arguments as the local runner."""
    return StagePodOperator(
        **{**pod_arguments(name, arguments, gpu, settings), **kwargs},
        on_finish_action="delete_succeeded_pod",  # failed pods stay for debugging (see StagePodOperator)
        reattach_on_restart=True,
        deferrable=settings.pods.deferrable,
    )
