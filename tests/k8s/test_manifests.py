"""Manifests: every overlay builds with the real kubectl's kustomize and validates strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


def build(overlay: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, check=True, timeout=60)
    return list(yaml.safe_load_all(out.stdout))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_and_validates(overlay):
    docs = build(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.35.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serving_is_pinned_to_a_version_and_restricted(overlay):
    docs = build(overlay)
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
