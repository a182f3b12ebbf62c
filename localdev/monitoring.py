"""Where the serving's dashboard and alert rules live, and the alert rules as a PrometheusRule, written from the one rules file.

``k8s/base/monitoring/embedder-rules.yaml`` is the plain Prometheus rules file: a Prometheus without the
Prometheus Operator loads it (``rule_files:``), and so does the compose stack's. The operator reads rules
from ``PrometheusRule`` objects instead, whose ``spec`` is that file's content; Prometheus refuses a rules
file with anything but ``groups`` in it, so the two cannot be one file. ``python -m localdev.monitoring``
writes ``k8s/components/prometheus-operator/prometheus-rule.yaml`` from the rules file, and
tests/monitoring fails while the written copy differs from what this module makes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "k8s" / "base" / "monitoring"
RULES = MONITORING / "embedder-rules.yaml"
DASHBOARD = MONITORING / "embedder-serving-dashboard.json"
PROMETHEUS_RULE = REPO / "k8s" / "components" / "prometheus-operator" / "prometheus-rule.yaml"
HEADER = """\
# Written by `python -m localdev.monitoring` from k8s/base/monitoring/embedder-rules.yaml: edit that
# file, then run the command again (tests/monitoring fails while this copy is stale).
"""


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (the rules' expressions) as YAML block scalars, as they are written by hand."""


_BlockStrings.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def prometheus_rule(rules_text: str, name: str = "embedder-serving") -> str:
    """The PrometheusRule manifest (YAML text) whose ``spec`` holds the groups of ``rules_text``."""
    doc = yaml.safe_load(rules_text)
    if not isinstance(doc, dict) or set(doc) != {"groups"}:
        raise ValueError("a Prometheus rules file has exactly one top-level key, groups")
    manifest = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": name}, "spec": {"groups": doc["groups"]}}
    return HEADER + yaml.dump(manifest, Dumper=_BlockStrings, sort_keys=False, width=110, allow_unicode=True)


def write(rules: Path, target: Path, check: bool = False) -> int:
    """Write the PrometheusRule ``target`` from the rules file ``rules``; with ``check``, only say whether it is stale."""
    wanted = prometheus_rule(rules.read_text())
    stale = not target.exists() or target.read_text() != wanted
    if check:
        print(f"{_shown(target)}: {'stale: run python -m localdev.monitoring' if stale else 'OK'}")
        return 1 if stale else 0
    target.write_text(wanted)
    print(f"wrote {_shown(target)} from {_shown(rules)}")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.monitoring", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the PrometheusRule is stale; write nothing")
    return write(RULES, PROMETHEUS_RULE, parser.parse_args(argv).check)


if __name__ == "__main__":
    sys.exit(main())
