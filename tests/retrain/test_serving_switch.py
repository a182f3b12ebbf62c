"""One embedding space at a time, in local mode, with the real serving process and real model versions.

The deploy step (:func:`retrain.rollout.roll_out_champion`) drives the serving process that ``make up``
runs (``python -m embedder.serving --state-uri ...``) through its record, while client threads post to
``/embed``; MLflow is a real server. The model versions are small real embedders
(:mod:`tests.support.models`): a champion, a good challenger, and challengers that pass a smoke test but
misbehave on live traffic (slow, NaN on most images, a collapsed embedding space).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from retrain import rollout
from retrain.rollout import ownership
from retrain.rollout.history import serving_experiment
from retrain.rollout.targets import LocalServing, RolloutFailed
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract.registry import CHAMPION, alias_version
from retrain_contract.results import PromoteResult
from retrain_contract.serving import Pin
from tests.conftest import SERVING_MODEL
from tests.helpers import free_port, wait_http
from tests.monitoring.conftest import start_prometheus  # noqa: F401 (a fixture)
from tests.support.load import Load, interleavings, versions_in_order
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]
MODEL = SERVING_MODEL
CHAMPION_V, GOOD, COLLAPSED, ERRORING, SLOW = "1", "2", "3", "4", "5"


class Stack:
    """The serving process on a record of its own, the deploy step's settings and MLflow client."""

    def __init__(self, home: Path, mlflow_url: str, images: list[Path], deploy_mlflow_url: str | None = None,
                 **env: str):
        self.home = home
        self.images = [(p.name, p.read_bytes()) for p in images]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.state_uri = (home / "serving" / "desired.json").as_uri()
        self.env = {"RETRAIN_HOME": str(home), "RETRAIN_SERVING_URL": self.url, "RETRAIN_SERVING_STATE_URI":
                    self.state_uri, "RETRAIN_MODEL_NAME": MODEL, "RETRAIN_EXPERIMENT": f"{MODEL}-{home.name}",
                    "MLFLOW_TRACKING_URI": deploy_mlflow_url or mlflow_url, "RETRAIN_ANALYSIS_MIN_IMAGES": "16",
                    "RETRAIN_ANALYSIS_WINDOW_S": "3", "RETRAIN_ANALYSIS_LATENCY_FLOOR_MS": "20",
                    "RETRAIN_ANALYSIS_POLL_S": "0.2", "RETRAIN_SCALE_DOWN_DELAY_S": "2", "RETRAIN_DEPLOY_POLL_S": "0.1",
                    "RETRAIN_DEPLOY_TIMEOUT_S": "90", **env}
        self.settings = Settings.from_env(self.env)
        self.client = MlflowClient(deploy_mlflow_url or mlflow_url)
        self.target = LocalServing(self.state_uri, self.url, self.settings.rollout.preview_url)
        self.log = home / "serving.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedder.serving", "--state-uri", self.state_uri, "--port", str(port),
             "--poll-interval", "0.1", "--mirror-rate", "1.0", "--max-batch", "8", "--threads", "1"],
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}, cwd=home, stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/healthz", timeout=120, proc=self.proc)

    def serve_first(self, version: str) -> None:
        """What the first run leaves: ``version`` serves and is @champion."""
        self.client.set_registered_model_alias(MODEL, CHAMPION, version)
        rollout.roll_out_champion(self.settings, promotion(version, None), "run-first", self.client, self.target,
                                  replay_images=self.replay)
        assert self.active() == version

    def replay(self, n: int) -> list[tuple[str, bytes]]:
        """The held-out images the deploy step replays when live traffic is short (the digits' test split)."""
        return self.images[:n]

    def deploy(self, version: str, run_id: str, previous: str = CHAMPION_V) -> dict:
        self.client.set_registered_model_alias(MODEL, CHAMPION, version)  # what promote does before deploy
        return rollout.roll_out_champion(self.settings, promotion(version, previous), run_id, self.client, self.target,
                                         replay_images=self.replay)

    def active(self) -> str | None:
        return requests.get(f"{self.url}/metadata", timeout=10).json()["model_version"]

    def alerts(self) -> list[dict]:
        path = Path(self.settings.alert_file)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def serving_runs(self, outcome: str) -> list:
        exp = self.client.get_experiment_by_name(serving_experiment(self.settings))
        return [] if exp is None else self.client.search_runs([exp.experiment_id], f"tags.`serving.outcome` = '{outcome}'")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def promotion(version: str, previous: str | None) -> dict:
    return PromoteResult(model_name=MODEL, version=version, promoted=True, reason="test", previous_champion=previous,
                         champion=version, recall_at_1=0.9, dataset_version="test-data").to_json()


