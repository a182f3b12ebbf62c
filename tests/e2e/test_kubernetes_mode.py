"""Kubernetes mode end to end: the DAG runs through Airflow, each stage a KubernetesPodOperator pod
created on the in-process API emulator, whose fake kubelet runs the stage's real command.

The emulator (tests/support/kube/) is the suite's test double for a Kubernetes API server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from localdev.stack import LocalStack
from retrain import links
from retrain.settings import Settings
from retrain_contract.registry import alias_version
from tests.helpers import GPU_OVERLAY, LOCAL_OVERLAY, kustomize
from tests.support.kube import KubeEmulator, rbac_rules

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]
MODEL = "k8s-embedder"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_server, digits_root):
    home = tmp_path_factory.mktemp("k8s-home")
    env = {
        "RETRAIN_RUNNER": "kubernetes",
        "RETRAIN_HOME": str(home),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "RETRAIN_DATA_URI": digits_root.as_uri(),
        "RETRAIN_STORAGE_URI": (home / "storage").as_uri(),
        "RETRAIN_MODEL_NAME": MODEL,
        "RETRAIN_EXPERIMENT": MODEL,
        "RETRAIN_TASK_RETRIES": "0",
        "RETRAIN_POD_STARTUP_TIMEOUT_S": "8",
        # The serving pods get no client traffic here: the analysis replays held-out images after 2 s.
        "RETRAIN_ANALYSIS_WINDOW_S": "2", "RETRAIN_ANALYSIS_MIN_IMAGES": "16", "RETRAIN_SCALE_DOWN_DELAY_S": "1",
        "RETRAIN_DEPLOY_POLL_S": "0.2",
    }
    emulator = KubeEmulator(home, env={**os.environ, **env}).start()
    emulator.apply(serving_objects(mlflow_server))
    env["RETRAIN_SERVING_URL"] = emulator.service_url("retrain", "embedder-serving")  # the deploy task's smoke test
    env["RETRAIN_SERVING_PREVIEW_URL"] = emulator.service_url("retrain", "embedder-serving-preview")
    emulator.gpus = 1
    emulator.add_secret("retrain", "retrain-s3", {"AWS_ACCESS_KEY_ID": "emulated", "AWS_SECRET_ACCESS_KEY": "emulated"})
    emulator.add_secret("retrain", "retrain-mlflow", {})
    settings = Settings.from_env(env)
    airflow_env = LocalStack(settings, {**os.environ, **env}).airflow_env()
    airflow_env["AIRFLOW_CONN_KUBERNETES_DEFAULT"] = json.dumps({"conn_type": "kubernetes", "extra": {
        "kube_config_path": str(emulator.kubeconfig(home / "kubeconfig")), "in_cluster": False}})
    for cmd in (["db", "migrate"], ["pools", "set", "gpu", "1", "GPU pods"]):
        subprocess.run([AIRFLOW, *cmd], env=airflow_env, check=True, capture_output=True, timeout=300)

    try:
        yield emulator, settings, airflow_env
    finally:
        emulator.stop()


def is_stage(pod: dict) -> bool:
    """A stage's pod (not a serving pod of the Deployments the deploy task drives)."""
    return "retrain/stage" in pod["metadata"]["labels"]


def serving_objects(mlflow_url: str) -> list[dict]:
    """The serving Deployments, Services, HPA and ConfigMap of the local overlay, the serving pods on this MLflow."""
    docs = [d for d in kustomize(LOCAL_OVERLAY) if d["kind"] in ("Deployment", "Service", "HorizontalPodAutoscaler")
            or d["metadata"]["name"].startswith("serving-config")]
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            doc["data"].update(MLFLOW_TRACKING_URI=mlflow_url, SERVING_THREADS="1")
    return docs


