"""Kubernetes mode without a cluster: each stage's pod, rendered by KPO itself, checked offline."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import ApiClient

from retrain.runners.common import STAGES
from retrain.settings import PodSettings, Settings, SettingsError

DAGS = Path(__file__).resolve().parents[2] / "dags"
K8S_VERSION = "1.37.0"
SECRET_VALUE = "s3cr3t-value-that-must-never-appear"


class FakeTI:
    dag_id, try_number, map_index = "retrain_embedder", 1, -1

    def __init__(self, task_id: str):
        self.task_id = task_id

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return {"manifest_uri": "s3://data/datasets/abc/manifest.json", "model_uri": "models:/m-1",
                "mlflow_run_id": "r1"}


@pytest.fixture(scope="module")
def pods(tmp_path_factory) -> dict[str, dict]:
    """Every stage's pod as the API server would receive it, from the DAG parsed in kubernetes mode."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RETRAIN_RUNNER", "kubernetes")
    mp.setenv("RETRAIN_STAGE_IMAGE", "registry.example/embedder-trainer@sha256:" + "a" * 64)
    mp.setenv("RETRAIN_GPU_NODE_LABEL", "pool=gpu")
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)  # present in the worker's environment: must not leak
    try:
        dag = DagBag(dag_folder=str(DAGS)).dags["retrain_embedder"]
    finally:
        mp.undo()
    rendered = {}
    for name in STAGES:
        op = dag.get_task(name)
        assert isinstance(op, KubernetesPodOperator)
        context = {"ti": FakeTI(name), "run_id": "scheduled__2026-11-22T02:00:00+00:00", "dag": dag,
                   "params": {k: dag.params[k] for k in dag.params}}
        op.render_template_fields(context)
        rendered[name] = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    return rendered


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_pod_validates_strictly(pods, stage):
    kubernetes_validate.validate(pods[stage], K8S_VERSION, strict=True)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_pod_runs_the_stage_command_with_rendered_arguments(pods, stage):
    base = pods[stage]["spec"]["containers"][0]
    assert base["command"] == ["python", "-m", f"embedder.{stage}"]
    assert not any("{{" in a for a in base["args"])
    assert "--airflow-run-id" in base["args"]
    assert base["image"].endswith("@sha256:" + "a" * 64)


def test_train_pod_lands_on_the_gpu_pool(pods):
    spec = pods["train"]["spec"]
    base = spec["containers"][0]
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": "pool", "operator": "In", "values": ["gpu"]}]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in base["volumeMounts"]


@pytest.mark.parametrize("stage", ["prepare_data", "evaluate"])
def test_cpu_stages_stay_off_the_gpu_pool(pods, stage):
    spec = pods[stage]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(spec["containers"][0]["resources"])
    assert not spec.get("tolerations")
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": "pool", "operator": "NotIn", "values": ["gpu"]}]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_container_meets_the_restricted_profile(pods, stage):
    spec = pods[stage]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    names = [c["name"] for c in spec["containers"]]
    assert names == ["base", "airflow-xcom-sidecar"]  # the sidecar is checked too
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert ctx.get("privileged") in (None, False)
        assert not set(ctx["capabilities"].get("add") or []) - {"NET_BIND_SERVICE"}
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "persistentVolumeClaim"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_credentials_only_from_secrets(pods, stage):
    assert SECRET_VALUE not in json.dumps(pods[stage])
    base = pods[stage]["spec"]["containers"][0]
    assert [e["secretRef"]["name"] for e in base["envFrom"]] == ["retrain-s3", "retrain-mlflow"]
    for env in base["env"]:
        assert not any(word in env["name"].upper() for word in ("SECRET", "PASSWORD", "TOKEN", "KEY")), env


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_pod_labels_and_requests(pods, stage):
    meta = pods[stage]["metadata"]
    assert meta["namespace"] == "retrain"
    labels = meta["labels"]
    assert labels["dag_id"] == "retrain_embedder" and labels["task_id"] == stage
    assert labels["retrain/stage"] == stage and labels["retrain/model"] == "image-embedder"
    assert labels["run_id"].startswith("scheduled__2026-11-22")
    resources = pods[stage]["spec"]["containers"][0]["resources"]
    assert {"cpu", "memory", "ephemeral-storage"} <= resources["requests"].keys()
    assert {"memory", "ephemeral-storage"} <= resources["limits"].keys()
    assert pods[stage]["spec"]["serviceAccountName"] == "retrain-stage"


def test_operational_settings_of_the_operators(monkeypatch):
    monkeypatch.setenv("RETRAIN_RUNNER", "kubernetes")
    monkeypatch.setenv("RETRAIN_DEFERRABLE", "true")
    dag = DagBag(dag_folder=str(DAGS)).dags["retrain_embedder"]
    train = dag.get_task("train")
    assert train.pool == "gpu" and dag.get_task("evaluate").pool == "default_pool"
    for name in STAGES:
        op = dag.get_task(name)
        assert op.on_finish_action.value == "delete_succeeded_pod"  # failed pods are kept for debugging
        assert op.startup_timeout_seconds >= 900 and op.reattach_on_restart and op.deferrable
        assert op.retries >= 1 and op.retry_exponential_backoff


@pytest.mark.parametrize("name,value,message", [
    ("RETRAIN_GPU_NODE_LABEL", "gpu", "must look like key=value"),
    ("RETRAIN_DEFERRABLE", "yes", "must be true or false"),
    ("RETRAIN_GPU_COUNT", "two", "is not a whole number"),
    ("RETRAIN_GPU_COUNT", "1.5", "is not a whole number"),
    ("RETRAIN_GPU_COUNT", "-1", "must be at least 0"),
    ("RETRAIN_TRAIN_NODES", "0", "must be at least 1"),
    ("RETRAIN_TRAIN_LAUNCHER", "mpijob", "set it to one of job, pytorchjob"),
    ("RETRAIN_DEPLOY_TIMEOUT_S", "0", "must be more than 0"),
    ("RETRAIN_RUNNER", "docker", "set it to one of local, kubernetes"),
])
def test_bad_settings_name_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=f"{name}=.*{message}"):
        Settings.from_env({name: value})


def test_gpu_count_zero_runs_training_like_a_cpu_stage(monkeypatch):
    monkeypatch.setenv("RETRAIN_RUNNER", "kubernetes")
    monkeypatch.setenv("RETRAIN_GPU_COUNT", "0")
    op = DagBag(dag_folder=str(DAGS)).dags["retrain_embedder"].get_task("train")
    spec = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(None, dry_run=True))["spec"]
    assert "nvidia.com/gpu" not in json.dumps(spec["containers"][0]["resources"])
    assert not spec.get("tolerations") and op.pool == "default_pool"
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["operator"] == "NotIn"


def test_pod_settings_defaults_are_the_documented_ones():
    pods = Settings.from_env({}).pods
    assert pods == PodSettings()
    assert pods.secrets == ("retrain-s3", "retrain-mlflow") and pods.gpu_count == 1
