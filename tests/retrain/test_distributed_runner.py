"""The train stage's launchers against the Kubernetes emulator, with a probe in the stage's place.

The operators run as the worker runs them (their own API calls, over HTTP, to the emulator), the
emulator's Job controller and kubelet run the pods, and torchrun really rendezvouses (c10d, gloo on
loopback) between the pods' processes. The stage is :mod:`tests.support.ddp_probe`, which keeps the
stage's contract (rank 0's result file, exit 75 on SIGTERM) and takes a second, not minutes; the DAG
with the real train stage on several nodes is tests/e2e/test_kubernetes_mode.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowRescheduleException

from retrain.runners.distributed import distributed_train_operator
from retrain.runners.kubernetes import stage_pod_operator
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract import stages
from tests.helpers import KUBECTL, kustomize
from tests.support.kube import KubeEmulator, rbac_rules

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-11-22T02:00:00+00:00"


class FakeTI:
    dag_id, task_id, map_index = "retrain_embedder", "train", -1

    def __init__(self, try_number: int = 1):
        self.try_number = try_number
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


def context(try_number: int = 1) -> dict:
    return {"ti": FakeTI(try_number), "run_id": RUN_ID, "dag": SimpleNamespace(dag_id="retrain_embedder")}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The emulator, its kubeconfigs, and the probe in the train stage's place in the stage command."""
    real_module = stages.module
    monkeypatch.setattr(stages, "module", lambda stage: "tests.support.ddp_probe" if stage == "train" else real_module(stage))
    emulator = KubeEmulator(tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}).start()
    emulator.gpus = 2
    emulator.add_secret("retrain", "retrain-s3", {})
    emulator.add_secret("retrain", "retrain-mlflow", {})
    worker = emulator.kubeconfig(tmp_path / "worker.kubeconfig")
    operator = emulator.kubeconfig(tmp_path / "operator.kubeconfig", user="operator")
    yield emulator, worker, operator
    emulator.stop()


def train_operator(worker: Path, **env: str):
    settings = Settings.from_env({"RETRAIN_RUNNER": "kubernetes", **env})
    connection = {"kubernetes_conn_id": None, "config_file": str(worker), "in_cluster": False}
    if settings.pods.train_nodes > 1:
        return distributed_train_operator(["--epochs", "1"], settings, poll_interval_s=0.1, **connection)
    return stage_pod_operator("train", ["--epochs", "1"], True, settings, **connection)


def kubectl(kubeconfig: Path, *args: str) -> dict:
    out = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args, "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # the test asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def logs_say(emulator: KubeEmulator, text: str, pods: int) -> bool:
    created = [p["metadata"]["name"] for p in emulator.created]
    return sum(text in emulator.logs_of("retrain", name) for name in created) >= pods


