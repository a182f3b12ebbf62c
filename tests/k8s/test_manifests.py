"""Manifests: every overlay builds with the real kubectl's kustomize and validates strictly."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helpers import K8S, kustomize

OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_and_validates(overlay):
    docs = kustomize(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serving_is_restricted_and_owned_by_the_deploy_step(overlay):
    """Neither the version that serves, nor the replicas, nor the serving Service's track are in the manifests
    (the deploy step and the HPA own them), so re-applying them never changes what serves."""
    docs = kustomize(overlay)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    assert set(deployments) == {"embedder-serving", "embedder-serving-preview"}
    for deployment in deployments.values():
        assert "replicas" not in deployment["spec"]  # the HPA (stable) and the deploy step (preview) own them
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            assert not {e["name"] for e in container.get("env", [])} & {"MODEL_NAME", "MODEL_VERSION"}
            assert "args" not in container  # the server reads MODEL_NAME/MODEL_VERSION from its environment
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    stable, preview = deployments["embedder-serving"], deployments["embedder-serving-preview"]
    track = "retrain/track"
    assert stable["spec"]["template"]["metadata"]["labels"][track] == "stable"
    assert preview["spec"]["template"]["metadata"]["labels"][track] == "preview"
    # One template (one home): the two differ only in their track.
    untracked = [{**d["spec"]["template"], "metadata": {"labels": {k: v for k, v in d["spec"]["template"]["metadata"][
        "labels"].items() if k != track}}} for d in (stable, preview)]
    assert untracked[0] == untracked[1]
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert services["embedder-serving"]["spec"]["selector"] == {"app.kubernetes.io/name": "embedder-serving"}
    assert services["embedder-serving-preview"]["spec"]["selector"][track] == "preview"
    hpa = next(iter(by_kind(docs, "HorizontalPodAutoscaler")))
    assert hpa["spec"]["scaleTargetRef"]["name"] == "embedder-serving"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serving_shutdown_fits_the_grace_period(overlay):
    docs = kustomize(overlay)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]  # (both: one template)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("serving-config"))
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = float(config["data"]["SERVING_SHUTDOWN_TIMEOUT_S"])
    assert pre_stop + shutdown < pod["terminationGracePeriodSeconds"]  # in-flight requests finish before SIGKILL


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_stage_pods_service_account_has_no_rights(overlay):
    docs = kustomize(overlay)
    stage_sa = next(d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "retrain-stage")
    assert stage_sa["automountServiceAccountToken"] is False
    bound = {s["name"] for b in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding") for s in b["subjects"]}
    assert bound == {"airflow-worker"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_no_credentials_in_manifests(overlay):
    docs = kustomize(overlay)
    assert not by_kind(docs, "Secret")  # Secrets are created by the operator of the cluster, not committed
    for cm in by_kind(docs, "ConfigMap"):
        for key in cm["data"]:
            # RETRAIN_STAGE_SECRETS names Secrets; values of credentials never appear here.
            assert not any(w in key.upper() for w in ("PASSWORD", "TOKEN", "ACCESS_KEY", "SECRET_KEY")), key


def settings_of(overlay: Path) -> dict[str, str]:
    configmaps = by_kind(kustomize(overlay), "ConfigMap")
    return next(cm["data"] for cm in configmaps if cm["metadata"]["name"].startswith("retrain-settings"))


def test_overlays_differ_only_in_what_differs():
    local, gpu = (settings_of(K8S / "overlays" / name) for name in ("local", "gpu"))
    differing = {k for k in local.keys() | gpu.keys() if local.get(k) != gpu.get(k)}
    assert differing == {"RETRAIN_STAGE_IMAGE", "RETRAIN_GPU_COUNT", "RETRAIN_GPU_NODE_LABEL", "RETRAIN_POD_STARTUP_TIMEOUT_S"}
    assert local["RETRAIN_GPU_COUNT"] == "0" and gpu["RETRAIN_GPU_COUNT"] == "1"
    assert "@sha256:" in gpu["RETRAIN_STAGE_IMAGE"]


def test_settings_configmap_parses_with_the_settings_object():
    from retrain.settings import Settings

    for overlay in OVERLAYS:
        settings = Settings.from_env(settings_of(overlay))
        assert settings.runner == "kubernetes" and settings.pods.namespace == "retrain"


KUBEFLOW = K8S / "components" / "kubeflow-training"


def with_component(overlay: Path, component: Path, tmp_path: Path) -> list[dict]:
    """What an overlay of the user's renders to with ``component`` added."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(overlay, tmp_path)], "components": [os.path.relpath(component, tmp_path)]}))
    return kustomize(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_kubeflow_component_runs_several_nodes_as_pytorchjobs_and_grants_just_that(overlay, tmp_path):
    from retrain.settings import Settings
    from tests.support.kube import rbac_rules

    docs = with_component(overlay, KUBEFLOW, tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    plain = rbac_rules(kustomize(overlay), "airflow-worker")
    assert not {res for _, res in plain if res == "pytorchjobs"}  # the base needs no operator
    assert rbac_rules(docs, "airflow-worker") - plain == {("create", "pytorchjobs"), ("list", "pytorchjobs"),
                                                          ("delete", "pytorchjobs")}
    config = next(cm["data"] for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].startswith("retrain-settings"))
    assert Settings.from_env(config).pods.train_launcher == "pytorchjob"


ARGO = K8S / "components" / "argo-rollouts"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_argo_component_renders_a_blue_green_rollout_on_the_serving_template(overlay, tmp_path):
    from retrain.settings import Settings
    from tests.support.kube import rbac_rules

    docs = with_component(overlay, ARGO, tmp_path)
    for doc in docs:
        if doc["kind"] != "Rollout":  # the CRD's schema is Argo's, not in the 1.37 schemas
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
    (rollout,) = by_kind(docs, "Rollout")
    assert rollout["metadata"]["namespace"] == "retrain"
    assert rollout["spec"]["workloadRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedder-serving",
                                              "scaleDown": "onsuccess"}
    blue_green = rollout["spec"]["strategy"]["blueGreen"]
    assert (blue_green["activeService"], blue_green["previewService"], blue_green["autoPromotionEnabled"]) == (
        "embedder-serving", "embedder-serving-preview", False)
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == ["embedder-serving"]  # the template's home
    deployment = by_kind(docs, "Deployment")[0]
    assert rollout["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert by_kind(docs, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]["kind"] == "Rollout"
    preview = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "embedder-serving-preview")
    assert preview["spec"]["selector"] == {"app.kubernetes.io/name": "embedder-serving"}  # Argo adds the hash
    plain = rbac_rules(kustomize(overlay), "airflow-worker")
    assert rbac_rules(docs, "airflow-worker") - plain == {("get", "rollouts"), ("patch", "rollouts"),
                                                          ("patch", "rollouts/status"), ("get", "replicasets")}
    config = next(cm["data"] for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].startswith("retrain-settings"))
    assert Settings.from_env(config).rollout.kind == "argo"
