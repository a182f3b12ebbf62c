"""The Kubernetes rollout against the API emulator's fake Deployment controller."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from retrain import rollout
from retrain.settings import Settings
from tests.support.kube_emulator import KubeEmulator

K8S = Path(__file__).resolve().parents[2] / "k8s"


def serving_deployment() -> dict:
    out = subprocess.run([str(Path(sys.executable).with_name("kubectl")), "kustomize", str(K8S / "overlays" / "gpu")],
                         capture_output=True, text=True, check=True).stdout
    return next(d for d in yaml.safe_load_all(out) if d["kind"] == "Deployment")


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
                                   deploy_timeout_s=10, deploy_poll_s=0.1)
    yield emulator, deployment, settings
    emulator.stop()


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