def test_two_nodes_rendezvous_and_rank_0s_result_is_the_xcom(cluster):
    emulator, worker, operator = cluster
    op = train_operator(worker, RETRAIN_TRAIN_NODES="2")
    result = op.execute(context())

    assert result["world_size"] == 2 and result["all_reduced"] == 3.0  # 1 + 2: both ranks took part
    assert result["job_index"] == "0" and result["argv"] == ["--epochs", "1"]
    pods = sorted(emulator.created, key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
    name = pods[0]["metadata"]["labels"]["retrain/attempt"]
    assert [p["spec"]["hostname"] for p in pods] == [f"{name}-0", f"{name}-1"]
    assert {p["spec"]["subdomain"] for p in pods} == {name}
    command = pods[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--rdzv-endpoint") + 1] == f"{name}-0.{name}.retrain.svc.cluster.local:29400"
    assert command[command.index("--rdzv-id") + 1] == name and command[command.index("--nnodes") + 1] == "2"
    logs = [emulator.logs_of("retrain", p["metadata"]["name"]) for p in pods]
    assert "probe rank 0/2 node 0" in logs[0] and "job-index 0" in logs[0]
    assert "probe rank 1/2 node 1" in logs[1] and "all-reduced 3" in logs[1]
    # Success: the Job, its Service and its pods are gone, as kubectl sees it.
    assert kubectl(operator, "get", "jobs,svc,pods")["items"] == []
    granted = rbac_rules(kustomize(), "airflow-worker")
    assert {c for c in emulator.verbs() if c[1] != "version"} <= granted
    assert {("create", "jobs"), ("create", "services"), ("delete", "jobs"), ("delete", "services")} <= emulator.verbs()


def test_a_preempted_worker_pod_reschedules_and_the_next_attempt_starts_afresh(cluster, tmp_path):
    emulator, worker, operator = cluster
    hold = tmp_path / "release"
    emulator.kubelet.env["PROBE_HOLD"] = str(hold)
    op = train_operator(worker, RETRAIN_TRAIN_NODES="2", RETRAIN_PREEMPTION_DELAY_S="0")
    thread, outcome = in_thread(op.execute, context())
    poll(lambda: logs_say(emulator, "holding", 2), timeout_s=120, what="both ranks holding after the all-reduce")

    seen = kubectl(operator, "get", "jobs,svc,pods")["items"]  # the running attempt, as kubectl sees it
    (job,) = [o for o in seen if o["kind"] == "Job"]
    (svc,) = [o for o in seen if o["kind"] == "Service"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0 and job["status"]["active"] == 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"retrain/attempt": job["metadata"]["name"]}
    assert sorted(p["status"]["phase"] for p in seen if p["kind"] == "Pod") == ["Running", "Running"]

    worker_pod = next(p for p in emulator.created if p["metadata"]["annotations"][
        "batch.kubernetes.io/job-completion-index"] == "1")
    emulator.preempt("retrain", worker_pod["metadata"]["name"])
    thread.join(120)
    assert isinstance(outcome.get("error"), AirflowRescheduleException), outcome
    assert emulator.objects("jobs") == [] and emulator.objects("services") == [] and emulator.pods() == []

    hold.touch()
    first = job["metadata"]["name"]
    result = train_operator(worker, RETRAIN_TRAIN_NODES="2").execute(context())
    assert result["world_size"] == 2
    second = {p["metadata"]["labels"]["retrain/attempt"] for p in emulator.created} - {first}
    assert len(second) == 1  # a new attempt, with a rendezvous id of its own


def test_a_failed_rank_fails_the_try_and_keeps_the_job_for_debugging(cluster, tmp_path):
    emulator, worker, _ = cluster
    emulator.kubelet.env.update(PROBE_HOLD=str(tmp_path / "never"), PROBE_EXIT="1:3")
    op = train_operator(worker, RETRAIN_TRAIN_NODES="2")
    with pytest.raises(AirflowException, match=r"pod \S+-1-\w+ \(node 1\) exited 1; Job and pods are kept") as failed:
        op.execute(context())
    assert "probe rank 1/2 node 1" in str(failed.value)  # the failed pod's last lines
    (job,) = emulator.objects("jobs")
    assert [c["type"] for c in job["status"]["conditions"]] == ["FailureTarget", "Failed"]
    assert len(emulator.objects("services")) == 1
    kept = emulator.pods()
    assert [p["status"]["phase"] for p in kept] == ["Failed"]  # the Job controller stopped the rank still running
    assert kept[0]["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"


def test_bad_input_on_any_node_fails_without_retries(cluster, tmp_path):
    emulator, worker, _ = cluster
    emulator.kubelet.env.update(PROBE_HOLD=str(tmp_path / "never"), PROBE_EXIT="1:2")  # node 1's rank: exit 2
    with pytest.raises(AirflowFailException, match=r"rejected its input \(exit code 2\) on pod \S+-1-\w+ \(node 1\)"):
        train_operator(worker, RETRAIN_TRAIN_NODES="2").execute(context())


def create_attempt(emulator: KubeEmulator, worker: Path, try_number: int) -> str:
    """An attempt's objects, created as the train task creates them, and left there (as a worker that died leaves them)."""
    op = train_operator(worker, RETRAIN_TRAIN_NODES="2")
    name, objects = op.render_attempt(context(try_number))
    for obj in objects:
        op.create(obj)
    return name


def test_an_attempt_deletes_earlier_attempts_that_did_not_fail_and_keeps_failed_ones(cluster):
    emulator, worker, _ = cluster
    emulator.kubelet.env["PROBE_EXIT"] = "1:3"
    with pytest.raises(AirflowException, match="kept for debugging"):  # an earlier try that failed
        train_operator(worker, RETRAIN_TRAIN_NODES="2").execute(context(try_number=1))
    (failed,) = [j["metadata"]["name"] for j in emulator.objects("jobs")]
    del emulator.kubelet.env["PROBE_EXIT"]
    emulator.gpus = 0  # these stay Pending: attempts still running when their worker died
    abandoned = create_attempt(emulator, worker, try_number=1)
    preempted = create_attempt(emulator, worker, try_number=2)
    poll(lambda: sum(p["metadata"]["labels"]["retrain/attempt"] in (abandoned, preempted) for p in emulator.pods()) == 4,
         timeout_s=60, what="the abandoned attempts' pods")
    emulator.gpus = 2

    assert train_operator(worker, RETRAIN_TRAIN_NODES="2").execute(context(try_number=2))["world_size"] == 2
    assert [j["metadata"]["name"] for j in emulator.objects("jobs")] == [failed]
    assert {s["metadata"]["name"] for s in emulator.objects("services")} == {failed}
    assert not {abandoned, preempted} & {p["metadata"]["labels"]["retrain/attempt"] for p in emulator.pods()}


def test_two_gpus_in_one_pod_run_two_processes(cluster):
    emulator, worker, _ = cluster
    op = train_operator(worker, RETRAIN_GPU_COUNT="2")
    ti = FakeTI()
    result = op.execute({**context(), "ti": ti})
    assert result["world_size"] == 2 and result["all_reduced"] == 3.0
    (pod,) = emulator.created
    base = pod["spec"]["containers"][0]
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert base["command"] == stages.command("train", nproc_per_node=2)  # the contract's launcher, one node, 2 ranks
    assert base["command"][base["command"].index("--nproc-per-node") + 1] == "2" and "--standalone" in base["command"]
    log = emulator.logs_of("retrain", pod["metadata"]["name"])
    assert "probe rank 0/2 node 0 local 0" in log and "probe rank 1/2 node 0 local 1" in log


def test_two_nodes_as_a_pytorchjob_where_the_training_operator_runs(cluster, tmp_path):
    emulator, worker, _ = cluster
    emulator.install_training_operator()
    result = train_operator(worker, RETRAIN_TRAIN_NODES="2", RETRAIN_TRAIN_LAUNCHER="pytorchjob").execute(context())
    assert result["world_size"] == 2 and result["all_reduced"] == 3.0
    names = sorted(p["metadata"]["name"] for p in emulator.created)
    name = names[0].removesuffix("-master-0")
    assert names == [f"{name}-master-0", f"{name}-worker-0"]
    command = emulator.created[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--rdzv-endpoint") + 1] == f"{name}-master-0:29400"
    master = emulator.logs_of("retrain", f"{name}-master-0")
    assert re.search(r"probe rank \d/2 node \d", master) and "all-reduced 3" in master
    assert emulator.objects("pytorchjobs") == [] and emulator.objects("services") == [] and emulator.pods() == []
    # The Role the kubeflow-training component adds to: exactly what the launcher called on PyTorchJobs.
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(REPO / "k8s" / "overlays" / "gpu", tmp_path / "overlay")],
        "components": [os.path.relpath(REPO / "k8s" / "components" / "kubeflow-training", tmp_path / "overlay")]}))
    granted = rbac_rules(kustomize(tmp_path / "overlay"), "airflow-worker")
    called = {c for c in emulator.verbs() if c[1] != "version"}
    assert called <= granted
    assert {c for c in called if c[1] == "pytorchjobs"} == {c for c in granted if c[1] == "pytorchjobs"}