def dag_test(airflow_env: dict, conf: dict, **extra: str) -> tuple[str, str]:
    proc = subprocess.run([AIRFLOW, "dags", "test", "retrain_embedder", "--conf", json.dumps(conf)],
                          env={**airflow_env, **extra}, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    state = re.search(r"DagRun Finished: .*?state=(\w+)", out)
    assert state, out[-5000:]
    return state.group(1), out


def test_every_stage_runs_as_a_pod_and_xcom_flows(cluster):
    emulator, settings, airflow_env = cluster
    emulator.fail_next(2, 503)  # the first API calls of the run fail; KPO retries them
    state, out = dag_test(airflow_env, {"epochs": 1, "image_size": 32, "batch_size": 32})
    assert state == "success", out[-6000:]
    assert emulator.faults_pending == 0
    created = {p["metadata"]["labels"]["retrain/stage"]: p for p in emulator.created if is_stage(p)}
    assert set(created) == {"prepare_data", "train", "evaluate"}
    train = created["train"]["spec"]
    assert train["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert created["evaluate"]["spec"]["containers"][0]["args"][1].endswith("/manifest.json")  # XCom from prepare_data
    assert "[base]" in out and "result written to" in out  # the stage's own log is in the task log
    assert [p for p in emulator.pods() if is_stage(p)] == []  # succeeded pods are deleted
    client = MlflowClient(settings.tracking_uri)
    assert alias_version(client, MODEL, "champion") == "1" == alias_version(client, MODEL, "challenger")
    assert client.get_model_version(MODEL, "1").tags["promotion.decision"] == "promoted"
    serving = emulator.deployment("retrain", "embedder-serving")  # deploy pinned the serving Deployment
    env = {e["name"]: e["value"] for e in serving["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["MODEL_NAME"], env["MODEL_VERSION"]) == (MODEL, "1")
    assert f"model {MODEL} version 1 from Airflow run manual__" in serving["metadata"]["annotations"][
        "kubernetes.io/change-cause"]
    served = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()  # the real serving pods, via the Service
    assert (served["model_name"], served["model_version"], served["embedding_dim"]) == (MODEL, "1", 2048)
    # The worker resolved the train pod's extra link from the pod's result, as in local mode.
    result, link = (latest_xcom(settings, "train", key) for key in ("return_value", links.MLFLOW_RUN.xcom_key))
    assert link == f"{settings.tracking_uri}/#/experiments/{result['mlflow_experiment_id']}/runs/{result['mlflow_run_id']}"


def latest_xcom(settings, task_id: str, key: str):
    """An XCom as the worker stored it in the metadata database (what the API server serves)."""
    import sqlite3

    with sqlite3.connect(settings.home / "airflow" / "airflow.db") as db:
        (value,) = db.execute("select value from xcom where dag_id = 'retrain_embedder' and task_id = ? and key = ? "
                              "order by timestamp desc limit 1", (task_id, key)).fetchone()
    return json.loads(value)


def test_a_failing_stage_keeps_its_pod_and_its_log(cluster, tmp_path):
    emulator, settings, airflow_env = cluster
    missing = (tmp_path / "missing").as_uri()
    state, out = dag_test(airflow_env, {"force_retrain": True}, RETRAIN_DATA_URI=missing)
    assert state == "failed"
    assert f"data root {missing}: not a directory" in out  # the pod's log, in the task log
    assert "rejected its input (exit code 2); not retrying" in out
    kept = [p for p in emulator.pods() if p["metadata"]["labels"].get("retrain/stage") == "prepare_data"]
    assert len(kept) == 1 and kept[0]["status"]["phase"] == "Failed"
    assert kept[0]["metadata"]["labels"]["already_checked"] == "True"
    assert len(MlflowClient(settings.tracking_uri).search_model_versions(f"name = '{MODEL}'")) == 1


def test_unschedulable_gpu_pod_fails_within_the_startup_timeout_and_is_removed(cluster):
    emulator, _, airflow_env = cluster
    emulator.gpus = 0
    try:
        started = time.monotonic()
        state, out = dag_test(airflow_env, {"force_retrain": True, "epochs": 1, "image_size": 32})
        elapsed = time.monotonic() - started
    finally:
        emulator.gpus = 1
    assert state == "failed"
    assert "Insufficient nvidia.com/gpu" in out
    assert elapsed < 120, elapsed  # prepare_data plus an 8 s start-up timeout, not a hang
    assert not [p for p in emulator.pods() if p["metadata"]["labels"].get("retrain/stage") == "train"]  # no leaked pod


def test_deferrable_mode_runs_the_stages_through_the_triggerer(cluster):
    emulator, settings, airflow_env = cluster
    before = len(emulator.created)
    state, out = dag_test(airflow_env, {"force_retrain": True, "epochs": 1, "image_size": 32, "batch_size": 32},
                          RETRAIN_DEFERRABLE="true")
    assert state == "success", out[-6000:]
    assert [p["metadata"]["labels"]["retrain/stage"] for p in emulator.created[before:] if is_stage(p)] == [
        "prepare_data", "train", "evaluate"]
    assert "KubernetesPodTrigger" in out
    version = MlflowClient(settings.tracking_uri).get_model_version(MODEL, "2")
    assert version.tags["champion.version"] == "1"  # evaluated against the champion on the same snapshot


def test_a_preempted_train_pod_is_rescheduled_in_the_same_try_and_resumes(cluster):
    """A node shutdown mid-training: SIGTERM, checkpoint, exit 75; a new pod in the same try resumes it."""
    emulator, settings, airflow_env = cluster
    before = len(emulator.created)
    checkpoints = settings.home / "storage" / "checkpoints" / "retrain_embedder"
    earlier_runs = set(checkpoints.glob("*"))
    proc = subprocess.Popen([AIRFLOW, "dags", "test", "retrain_embedder", "--conf", json.dumps(
        {"force_retrain": True, "epochs": 3, "image_size": 32, "batch_size": 32})],
        env={**airflow_env, "RETRAIN_PREEMPTION_DELAY_S": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline = time.monotonic() + 600
    while not {p.parent for p in checkpoints.glob("*/ckpt-*.pt")} - earlier_runs:  # this run's first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-6000:]
        time.sleep(0.1)
    first = next(p for p in emulator.created[before:] if p["metadata"]["labels"].get("retrain/stage") == "train")
    emulator.preempt("retrain", first["metadata"]["name"])
    out = proc.communicate(timeout=900)[0]
    assert re.search(r"DagRun Finished: .*?state=success", out), out[-8000:]

    pods = [p for p in emulator.created[before:] if p["metadata"]["labels"].get("retrain/stage") == "train"]
    assert len(pods) == 2
    assert [p["metadata"]["labels"]["try_number"] for p in pods] == ["1", "1"]  # no retry was used up
    assert "was preempted (the stage saved a checkpoint on SIGTERM and exited 75)" in out
    assert "Rescheduling task, marking task as UP_FOR_RESCHEDULE" in out
    kept = next(p for p in emulator.pods() if p["metadata"]["name"] == first["metadata"]["name"])
    assert kept["status"]["phase"] == "Failed"  # kept, like any pod that did not succeed
    assert any(c["type"] == "DisruptionTarget" for c in kept["status"]["conditions"])
    second = emulator.logs_of("retrain", pods[1]["metadata"]["name"])
    assert "resuming from" in second and "resume #1" in second


def train_pods(emulator: KubeEmulator, since: int) -> list[dict]:
    return [p for p in emulator.created[since:] if p["metadata"]["labels"].get("retrain/stage") == "train"]


def node_of(pod: dict) -> str:
    return pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]


def test_two_train_nodes_rendezvous_a_preempted_worker_resumes_and_the_run_promotes_and_deploys(cluster):
    """RETRAIN_TRAIN_NODES=2: train as an Indexed Job of 2 pods whose ranks rendezvous (c10d, gloo on loopback).

    The index-1 pod's node shuts down mid-epoch: the Job goes, a new one in the same try resumes from the
    checkpoint, and the run promotes and deploys (one DAG run shows all of it: each costs a minute of training).
    """
    emulator, settings, airflow_env = cluster
    before, model = len(emulator.created), f"{MODEL}-2-nodes"  # a registry of its own: its first version is promoted
    checkpoints = settings.home / "storage" / "checkpoints" / "retrain_embedder"
    earlier_runs = set(checkpoints.glob("*"))
    proc = subprocess.Popen([AIRFLOW, "dags", "test", "retrain_embedder", "--conf", json.dumps(
        {"force_retrain": True, "epochs": 1, "image_size": 32, "batch_size": 16})],  # preempted mid-epoch, at step 2
        env={**airflow_env, "RETRAIN_TRAIN_NODES": "2", "RETRAIN_MODEL_NAME": model,
             "RETRAIN_PREEMPTION_DELAY_S": "1", "RETRAIN_CHECKPOINT_EVERY_STEPS": "2"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not {p.parent for p in checkpoints.glob("*/ckpt-*.pt")} - earlier_runs:  # this run's first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-6000:]
        time.sleep(0.1)
    first = sorted(train_pods(emulator, before), key=node_of)
    assert [node_of(p) for p in first] == ["0", "1"]
    emulator.preempt("retrain", first[1]["metadata"]["name"])
    out = proc.communicate(timeout=900)[0]
    assert re.search(r"DagRun Finished: .*?state=success", out), out[-8000:]

    pods = train_pods(emulator, before)
    attempts = list(dict.fromkeys(p["metadata"]["labels"]["retrain/attempt"] for p in pods))
    assert len(attempts) == 2 and len(pods) == 4
    for attempt in attempts:
        assert f"running train as Job {attempt} on 2 nodes, world size 2 (processes per node: 1)" in out
    assert {p["metadata"]["labels"]["try_number"] for p in pods} == {"1"}  # no retry was used up
    assert f"Job {attempts[0]} was preempted" in out
    assert "Rescheduling task, marking task as UP_FOR_RESCHEDULE" in out
    second = [emulator.logs_of("retrain", p["metadata"]["name"]) for p in pods[2:]]
    assert any("resuming from" in log and "resume #1" in log for log in second)
    assert "rank 0's result came from pod" in out and "[base]" in out  # the leader's log, in the task log
    assert emulator.objects("jobs") == []  # deleted with their pods, and the headless Services with them
    assert {svc["metadata"]["name"] for svc in emulator.objects("services")} == {"embedder-serving",
                                                                                 "embedder-serving-preview"}
    assert not [p for p in emulator.pods() if p["metadata"]["labels"].get("retrain/attempt") in attempts]

    result = latest_xcom(settings, "train", "return_value")
    assert result["resumed"] is True
    client = MlflowClient(settings.tracking_uri)
    assert client.get_run(result["mlflow_run_id"]).data.params["world_size"] == "2"  # both nodes trained
    assert alias_version(client, model, "champion") == "1"
    serving = emulator.deployment("retrain", "embedder-serving")
    env = {e["name"]: e["value"] for e in serving["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["MODEL_NAME"], env["MODEL_VERSION"]) == (model, "1")


def test_role_grants_exactly_what_the_operator_called(cluster):
    emulator, _, _ = cluster
    granted = rbac_rules(kustomize(GPU_OVERLAY), "airflow-worker")
    called = {(verb, res) for verb, res in emulator.verbs() if res != "version"}
    assert called == granted
