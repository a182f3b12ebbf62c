"""Dashboard and alert rules in the manifests: the base carries the dashboard for Grafana's sidecar and the rules file
as ConfigMaps (one copy each: the files under k8s/base/monitoring); the prometheus-operator component, added to
an overlay, scrapes the serving pods and carries the same rules as a PrometheusRule, in the serving's namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from localdev import monitoring
from tests.helpers import K8S, kustomize

OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENT = K8S / "components" / "prometheus-operator"


def with_component(overlay: Path, tmp_path: Path) -> list[dict]:
    """``overlay`` with the component added, as a user's overlay adds it (kustomize wants relative paths)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(overlay, tmp_path)], "components": [os.path.relpath(COMPONENT, tmp_path)]}))
    return kustomize(tmp_path)


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_dashboard_and_rules_ship_as_configmaps_of_the_one_copy(overlay):
    docs = kustomize(overlay)
    dashboard = one(docs, "ConfigMap", "embedder-serving-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert dashboard["data"] == {monitoring.DASHBOARD.name: monitoring.DASHBOARD.read_text()}
    assert json.loads(dashboard["data"][monitoring.DASHBOARD.name])["uid"] == "embedder-serving"
    rules = one(docs, "ConfigMap", "embedder-prometheus-rules")
    assert rules["data"] == {monitoring.RULES.name: monitoring.RULES.read_text()}
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]  # no CRD needed without the component


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_component_scrapes_every_serving_pod_and_carries_the_rules(overlay, tmp_path):
    docs = with_component(overlay, tmp_path)
    deployment = one(docs, "Deployment", "embedder-serving")
    namespace = deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]
    monitor = one(docs, "PodMonitor", "embedder-serving")
    rule = one(docs, "PrometheusRule", "embedder-serving")
    assert monitor["metadata"]["namespace"] == rule["metadata"]["namespace"] == namespace
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert rule["spec"] == yaml.safe_load(monitoring.RULES.read_text())
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_the_ingress_policy_lets_prometheus_scrape_the_metrics_port():
    docs = kustomize(OVERLAYS[0])
    policy = one(docs, "NetworkPolicy", "embedder-serving-ingress")
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule and {"port": "http", "protocol": "TCP"} in rule["ports"]