def test_a_failed_rank_of_a_pytorchjob_stops_the_others_the_operator_leaves_running(cluster, tmp_path):
    """cleanPodPolicy None keeps a failed PyTorchJob's running pods: the task stops them, or they would hold their GPUs."""
    emulator, worker, _ = cluster
    emulator.install_training_operator()
    emulator.kubelet.env.update(PROBE_HOLD=str(tmp_path / "never"), PROBE_EXIT="1:3")  # the Master holds, forever
    with pytest.raises(AirflowException, match=r"pod (\S+)-worker-0 \(node 1\) exited 1; PyTorchJob and pods are kept"):
        train_operator(worker, RETRAIN_TRAIN_NODES="2", RETRAIN_TRAIN_LAUNCHER="pytorchjob").execute(context())
    (job,) = emulator.objects("pytorchjobs")
    assert [c["type"] for c in job["status"]["conditions"]][-1] == "Failed"
    assert [p["metadata"]["name"] for p in emulator.pods()] == [f"{job['metadata']['name']}-worker-0"]


def test_a_pytorchjob_without_the_training_operator_fails_saying_what_to_do(cluster):
    emulator, worker, _ = cluster
    op = train_operator(worker, RETRAIN_TRAIN_NODES="2", RETRAIN_TRAIN_LAUNCHER="pytorchjob")
    with pytest.raises(AirflowFailException, match="install the Kubeflow Training Operator, or set RETRAIN_TRAIN_LAUNCHER=job"):
        op.execute(context())
    assert emulator.created == []
