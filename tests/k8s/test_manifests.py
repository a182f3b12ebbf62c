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
def test_serving_is_pinned_to_a_version_and_restricted(overlay):
    docs = kustomize(overlay)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MODEL_VERSION"].isdigit()  # a version, never an alias
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serving_shutdown_fits_the_grace_period(overlay):
    docs = kustomize(overlay)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_kubeflow_component_runs_several_nodes_as_pytorchjobs_and_grants_just_that(overlay, tmp_path):
    from retrain.settings import Settings
    from tests.support.kube import rbac_rules

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({  # an overlay of the user's, with the component
        "resources": [os.path.relpath(overlay, tmp_path)], "components": [os.path.relpath(KUBEFLOW, tmp_path)]}))
    docs = kustomize(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    plain = rbac_rules(kustomize(overlay), "airflow-worker")
    assert not {res for _, res in plain if res == "pytorchjobs"}  # the base needs no operator
    assert rbac_rules(docs, "airflow-worker") - plain == {("create", "pytorchjobs"), ("list", "pytorchjobs"),
                                                          ("delete", "pytorchjobs")}
    config = next(cm["data"] for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].startswith("retrain-settings"))
    assert Settings.from_env(config).pods.train_launcher == "pytorchjob"
