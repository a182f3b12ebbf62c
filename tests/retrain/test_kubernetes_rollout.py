"""What serves on Kubernetes: the deploy step against the API emulator, whose pods run the real serving process.

The manifests are applied with the real ``kubectl apply -k`` (a user's overlay of ``k8s/overlays/local``);
the emulator's Deployment controller keeps ReplicaSets and revisions, its kubelet runs each serving pod as
``python -m embedder.serving`` with the pod's environment and probes its readiness, and its Services send each
request to a ready pod's process, so a client of the serving Service sees what it would see in a cluster. The
real kubectl judges: ``rollout status``, ``rollout history``, ``rollout undo``. (The emulator serves no OpenAPI
document, so kubectl's client-side validation is off; the manifests are checked against the 1.37 schemas in
tests/k8s.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from kubernetes import client as k8s
from kubernetes import config
from mlflow import MlflowClient

from retrain import rollout
from retrain.rollout import ownership
from retrain.rollout.argo import ArgoServing
from retrain.rollout.history import serving_experiment
from retrain.rollout.kubernetes import KubernetesServing
from retrain.rollout.targets import RolloutFailed
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract.registry import CHAMPION, alias_version
from retrain_contract.results import PromoteResult
from retrain_contract.serving import Pin
from tests.conftest import SERVING_MODEL
from tests.helpers import KUBECTL, kustomize
from tests.support.kube import KubeEmulator, rbac_rules
from tests.support.load import Load, interleavings, versions_in_order
from tests.support.models import register_unloadable

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]
MODEL = SERVING_MODEL
REPO = Path(__file__).resolve().parents[2]
NS, SERVING, PREVIEW = "retrain", "embedder-serving", "embedder-serving-preview"


def promotion(version: str, previous: str | None) -> dict:
    return PromoteResult(model_name=MODEL, version=version, promoted=True, reason="test", previous_champion=previous,
                         champion=version, recall_at_1=0.9, dataset_version="test-data").to_json()


class Cluster:
    """The emulator with the project's manifests applied by kubectl, and the deploy step's settings and clients."""

    def __init__(self, home: Path, mlflow_url: str, digits: Path, argo: bool = False):
        self.home, self.mlflow_url, self.digits = home, mlflow_url, digits
        self.images = [(p.name, p.read_bytes()) for p in sorted(digits.rglob("*.png"))]
        self.emulator = KubeEmulator(home, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}).start()
        self.emulator.controller_delay = 0.05
        self.emulator.hpa_replicas = 2
        if argo:
            self.emulator.install_argo_rollouts()
        self.kubeconfig = self.emulator.kubeconfig(home / "operator-kubeconfig", user="operator")
        self.overlay = home / "overlay"
        self.overlay.mkdir()
        # A user's overlay: this cluster's MLflow, every answered request mirrored, one torch thread a pod.
        (self.overlay / "kustomization.yaml").write_text(json.dumps({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(REPO / "k8s" / "overlays" / "local", self.overlay)],
            "components": [os.path.relpath(REPO / "k8s" / "components" / "argo-rollouts", self.overlay)] if argo else [],
            "configMapGenerator": [{"name": "serving-config", "behavior": "merge", "literals": [
                f"MLFLOW_TRACKING_URI={mlflow_url}", "SERVING_MIRROR_RATE=1.0", "SERVING_THREADS=1"]}]}))
        applied = self.kubectl("apply", "--validate=false", "-k", str(self.overlay))
        assert applied.returncode == 0, applied.stderr
        self.env = {"RETRAIN_HOME": str(home), "RETRAIN_RUNNER": "kubernetes", "MLFLOW_TRACKING_URI": mlflow_url,
                    "RETRAIN_MODEL_NAME": MODEL, "RETRAIN_EXPERIMENT": f"{MODEL}-{home.name}",
                    "RETRAIN_SERVING_URL": self.emulator.service_url(NS, SERVING),
                    "RETRAIN_SERVING_PREVIEW_URL": self.emulator.service_url(NS, PREVIEW),
                    "RETRAIN_ANALYSIS_MIN_IMAGES": "16", "RETRAIN_ANALYSIS_WINDOW_S": "3",
                    "RETRAIN_ANALYSIS_LATENCY_FLOOR_MS": "20", "RETRAIN_ANALYSIS_POLL_S": "0.2",
                    "RETRAIN_SCALE_DOWN_DELAY_S": "1", "RETRAIN_DEPLOY_POLL_S": "0.1", "RETRAIN_DEPLOY_TIMEOUT_S": "180",
                    "RETRAIN_SERVING_ROLLOUT": "argo" if argo else "deployments"}
        self.settings = Settings.from_env(self.env)
        self.client = MlflowClient(mlflow_url)
        api = config.new_client_from_config(str(self.emulator.kubeconfig(home / "worker-kubeconfig")))
        self.target = (ArgoServing if argo else KubernetesServing).from_settings(self.settings)
        self.target._apps, self.target._core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)

    def kubectl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "-n", NS, *args], capture_output=True,
                              text=True, timeout=120)

    def deploy(self, version: str, run_id: str, previous: str | None = None) -> dict:
        self.client.set_registered_model_alias(MODEL, CHAMPION, version)  # what promote does before deploy
        return rollout.roll_out_champion(self.settings, promotion(version, previous), run_id, self.client, self.target,
                                         replay_images=lambda n: self.images[:n])

    def served(self) -> str | None:
        return requests.get(f"{self.settings.serving_url}/metadata", timeout=10).json().get("model_version")

    def stable_version(self) -> str | None:
        env = self.emulator.deployment(NS, SERVING)["spec"]["template"]["spec"]["containers"][0].get("env") or []
        return next((e["value"] for e in env if e["name"] == "MODEL_VERSION"), None)

    def alerts(self) -> list[dict]:
        path = Path(self.settings.alert_file)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def serving_runs(self, outcome: str) -> list:
        exp = self.client.get_experiment_by_name(serving_experiment(self.settings))
        return [] if exp is None else self.client.search_runs([exp.experiment_id], f"tags.`serving.outcome` = '{outcome}'")


def deploy_under_load(cluster: Cluster) -> tuple[Load, dict]:
    """Version 1 served, then version 2 deployed while three clients post through the Service: zero failed
    requests, and no client got version 1 after any client had version 2."""
    cluster.deploy("1", "r1")
    assert cluster.served() == "1"
    test_images = sorted(cluster.digits.rglob("*.png"))
    with Load(cluster.settings.serving_url, test_images, clients=3) as load:
        poll(lambda: load.count("1") >= 20, timeout_s=60, interval_s=0.05, what="traffic on version 1")
        result = cluster.deploy("2", "r2", previous="1")
        poll(lambda: load.count("2") >= 20, timeout_s=60, interval_s=0.05, what="traffic on version 2")
    assert [a for a in load.answers if a.status != 200] == []
    assert interleavings(load.answers, "1", "2") == []
    return load, result


def answers(url: str) -> int | None:
    """The status ``url`` answers with, or None while nothing listens."""
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return None


@pytest.fixture
def cluster(tmp_path, mlflow_server, serving_models, clean_vetoes, digits_root):
    running = Cluster(tmp_path, mlflow_server, digits_root / "test")
    yield running
    running.emulator.stop()


def test_the_manifests_never_change_what_serves_history_tells_the_story_and_an_undo_is_a_veto(cluster):
    # A fresh install serves nothing and says why.
    cluster.emulator.wait(lambda e: len([p for p in e.pods() if p["status"].get("phase") == "Running"]) == 3,
                          what="the stable pods and the idle preview pod running")
    pod = next(p for p in cluster.emulator.pods() if p["metadata"]["labels"]["retrain/track"] == "stable")
    port = cluster.emulator.kubelet.port(NS, pod["metadata"]["name"], 8080)
    poll(lambda: answers(f"http://127.0.0.1:{port}/readyz") == 503, timeout_s=120, interval_s=0.2,
         what="the serving process up")
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["reason"] == \
        "no model version pinned yet: nothing has been deployed"
    assert requests.get(f"{cluster.settings.serving_url}/readyz", timeout=10).status_code == 503  # no ready endpoint

    first = cluster.deploy("1", "scheduled__r1")
    assert first["model_version"] == "1" and first["analysis"] is None  # nothing served before: nothing to compare
    second = cluster.deploy("2", "manual__r2", previous="1")
    assert second["analysis"]["passed"] and second["model_version"] == "2" and cluster.served() == "2"
    assert cluster.stable_version() == "2"
    endpoints = cluster.emulator.endpoints(NS, SERVING)
    assert len(endpoints) == 2 and all(name.startswith(f"{SERVING}-") and PREVIEW not in name for name in endpoints)
    assert cluster.emulator.get("deployments", PREVIEW)["spec"]["replicas"] == 0

    # The HPA owns the replicas; re-applying the manifests changes neither them nor the version that serves.
    cluster.emulator.hpa_replicas = 3
    cluster.emulator.wait(lambda e: e.deployment(NS, SERVING)["spec"]["replicas"] == 3, what="the HPA's 3 replicas")
    revision = cluster.emulator.deployment(NS, SERVING)["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
    again = cluster.kubectl("apply", "--validate=false", "-k", str(cluster.overlay))
    assert again.returncode == 0, again.stderr
    assert "deployment.apps/embedder-serving unchanged" in again.stdout
    live = cluster.emulator.deployment(NS, SERVING)
    assert live["spec"]["replicas"] == 3 and cluster.stable_version() == "2"
    assert live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == revision
    assert cluster.emulator.get("services", SERVING)["spec"]["selector"]["retrain/track"] == "stable"
    status = cluster.kubectl("rollout", "status", "deployment/embedder-serving", "--timeout=120s")
    assert status.returncode == 0 and "successfully rolled out" in status.stdout
    assert cluster.served() == "2"

    # kubectl rollout history tells which model each revision served, from which run.
    history = cluster.kubectl("rollout", "history", "deployment/embedder-serving")
    assert history.returncode == 0, history.stderr
    assert f"model {MODEL} version 1 from Airflow run scheduled__r1: recall_at_1=0.9000" in history.stdout
    assert f"model {MODEL} version 2 from Airflow run manual__r2: recall_at_1=0.9000" in history.stdout

    # The operator undoes the promotion: version 1 serves again, by hand.
    undo = cluster.kubectl("rollout", "undo", "deployment/embedder-serving")
    assert undo.returncode == 0 and "rolled back" in undo.stdout, undo.stderr
    assert cluster.kubectl("rollout", "status", "deployment/embedder-serving", "--timeout=180s").returncode == 0
    poll(lambda: cluster.served() == "1", timeout_s=60, interval_s=0.2, what="version 1 serving after the undo")

    # The next forced run notices it, says why, alerts once, and puts nothing vetoed back into service.
    noticed = ownership.reconcile(cluster.settings, cluster.client, cluster.target, "manual__r3")
    assert noticed.vetoed == "2" and noticed.serving == noticed.champion == "1"
    assert f"{MODEL} version 2, which the system put into service (run manual__r2), was taken out of service by hand" \
        in noticed.notes[0]
    assert alias_version(cluster.client, MODEL, CHAMPION) == "1"
    assert [a["kind"] for a in cluster.alerts()] == ["veto"]
    operator = cluster.serving_runs("operator")
    assert [(r.data.tags["serving.model_version"], r.data.tags["serving.by"]) for r in operator] == [("1", "operator")]
    tie = rollout.roll_out_champion(cluster.settings, promotion("2", "1"), "manual__r3", cluster.client, cluster.target)
    assert tie["model_version"] == "1" and not tie["changed"] and "not put into service" in tie["note"]
    assert cluster.served() == "1" and cluster.stable_version() == "1"
    assert len(cluster.alerts()) == 1


def test_a_deploy_and_a_switch_back_under_client_load_through_the_service(cluster):
    load, result = deploy_under_load(cluster)
    test_images = sorted(cluster.digits.rglob("*.png"))
    for c in range(3):
        assert versions_in_order([a for a in load.answers if a.client == c]) == ["1", "2"]
    verdict = result["analysis"]
    assert verdict["passed"] and verdict["replayed"] == 0  # the stable pods mirrored live requests to the preview

    # A switch back while the old version is warm: the same, the other way.
    new, old = Pin(MODEL, "1"), Pin(MODEL, "2")
    cluster.target.start_preview(new, "test", "r3")
    poll(lambda: cluster.target.preview_status(new)[0], timeout_s=120, interval_s=0.2, what="the preview")
    with Load(cluster.settings.serving_url, test_images, clients=3) as load:
        poll(lambda: load.count("2") >= 20, timeout_s=60, interval_s=0.05, what="traffic")
        mark = cluster.target.read().mark
        cluster.target.switch(new, "switch by test", mark, warm_s=600)
        poll(lambda: load.count("1") >= 20, timeout_s=60, interval_s=0.05, what="traffic after the switch")
        cluster.target.switch_back(old, "switch back by test", mark)
        seen = load.count("2")
        poll(lambda: load.count("2") >= seen + 20, timeout_s=60, interval_s=0.05, what="traffic after the switch back")
    assert [a for a in load.answers if a.status != 200] == []
    for c in range(3):
        assert versions_in_order([a for a in load.answers if a.client == c]) == ["2", "1", "2"]


def test_the_api_server_failing_the_switch_is_retried_without_a_second_rollout(cluster):
    cluster.deploy("1", "r1")
    created = len(cluster.emulator.created)
    # The switch is one patch of the Service: the API server fails it on every attempt the step makes.
    cluster.emulator.fail_next_request("PATCH", f"/services/{SERVING}", times=3)
    with pytest.raises(k8s.ApiException) as failed:  # not a verdict: Airflow retries the task
        cluster.deploy("2", "r2", previous="1")
    assert failed.value.status == 503 and not isinstance(failed.value, RolloutFailed)
    assert cluster.served() == "1"
    previews = [p for p in cluster.emulator.created[created:] if p["metadata"]["labels"]["retrain/track"] == "preview"]
    result = cluster.deploy("2", "r2", previous="1")  # the retry
    assert result["model_version"] == "2" and cluster.served() == "2"
    again = [p for p in cluster.emulator.created[created:] if p["metadata"]["labels"]["retrain/track"] == "preview"]
    assert len(again) == len(previews)  # the preview was not started again
    # nor judged again: its analysis passed before the switch failed (by now the preview runs at full size)
    analyses = [r for r in cluster.serving_runs("analysis") if r.data.tags["airflow.run_id"] == "r2"]
    assert len(analyses) == 1 and result["analysis_run_id"] == analyses[0].info.run_id
    assert alias_version(cluster.client, MODEL, CHAMPION) == "2" and cluster.alerts() == []
    assert [r.data.tags["serving.model_version"] for r in cluster.serving_runs("rolled_out")] == ["2", "1"]


def test_a_preview_that_never_gets_ready_is_rejected_and_nothing_changes_for_clients(cluster):
    cluster.deploy("1", "r1")
    cluster.settings = Settings.from_env({**cluster.env, "RETRAIN_DEPLOY_TIMEOUT_S": "20"})
    broken = register_unloadable(cluster.client, MODEL, cluster.home)
    started = time.monotonic()
    with pytest.raises(RolloutFailed, match=f"the preview of {MODEL} version {broken} failed") as failed:
        cluster.deploy(broken, "r2", previous="1")
    assert time.monotonic() - started < 60
    assert failed.value.gate == "preview" and failed.value.alerted
    assert cluster.served() == "1" and alias_version(cluster.client, MODEL, CHAMPION) == "1"
    assert cluster.emulator.get("deployments", PREVIEW)["spec"]["replicas"] == 0
    assert [a["kind"] for a in cluster.alerts()] == ["analysis"]
    assert [r.data.tags["serving.model_version"] for r in cluster.serving_runs("rejected")] == [broken]


@pytest.fixture
def argo_cluster(tmp_path, mlflow_server, serving_models, clean_vetoes, digits_root):
    running = Cluster(tmp_path, mlflow_server, digits_root / "test", argo=True)
    yield running
    running.emulator.stop()


def test_with_argo_rollouts_the_rollout_switches_at_once_and_an_undo_is_a_veto(argo_cluster):
    """k8s/components/argo-rollouts: the same deploy step drives a blue-green Rollout (against the emulator's Argo
    controller, written from Argo Rollouts' documented behaviour): preview ReplicaSet paused for promotion, the
    analysis on mirrored live traffic, promotion, the serving Service switched at once; an undo is a veto."""
    cluster = argo_cluster
    load, result = deploy_under_load(cluster)
    for c in range(3):
        assert versions_in_order([a for a in load.answers if a.client == c]) == ["1", "2"]
    assert result["analysis"]["passed"] and result["analysis"]["replayed"] == 0
    rollout_obj = cluster.emulator.get("rollouts", SERVING)
    stable = rollout_obj["status"]["stableRS"]
    service = cluster.emulator.get("services", SERVING)
    assert service["spec"]["selector"]["rollouts-pod-template-hash"] == stable  # Argo's switch
    history = cluster.kubectl("rollout", "history", "deployment/embedder-serving")
    assert f"model {MODEL} version 2 from Airflow run r2" in history.stdout
    assert cluster.emulator.get("deployments", SERVING)["spec"]["replicas"] == 0  # the Rollout runs the pods

    # The operator takes version 2 out (its template back, while version 1's ReplicaSet is still warm).
    undo = cluster.kubectl("rollout", "undo", "deployment/embedder-serving")
    assert undo.returncode == 0, undo.stderr
    poll(lambda: cluster.served() == "1", timeout_s=60, interval_s=0.2, what="version 1 serving after the undo")
    noticed = ownership.reconcile(cluster.settings, cluster.client, cluster.target, "r3")
    assert noticed.vetoed == "2" and noticed.serving == noticed.champion == "1"
    assert [a["kind"] for a in cluster.alerts()] == ["veto"]
    granted = rbac_rules(kustomize(cluster.overlay), "airflow-worker")
    assert cluster.emulator.verbs() - {("get", "version")} <= granted  # the component's Role covers what was called