@pytest.fixture(scope="module")
def test_images(digits_root) -> list[Path]:
    return sorted((digits_root / "test").rglob("*.png"))


@pytest.fixture
def stack(tmp_path, mlflow_server, serving_models, clean_vetoes, test_images):
    running = Stack(tmp_path, mlflow_server, test_images)
    yield running
    running.stop()


def test_a_deploy_under_load_switches_every_client_at_once_after_live_traffic_proved_it(stack, test_images):
    stack.serve_first(CHAMPION_V)
    with Load(stack.url, test_images, clients=3) as load:
        poll(lambda: load.count(CHAMPION_V) >= 20, timeout_s=60, interval_s=0.05, what="traffic on the champion")
        result = stack.deploy(GOOD, "run-good")
        poll(lambda: load.count(GOOD) >= 20, timeout_s=60, interval_s=0.05, what="traffic on the new version")
    answers = load.answers
    assert [a for a in answers if a.status != 200] == []  # zero failed requests
    assert versions_in_order(answers) == [CHAMPION_V, GOOD]  # old ... old, then new ... new
    assert interleavings(answers, CHAMPION_V, GOOD) == []
    for client in range(3):
        assert versions_in_order([a for a in answers if a.client == client]) == [CHAMPION_V, GOOD]
    verdict = result["analysis"]
    assert verdict["passed"] and verdict["replayed"] == 0 and verdict["images"] >= 16  # live mirrored traffic only
    assert {g["name"]: g["passed"] for g in verdict["gates"]} == {
        "traffic": True, "errors": True, "latency": True, "embeddings": True, "agreement": True}
    assert result["changed"] and result["model_version"] == GOOD
    analysis_run = stack.client.get_run(result["analysis_run_id"])
    assert analysis_run.data.tags["analysis.passed"] == "true" and analysis_run.data.metrics["images"] >= 16
    assert [r.data.tags["serving.model_version"] for r in stack.serving_runs("rolled_out")] == [GOOD, CHAMPION_V]
    assert stack.alerts() == []


def test_a_switch_and_a_switch_back_while_warm_never_interleave_and_the_way_back_loads_nothing(stack, test_images):
    stack.serve_first(CHAMPION_V)
    new, old = Pin(MODEL, GOOD), Pin(MODEL, CHAMPION_V)
    stack.target.start_preview(new, "test", "run-test")
    poll(lambda: stack.target.preview_status(new)[0], timeout_s=60, interval_s=0.1, what="the preview")
    with Load(stack.url, test_images, clients=3) as load:
        poll(lambda: load.count(CHAMPION_V) >= 20, timeout_s=60, interval_s=0.05, what="traffic")
        mark = stack.target.read().mark
        stack.target.switch(new, "switch by test", mark, warm_s=600)
        poll(lambda: load.count(GOOD) >= 20, timeout_s=60, interval_s=0.05, what="traffic on the new version")
        loads = stack.log.read_text().count("loading models:/")
        started = time.monotonic()
        stack.target.switch_back(old, "switch back by test", mark)
        poll(lambda: stack.active() == CHAMPION_V, timeout_s=30, interval_s=0.01, what="the switch back")
        took = time.monotonic() - started
        seen = load.count(CHAMPION_V)
        poll(lambda: load.count(CHAMPION_V) >= seen + 20, timeout_s=60, interval_s=0.05, what="traffic after it")
    assert [a for a in load.answers if a.status != 200] == []
    assert versions_in_order(load.answers) == [CHAMPION_V, GOOD, CHAMPION_V]
    assert stack.log.read_text().count("loading models:/") == loads  # the old version was warm: nothing loaded
    assert took < 2.0, took  # the record's poll interval, not a model load


