"""The alert rules, judged by Debian's promtool: the file is valid, every rule fires on the series its unit
tests say and stays quiet on the others, the unit tests fail when a rule is loosened, and the operator's
PrometheusRule carries exactly the rules file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from localdev import monitoring

RULES_TEST = Path(__file__).with_name("rules-test.yaml")


def promtool_test(promtool: str, test_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)


def alert_names(rules_text: str) -> list[str]:
    return [r["alert"] for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"] if "alert" in r]


def test_the_rules_file_is_valid(promtool):
    proc = subprocess.run([promtool, "check", "rules", str(monitoring.RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_every_rule_passes_its_unit_tests(promtool):
    proc = promtool_test(promtool, RULES_TEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_series_that_fire_and_an_evaluation_where_it_does_not():
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            cases.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    assert set(cases) == set(alert_names(monitoring.RULES.read_text())) == {
        "EmbedderNotReady", "EmbedderHighErrorRatio", "EmbedderHighLatency", "EmbedderEmbeddingNormOff",
        "EmbedderSimilarTop1Dropping"}
    for name, fires in cases.items():
        assert True in fires and False in fires, name


def run_against(promtool: str, tmp_path: Path, rules_text: str) -> subprocess.CompletedProcess:
    """The unit tests run against ``rules_text`` instead of the shipped rules."""
    (tmp_path / "rules.yaml").write_text(rules_text)
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules-test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return promtool_test(promtool, tmp_path / "rules-test.yaml")


def test_the_unit_tests_catch_every_rule_firing_before_its_for_duration(promtool, tmp_path):
    doc = yaml.safe_load(monitoring.RULES.read_text())
    for rule in doc["groups"][0]["rules"]:
        del rule["for"]
    proc = run_against(promtool, tmp_path, yaml.safe_dump(doc, sort_keys=False))
    assert proc.returncode == 1
    for name in alert_names(monitoring.RULES.read_text()):
        assert f"alertname: {name}," in proc.stdout + proc.stderr, name


@pytest.mark.parametrize(("alert", "shipped", "loosened"), [
    ("EmbedderNotReady", "embedder_ready == 0", "embedder_ready <= 1"),
    ("EmbedderHighErrorRatio", "> 0.05", "> 0.005"),
    ("EmbedderHighErrorRatio", 'status=~"5.."', 'status=~"[45].."'),
    ("EmbedderHighErrorRatio", 'route=~"/embed|/similar"', 'route=~".*"'),
    ("EmbedderHighLatency", ") > 1", ") > 0.05"),
    ("EmbedderHighLatency", ', status=~"2.."', ""),
    ("EmbedderEmbeddingNormOff", "> 0.01", "> 0.001"),
    ("EmbedderSimilarTop1Dropping", ">= 100", ">= 10"),
])
def test_the_unit_tests_catch_a_loosened_rule(promtool, tmp_path, alert, shipped, loosened):
    """Each rule's quiet series are ones a looser rule would fire on: the unit tests fail for the looser rule."""
    doc = yaml.safe_load(monitoring.RULES.read_text())
    (rule,) = [r for r in doc["groups"][0]["rules"] if r["alert"] == alert]
    assert shipped in rule["expr"]
    rule["expr"] = rule["expr"].replace(shipped, loosened)
    proc = run_against(promtool, tmp_path, yaml.safe_dump(doc, sort_keys=False))
    assert proc.returncode == 1 and f"alertname: {alert}," in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_prometheus_rule_is_the_rules_file_as_written_by_the_command():
    assert monitoring.PROMETHEUS_RULE.read_text() == monitoring.prometheus_rule(monitoring.RULES.read_text()), (
        "k8s/components/prometheus-operator/prometheus-rule.yaml is stale: run python -m localdev.monitoring")
    manifest = yaml.safe_load(monitoring.PROMETHEUS_RULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"] == yaml.safe_load(monitoring.RULES.read_text())


def test_the_command_reports_a_stale_prometheus_rule_and_rewrites_it(tmp_path, capsys):
    stale = tmp_path / "prometheus-rule.yaml"
    stale.write_text(monitoring.prometheus_rule(monitoring.RULES.read_text()).replace("for: 5m", "for: 1m"))
    assert monitoring.write(monitoring.RULES, stale, check=True) == 1
    assert "stale: run python -m localdev.monitoring" in capsys.readouterr().out
    assert monitoring.write(monitoring.RULES, stale) == 0
    assert monitoring.write(monitoring.RULES, stale, check=True) == 0
    assert stale.read_text() == monitoring.PROMETHEUS_RULE.read_text()


def test_a_file_that_is_not_a_rules_file_is_refused():
    with pytest.raises(ValueError, match="exactly one top-level key, groups"):
        monitoring.prometheus_rule("apiVersion: v1\ngroups: []\n")
