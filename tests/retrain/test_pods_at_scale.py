"""Kubernetes mode at scale, rendered from the DAG without a cluster: N GPUs in the train pod, M train nodes as
an Indexed Job with a headless Service, or as a Kubeflow PyTorchJob; every node runs the single train pod."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
from airflow.dag_processing.dagbag import DagBag
from kubernetes.client import ApiClient

from retrain.runners.distributed import IndexedJobStageOperator, PyTorchJobStageOperator
from retrain.runners.kubernetes import StagePodOperator
from retrain_contract import stages
from tests.helpers import GPU_OVERLAY, kustomize

DAGS = Path(__file__).resolve().parents[2] / "dags"
K8S_VERSION = "1.37.0"
RUN_ID = "scheduled__2026-11-22T02:00:00+00:00"


class FakeTI:
    dag_id, task_id, try_number, map_index = "retrain_embedder", "train", 3, -1

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return {"manifest_uri": "s3://data/datasets/abc/manifest.json"}


def train_task(monkeypatch, **env: str):
    """The train task of the DAG parsed in kubernetes mode with ``env``, its templates rendered for a run."""
    monkeypatch.setenv("RETRAIN_RUNNER", "kubernetes")
    monkeypatch.setenv("RETRAIN_GPU_NODE_LABEL", "pool=gpu")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(DAGS)).dags["retrain_embedder"]
    op = dag.get_task("train")
    context = {"ti": FakeTI(), "run_id": RUN_ID, "dag": dag, "params": {k: dag.params[k] for k in dag.params}}
    op.render_template_fields(context)
    return op, context


def as_dict(obj) -> dict:
    return ApiClient().sanitize_for_serialization(obj)


def single_pod(monkeypatch, **env: str) -> dict:
    op, context = train_task(monkeypatch, **env)
    assert isinstance(op, StagePodOperator)
    return as_dict(op.build_pod_request_obj(context, dry_run=True))


def test_two_gpus_make_one_pod_with_two_gpus_and_two_processes(monkeypatch):
    pod = single_pod(monkeypatch, RETRAIN_GPU_COUNT="2")
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    base = pod["spec"]["containers"][0]
    assert base["resources"]["requests"]["nvidia.com/gpu"] == base["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert base["command"] == stages.command("train", nproc_per_node=2)
    assert base["command"][base["command"].index("--nproc-per-node") + 1] == "2" and "--standalone" in base["command"]
    # CPU, memory and /dev/shm per process: twice one GPU's.
    assert base["resources"]["requests"]["cpu"] == "8" and base["resources"]["requests"]["memory"] == "32Gi"
    assert base["resources"]["limits"]["memory"] == "48Gi"
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


def test_one_gpu_keeps_the_plain_stage_command(monkeypatch):
    base = single_pod(monkeypatch, RETRAIN_GPU_COUNT="1")["spec"]["containers"][0]
    assert base["command"] == ["python", "-m", "embedder.train"]
    assert base["resources"]["requests"]["cpu"] == "4"


@pytest.fixture
def job_attempt(monkeypatch) -> tuple[IndexedJobStageOperator, str, dict, dict]:
    op, context = train_task(monkeypatch, RETRAIN_TRAIN_NODES="3", RETRAIN_GPU_COUNT="2")
    assert isinstance(op, IndexedJobStageOperator)
    name, (service, job) = op.render_attempt(context, dry_run=True)
    return op, name, as_dict(service), as_dict(job)


def test_several_nodes_are_an_indexed_job_and_a_headless_service(job_attempt):
    _, name, service, job = job_attempt
    for obj in (service, job):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["name"] == name and name.startswith("embedder-train-")
        assert obj["metadata"]["labels"]["try_number"] == "3" and obj["metadata"]["labels"]["retrain/attempt"] == name
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["subdomain"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"retrain/attempt": name}
    assert spec["template"]["metadata"]["labels"]["retrain/attempt"] == name
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": stages.RENDEZVOUS_PORT,
                                         "targetPort": stages.RENDEZVOUS_PORT}]
    base = spec["template"]["spec"]["containers"][0]
    assert base["command"] == stages.command(
        "train", nproc_per_node=2, nnodes=3, rdzv_endpoint=f"{name}-0.{name}.retrain.svc.cluster.local:29400", rdzv_id=name)


def test_every_node_runs_the_single_train_pod(job_attempt, monkeypatch):
    _, name, _, job = job_attempt
    single = single_pod(monkeypatch, RETRAIN_TRAIN_NODES="1", RETRAIN_GPU_COUNT="2")["spec"]
    template = copy.deepcopy(job["spec"]["template"]["spec"])
    assert template.pop("subdomain") == name
    template["containers"][0].pop("command")
    single["containers"][0].pop("command")
    assert template == single  # resources, GPUs, placement, security context, Secrets, /dev/shm, XCom sidecar
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in template["tolerations"]
    assert [c["name"] for c in template["containers"]] == ["base", "airflow-xcom-sidecar"]


def test_the_rendezvous_id_is_new_for_every_attempt(job_attempt):
    op, name, _, _ = job_attempt
    again, _ = op.render_attempt({"ti": FakeTI(), "run_id": RUN_ID, "dag": None}, dry_run=True)
    assert again != name


def test_several_nodes_as_a_pytorchjob(monkeypatch):
    op, context = train_task(monkeypatch, RETRAIN_TRAIN_NODES="4", RETRAIN_GPU_COUNT="8", RETRAIN_TRAIN_LAUNCHER="pytorchjob")
    assert isinstance(op, PyTorchJobStageOperator)
    name, (job,) = op.render_attempt(context, dry_run=True)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == name and job["metadata"]["labels"]["retrain/attempt"] == name
    spec = job["spec"]
    assert spec["runPolicy"] == {"backoffLimit": 0, "cleanPodPolicy": "None"} and spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    template = replicas["Master"]["template"]
    assert replicas["Master"]["restartPolicy"] == "Never"
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", **template}, K8S_VERSION, strict=True)
    pytorch = template["spec"]["containers"][0]
    assert pytorch["name"] == "pytorch"  # the container the Training Operator configures
    assert pytorch["ports"] == [{"name": "pytorchjob-port", "containerPort": stages.RENDEZVOUS_PORT}]
    assert pytorch["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pytorch["command"] == stages.command("train", nproc_per_node=8, nnodes=4,
                                                rdzv_endpoint=f"{name}-master-0:29400", rdzv_id=name)
    assert json.dumps(template).count("airflow-xcom-sidecar") >= 1


def test_cpu_nodes_run_one_process_each_off_the_gpu_pool(monkeypatch):
    op, context = train_task(monkeypatch, RETRAIN_TRAIN_NODES="2", RETRAIN_GPU_COUNT="0")
    _, (_, job) = op.render_attempt(context, dry_run=True)
    template = as_dict(job)["spec"]["template"]["spec"]
    base = template["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(base["resources"]) and not template.get("tolerations")
    assert base["command"][base["command"].index("--nproc-per-node") + 1] == "1"
    assert op.pool == "default_pool"


def selects(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy's ``podSelector`` (``matchLabels`` only, as the project's use) matches these labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_the_network_policies_let_a_run_s_train_pods_reach_each_other_and_nothing_else(job_attempt):
    """The namespace denies ingress by default: the rendezvous, the store and gloo/NCCL need a policy of their own."""
    _, _, _, job = job_attempt
    train = job["spec"]["template"]["metadata"]["labels"]
    policies = [d for d in kustomize(GPU_OVERLAY) if d["kind"] == "NetworkPolicy"]
    applying = [p for p in policies if selects(p["spec"]["podSelector"], train)]
    assert {p["metadata"]["name"] for p in applying} == {"default-deny-ingress", "train-ranks-ingress"}
    allowed = [rule for p in applying for rule in p["spec"].get("ingress", [])]
    assert allowed and all("ports" not in rule for rule in allowed)  # every port: the store's and NCCL's are picked at run time
    assert all(selects(peer["podSelector"], train) for rule in allowed for peer in rule["from"])
    serving = {"app.kubernetes.io/name": "embedder-serving"}
    assert not any(selects(peer["podSelector"], serving) for rule in allowed for peer in rule["from"])