@pytest.mark.parametrize(("challenger", "gate"), [(SLOW, "latency"), (ERRORING, "errors"), (COLLAPSED, "agreement")])
def test_a_challenger_that_misbehaves_on_live_traffic_never_answers_a_client(stack, test_images, challenger, gate):
    stack.serve_first(CHAMPION_V)
    with Load(stack.url, test_images, clients=2) as load:
        poll(lambda: load.count() >= 10, timeout_s=60, interval_s=0.05, what="traffic")
        with pytest.raises(RolloutFailed) as failed:
            stack.deploy(challenger, f"run-{gate}")
        seen = load.count()
        poll(lambda: load.count() >= seen + 10, timeout_s=60, interval_s=0.05, what="traffic after the verdict")
    assert failed.value.gate == gate and failed.value.alerted
    assert f"{gate} gate failed" in str(failed.value) and "never answered a client" in str(failed.value)
    assert {a.version for a in load.answers} == {CHAMPION_V} and all(a.status == 200 for a in load.answers)
    assert stack.active() == CHAMPION_V
    assert alias_version(stack.client, MODEL, CHAMPION) == CHAMPION_V
    assert requests.get(f"{stack.settings.rollout.preview_url}/readyz", timeout=10).status_code == 503  # dropped
    alerts = stack.alerts()
    assert len(alerts) == 1 and alerts[0]["kind"] == "analysis" and alerts[0]["fields"]["gate"] == gate
    rejected = stack.serving_runs("rejected")
    assert [r.data.tags["serving.model_version"] for r in rejected] == [challenger]
    analysis_run = stack.serving_runs("analysis")[0]
    assert analysis_run.data.tags[f"analysis.gate.{gate}"] == "FAIL" and analysis_run.data.tags["analysis.passed"] == "false"


def test_with_no_live_traffic_the_analysis_replays_held_out_images(stack, test_images):
    stack.serve_first(CHAMPION_V)
    result = stack.deploy(GOOD, "run-quiet")
    verdict = result["analysis"]
    assert verdict["passed"] and verdict["replayed"] == 16 and verdict["images"] == 16
    assert stack.active() == GOOD


RUN_UNTIL_SWITCHED = textwrap.dedent("""
    import json, pathlib, sys, threading
    from mlflow import MlflowClient
    from retrain import rollout
    from retrain.rollout.targets import LocalServing
    from retrain.settings import Settings

    env, promotion = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    images = [(p.name, p.read_bytes()) for p in sorted(pathlib.Path(sys.argv[3]).rglob("*.png"))]
    settings = Settings.from_env(env)
    switch = LocalServing.switch
    def switch_then_stop(*args, **kwargs):  # the worker is lost between the switch and its record
        switch(*args, **kwargs)
        print("switched", flush=True)
        threading.Event().wait()
    LocalServing.switch = switch_then_stop
    rollout.roll_out_champion(settings, promotion, "run-killed", MlflowClient(env["MLFLOW_TRACKING_URI"]),
                              rollout.target_for(settings), replay_images=lambda n: images[:n])
""")


