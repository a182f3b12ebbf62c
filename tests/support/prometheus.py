"""Debian's promtool and Prometheus in tests: finding them, a fast copy of the shipped rules, a server's alerts."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest
import requests
import yaml

DURATION = re.compile(r"\[\d+[smhdwy]\]")
OFFSET = re.compile(r"offset \d+[smhdwy]")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (`make prometheus`, which `make test` runs)")
    return path


def render_fast(rules_text: str, window: str = "10s", pending: str = "2s") -> str:
    """A copy of the rules for a test against a live server: every range and offset ``window``, every ``for:``
    ``pending``; names, thresholds, labels and annotations as shipped."""
    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = OFFSET.sub(f"offset {window}", DURATION.sub(f"[{window}]", rule["expr"]))
            if "for" in rule:
                rule["for"] = pending
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen

    def alerts(self, name: str) -> list[dict]:
        """The active (pending or firing) alerts called ``name``."""
        body = requests.get(f"{self.url}/api/v1/alerts", timeout=5).json()
        return [a for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]

    def firing(self, name: str) -> list[dict]:
        return [a for a in self.alerts(name) if a["state"] == "firing"]

    def query(self, expr: str) -> dict:
        return requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
