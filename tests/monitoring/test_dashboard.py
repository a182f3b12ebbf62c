"""The serving dashboard against Grafana's published dashboard schema (grafana-foundation-sdk's models for
Grafana 11.6: no Grafana server can be installed here), and its layout. tests/monitoring/test_live.py checks
its queries against the live serving process and a real Prometheus."""

from __future__ import annotations

import copy
import json

import pytest

from localdev import monitoring
from tests.support.grafana_schema import problems

DASHBOARD = json.loads(monitoring.DASHBOARD.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboard_fits_grafanas_schema():
    assert problems(DASHBOARD) == []


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d["panels"][0].update(optoins={}), "dashboard.panels[0].optoins: not in Grafana's schema"),
    (lambda d: d["panels"][0]["gridPos"].update(w="4"), "dashboard.panels[0].grid_pos.w: '4' is not of the declared type"),
    (lambda d: d.update(graphTooltip=7), "dashboard.graph_tooltip: 7 is not of the declared type"),
    (lambda d: d["panels"][5]["targets"][0].update(exp="x"), "dashboard.panels[5].targets[0].exp: not in Grafana's schema"),
    (lambda d: d["panels"][6]["options"]["legend"].update(displayMode="table2"),
     "legend.display_mode: 'table2' is not of the declared type"),
    (lambda d: d["panels"][2].update(type="graph2"), "no schema for panel type 'graph2'"),
])
def test_the_schema_check_catches_what_grafana_would_not_read(edit, expected):
    broken = copy.deepcopy(DASHBOARD)
    edit(broken)
    assert any(expected in p for p in problems(broken)), problems(broken)


def test_the_panels_tile_the_grid_without_overlapping():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_queries_the_chosen_prometheus_for_the_chosen_jobs():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["query"]["query"] == "label_values(embedder_ready, job)"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and 'job=~"$job"' in target["expr"], panel["title"]


def test_it_shows_what_operators_look_at():
    titles = {p["title"] for p in DASHBOARD["panels"]}
    assert titles >= {"Requests by route and status", "Errors by route", "Latency p50 / p95", "Batch sizes", "Queue depth",
                      "Embeddings off the unit sphere", "/similar top-1 score", "Model version"}
