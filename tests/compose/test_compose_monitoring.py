"""The compose stack's Prometheus and Grafana (checked without Docker): pinned images, ports on 127.0.0.1 only,
Grafana's admin password from .env, and the same rules file and dashboard the Kubernetes manifests ship,
bind-mounted where the services' own configuration looks for them."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from localdev import compose, monitoring
from tests.support.prometheus import tool

REPO = Path(__file__).resolve().parents[2]
SERVICES = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]


def mounts(service: str) -> dict[PurePosixPath, Path]:
    """Container path -> host file of the service's bind mounts."""
    out = {}
    for mount in SERVICES[service]["volumes"]:
        source, target, *_ = mount.split(":")
        if source.startswith("./"):
            out[PurePosixPath(target)] = (REPO / source).resolve()
    return out


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_monitoring_images_are_pinned_and_ports_bound_to_localhost(service):
    spec = SERVICES[service]
    assert "@sha256:" in spec["image"] and compose._image_pinned(spec["image"])
    assert spec["profiles"] == ["monitoring"]  # pulled images: the core stack comes up without them
    for port in spec["ports"]:
        assert port.startswith("127.0.0.1:"), port
    assert spec["healthcheck"]["test"] and spec["restart"] == "always"
    for host_file in mounts(service).values():
        assert host_file.is_file(), host_file


def test_prometheus_evaluates_the_rules_file_the_manifests_ship():
    files = mounts("prometheus")
    config_path = next(target for target, source in files.items() if source.name == "prometheus.yml")
    config = yaml.safe_load(files[config_path].read_text())
    (rules,) = config["rule_files"]
    assert files[PurePosixPath(rules)] == monitoring.RULES
    (scrape,) = config["scrape_configs"]
    assert scrape["static_configs"] == [{"targets": ["serving:8080"]}]
    assert any(port.endswith(":8080") for port in SERVICES["serving"]["ports"])  # the serving container's port
    assert f"--config.file={config_path}" in SERVICES["prometheus"]["command"]


def test_promtool_accepts_the_compose_prometheus_config(tmp_path):
    config = yaml.safe_load((REPO / "compose" / "prometheus.yml").read_text())
    config["rule_files"] = [str(monitoring.RULES)]  # where the mount puts it, on this machine
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_grafana_shows_the_dashboard_the_manifests_ship_from_the_compose_prometheus():
    files = mounts("grafana")
    by_name = {source.name: target for target, source in files.items()}
    providers = yaml.safe_load(files[by_name["dashboards.yaml"]].read_text())["providers"]
    (provider,) = providers
    assert str(by_name["datasources.yaml"]).startswith("/etc/grafana/provisioning/datasources/")
    assert str(by_name["dashboards.yaml"]).startswith("/etc/grafana/provisioning/dashboards/")
    assert by_name[monitoring.DASHBOARD.name].parent == PurePosixPath(provider["options"]["path"])
    assert files[by_name[monitoring.DASHBOARD.name]] == monitoring.DASHBOARD
    env = SERVICES["grafana"]["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == str(by_name[monitoring.DASHBOARD.name])
    (source,) = yaml.safe_load(files[by_name["datasources.yaml"]].read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{SERVICES['prometheus']['ports'][0].rsplit(':', 1)[1]}"


def test_grafana_admin_password_comes_from_the_env_file(tmp_path):
    assert SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == (
        "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD in .env}")
    assert compose.read_env_file(REPO / ".env.example")["GRAFANA_ADMIN_PASSWORD"] == compose.PLACEHOLDER
    compose.write_env(REPO / ".env.example", tmp_path / ".env")
    written = compose.read_env_file(tmp_path / ".env")
    assert written["GRAFANA_ADMIN_PASSWORD"] not in (compose.PLACEHOLDER, written["AIRFLOW_ADMIN_PASSWORD"])
    assert len(written["GRAFANA_ADMIN_PASSWORD"]) >= 24