def test_a_worker_killed_between_the_switch_and_its_record_is_finished_by_the_retry(stack, digits_root):
    stack.serve_first(CHAMPION_V)
    stack.client.set_registered_model_alias(MODEL, CHAMPION, GOOD)
    proc = subprocess.Popen([sys.executable, "-c", RUN_UNTIL_SWITCHED, json.dumps(stack.env),
                             json.dumps(promotion(GOOD, CHAMPION_V)), str(digits_root / "test")],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert any(line.strip() == "switched" for line in proc.stdout)  # (the stage's log lines come first)
    proc.kill()
    proc.wait(10)
    revision = stack.target.read().revision
    poll(lambda: stack.active() == GOOD, timeout_s=30, interval_s=0.05, what="the switched version")
    assert stack.serving_runs("rolled_out")[0].data.tags["serving.model_version"] == CHAMPION_V  # not recorded
    result = stack.deploy(GOOD, "run-killed")  # the retry
    assert stack.target.read().revision == revision  # no second switch
    assert result["model_version"] == GOOD and result["changed"]
    assert [r.data.tags["serving.model_version"] for r in stack.serving_runs("rolled_out")] == [GOOD, CHAMPION_V]
    assert alias_version(stack.client, MODEL, CHAMPION) == GOOD and stack.alerts() == []


def test_mlflow_down_while_a_rejection_restores_the_champion_is_finished_by_the_retry(
        tmp_path, mlflow_server, serving_models, test_images, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries would take minutes
    proxy = TcpProxy(mlflow_server).start()
    stack = Stack(tmp_path, mlflow_server, test_images, deploy_mlflow_url=proxy.url)
    try:
        stack.serve_first(CHAMPION_V)
        real = rollout.record_analysis

        def then_mlflow_goes_down(*args, **kwargs):
            out = real(*args, **kwargs)
            proxy.refuse()
            return out

        monkeypatch.setattr(rollout, "record_analysis", then_mlflow_goes_down)
        with pytest.raises(Exception) as first:  # MLflow unreachable: a retriable failure, not a verdict
            stack.deploy(COLLAPSED, "run-outage")
        assert not isinstance(first.value, RolloutFailed)
        assert [a["kind"] for a in stack.alerts()] == ["analysis"]  # the alert went out before MLflow was needed
        assert stack.active() == CHAMPION_V
        proxy.accept()
        monkeypatch.setattr(rollout, "record_analysis", real)
        with pytest.raises(RolloutFailed, match="agreement gate failed") as retry:
            rollout.roll_out_champion(stack.settings, promotion(COLLAPSED, CHAMPION_V), "run-outage", stack.client,
                                      stack.target, replay_images=stack.replay)
        assert retry.value.alerted
        assert alias_version(stack.client, MODEL, CHAMPION) == CHAMPION_V == stack.active()
        assert len(stack.alerts()) == 1  # one alert in all
        assert stack.log.read_text().count(f"loading models:/{MODEL}/{COLLAPSED}") == 1  # no second preview
        assert [r.data.tags["serving.model_version"] for r in stack.serving_runs("rejected")] == [COLLAPSED]
    finally:
        stack.stop()
        proxy.stop()


def test_an_operators_edit_is_a_veto_until_lifted(stack):
    stack.serve_first(CHAMPION_V)
    stack.deploy(GOOD, "run-good")
    # The operator puts version 1 back by hand (what `kubectl rollout undo` is on Kubernetes).
    record = json.loads(Path(stack.state_uri.removeprefix("file://")).read_text())
    record.update(model_version=CHAMPION_V, revision=record["revision"] + 1, change_cause="by hand: v2 looks wrong")
    Path(stack.state_uri.removeprefix("file://")).write_text(json.dumps(record))
    poll(lambda: stack.active() == CHAMPION_V, timeout_s=60, interval_s=0.1, what="the operator's version")

    noticed = ownership.reconcile(stack.settings, stack.client, stack.target, "run-next")  # the next run's check_drift
    assert noticed.vetoed == GOOD and noticed.serving == noticed.champion == CHAMPION_V
    assert "taken out of service by hand" in noticed.notes[0]
    assert [a["kind"] for a in stack.alerts()] == ["veto"]
    assert stack.client.get_model_version(MODEL, GOOD).tags[ownership.VETO_TAG].startswith(f"{MODEL} version {GOOD}")
    operator = stack.serving_runs("operator")
    assert [(r.data.tags["serving.model_version"], r.data.tags["serving.by"]) for r in operator] == [(CHAMPION_V, "operator")]
    again = ownership.reconcile(stack.settings, stack.client, stack.target, "run-after")
    assert again.notes == () and len(stack.alerts()) == 1  # noticed once

    # A run whose champion is the vetoed version (a tie kept it) does not put it back.
    result = stack.deploy(GOOD, "run-tie")
    assert result["model_version"] == CHAMPION_V and not result["changed"] and "not put into service" in result["note"]
    assert stack.active() == CHAMPION_V and alias_version(stack.client, MODEL, CHAMPION) == CHAMPION_V

    # lift_veto: the vetoed version is the champion again, and the run serves it.
    assert ownership.latest_veto(stack.client, MODEL) == GOOD
    ownership.lift_veto(stack.client, MODEL, GOOD, "run-lift")
    stack.deploy(GOOD, "run-lift")
    assert stack.active() == GOOD


def test_the_analysis_reads_prometheus_where_one_is_configured(stack, test_images, start_prometheus):  # noqa: F811
    """RETRAIN_PROMETHEUS_URL: the gates judge PromQL sums over every preview process Prometheus scrapes (here the
    serving process, scraped every second), as an Argo Rollouts AnalysisTemplate would query them."""
    stack.serve_first(CHAMPION_V)
    prometheus = start_prometheus(stack.url.removeprefix("http://"), "groups: []\n")
    stack.settings = Settings.from_env({**stack.env, "RETRAIN_PROMETHEUS_URL": prometheus.url})
    with Load(stack.url, test_images, clients=2) as load:
        poll(lambda: load.count() >= 10, timeout_s=60, interval_s=0.05, what="traffic")
        with pytest.raises(RolloutFailed, match="agreement gate failed") as failed:
            stack.deploy(COLLAPSED, "run-prometheus-collapsed")
        result = stack.deploy(GOOD, "run-prometheus-good")
    assert failed.value.gate == "agreement"
    verdict = result["analysis"]
    assert verdict["passed"] and verdict["source"] == f"Prometheus at {prometheus.url}" and verdict["images"] >= 16
    seen = prometheus.query(f'sum(embedder_mirror_images_total{{model_version="{GOOD}",source_version="{CHAMPION_V}"}})')
    assert float(seen["data"]["result"][0]["value"][1]) >= verdict["images"]  # what the gates judged, in Prometheus
    assert stack.active() == GOOD
