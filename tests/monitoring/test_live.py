"""A real Prometheus (Debian's) scraping the real serving process, with the shipped rules in a copy whose ranges
and ``for:`` durations are seconds (tests.support.prometheus.render_fast): EmbedderNotReady fires while no model
version is pinned and resolves once the deploy path rolls one out; EmbedderEmbeddingNormOff fires while a version
serves embeddings off the unit sphere and resolves when the deploy moves to a healthy version under traffic.
And every metric the rules and the dashboard's queries name is on the live ``/metrics`` (a histogram with negative
buckets, such as the top-1 score, has no ``_sum``), and every dashboard query returns series in Prometheus.
"""

from __future__ import annotations

import io
import json
import re

import requests
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from localdev import monitoring
from retrain.rollout import wait_for
from retrain.rollout.targets import SWITCHED, LocalServing, Mark
from retrain.waiting import poll
from retrain_contract.serving import Pin
from tests.monitoring.conftest import MODEL
from tests.support.prometheus import render_fast

METRIC = re.compile(r"\bembedder_[a-z0-9_]+\b")


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((40, 30), 20 + seed).convert("RGB").save(out, "PNG")
    return out.getvalue()


def embed(url: str, seed: int = 0) -> list[float]:
    resp = requests.post(f"{url}/embed", files={"file": ("x.png", png(seed), "image/png")}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["embedding"]


def norm(vector: list[float]) -> float:
    return sum(v * v for v in vector) ** 0.5


def test_not_ready_and_embedding_norm_alerts_fire_and_resolve(mlflow_versions, start_serving, start_prometheus, tmp_path):
    state = tmp_path / "serving" / "desired.json"
    url = start_serving("--state-uri", state.as_uri())
    target = url.removeprefix("http://")
    prometheus = start_prometheus(target, render_fast(monitoring.RULES.read_text()))
    serving = LocalServing(state.as_uri(), url, f"{url}/preview")

    def serve(version: str, cause: str) -> None:  # what the deploy step's switch writes, then waits for
        pin = Pin(MODEL, version)
        serving.switch(pin, cause, Mark(MODEL, version, "test", SWITCHED, 0.0), warm_s=0)
        wait_for(serving.active_status, pin, timeout_s=120, poll_s=0.3, what="serving")

    # No version pinned yet: the replica is not ready, and the alert about it fires.
    readyz = requests.get(f"{url}/readyz", timeout=5)
    assert readyz.status_code == 503 and readyz.json()["reason"] == "no model version pinned yet: nothing has been deployed"
    (alert,) = poll(lambda: prometheus.firing("EmbedderNotReady") or None, timeout_s=60, interval_s=0.3,
                    what="EmbedderNotReady firing")
    assert alert["labels"]["instance"] == target and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"Serving replica {target} has no model loaded"
    assert not prometheus.alerts("EmbedderEmbeddingNormOff")

    # The version whose export lost its normalisation serves: ready, so that alert resolves.
    serve(mlflow_versions.unnormalised, "the unnormalised version")
    poll(lambda: not prometheus.alerts("EmbedderNotReady"), timeout_s=60, interval_s=0.3,
         what="EmbedderNotReady resolving")
    assert abs(norm(embed(url)) - 1) > 0.01  # what this version serves is off the unit sphere

    # Under traffic, the norm alert fires: every embedding served is off.
    def norm_alert_under_traffic(state: str):
        def check():
            embed(url)
            alerts = prometheus.alerts("EmbedderEmbeddingNormOff")
            return alerts if (state == "firing" and alerts and alerts[0]["state"] == "firing") or \
                (state == "resolved" and not alerts) else None
        return check

    (alert,) = poll(norm_alert_under_traffic("firing"), timeout_s=60, interval_s=0.2,
                    what="EmbedderEmbeddingNormOff firing")
    assert float(alert["value"]) == 1.0 and alert["labels"]["job"] == "embedder-serving"
    assert alert["annotations"]["summary"] == "100% of served embeddings are not unit vectors"

    # A healthy version serves; traffic goes on, and the norm alert resolves.
    serve(mlflow_versions.healthy, "the healthy version")
    assert abs(norm(embed(url)) - 1) < 1e-4
    poll(norm_alert_under_traffic("resolved"), timeout_s=90, interval_s=0.2, what="EmbedderEmbeddingNormOff resolving")
    assert not prometheus.alerts("EmbedderNotReady")
    served = prometheus.query("sum(rate(embedder_embedding_norm_count[10s]))")["data"]["result"]
    assert float(served[0]["value"][1]) > 0  # it resolved while embeddings were being served


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every query of every panel."""
    doc = json.loads(monitoring.DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in doc["panels"] for target in panel.get("targets", [])]


def rule_queries() -> list[tuple[str, str]]:
    """(alert name, expression) for every rule shipped."""
    doc = yaml.safe_load(monitoring.RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in doc["groups"] for rule in group["rules"]]


def test_every_dashboard_and_rule_query_names_exported_metrics_and_returns_series(mlflow_versions, start_serving,
                                                                                  start_prometheus):
    url = start_serving("--model-name", MODEL, "--model-version", mlflow_versions.healthy)
    poll(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200, timeout_s=120, what="serving ready")
    prometheus = start_prometheus(url.removeprefix("http://"), render_fast(monitoring.RULES.read_text()))
    # The traffic the dashboard shows: embeddings, searches, and a client error.
    embed(url)
    similar = requests.post(f"{url}/similar?k=2", files={"file": ("x.png", png(1), "image/png")}, timeout=30)
    assert similar.status_code == 200, similar.text
    assert requests.post(f"{url}/embed", files={"file": ("x.png", b"not an image", "image/png")}, timeout=30).status_code == 400

    exported = {sample.name for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text)
                for sample in family.samples}
    panels = dashboard_queries()
    assert len({title for title, _ in panels}) == len(json.loads(monitoring.DASHBOARD.read_text())["panels"])
    for title, expr in panels + rule_queries():
        names = set(METRIC.findall(expr))
        assert names, f"{title!r}: its query names no serving metric: {expr}"
        assert names <= exported, f"{title!r}: {sorted(names - exported)} not on the live /metrics"

    # Each query, as Grafana sends it (variables substituted), runs and returns series once Prometheus has
    # scraped the traffic twice.
    def results() -> dict[str, list]:
        out = {}
        for title, expr in panels:
            body = prometheus.query(expr.replace("$__rate_interval", "15s").replace("$job", "embedder-serving"))
            assert body["status"] == "success", f"panel {title!r}: {body}"
            out[f"{title}: {expr}"] = body["data"]["result"]
        return out

    def all_answered():
        embed(url)
        got = results()
        return got if all(got.values()) else None

    poll(all_answered, timeout_s=60, interval_s=1, what="every dashboard query returning series",
         on_timeout=lambda: AssertionError(f"queries without series: {[q for q, r in results().items() if not r]}"))
    rules = requests.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"][0]["rules"]
    assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules} == {
        name: ("ok", "") for name, _ in rule_queries()}  # the server evaluates every rule without an error
    jobs = requests.get(f"{prometheus.url}/api/v1/label/job/values", params={"match[]": "embedder_ready"}, timeout=5)
    assert jobs.json()["data"] == ["embedder-serving"]  # the dashboard's job variable: label_values(embedder_ready, job)
