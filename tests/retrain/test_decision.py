"""The retrain decision and the drift monitor, on a real MLflow store (SQLite) and real sample files."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from retrain import decision, drift, monitor
from retrain.settings import DriftSettings, Settings
from tests.support.samples import unit, write_window

MODEL = "image-embedder"
HOUR = 3600.0


def log_windows(client: MlflowClient, settings: Settings, p_values: list[float | None], start: int = 0) -> None:
    run = monitor.monitoring_run(client, settings, MODEL, "1")
    metrics = []
    for i, p in enumerate(p_values):
        step = start + i * 60
        if p is None:
            metrics += [Metric("insufficient", 1.0, 0, step), Metric("n_production", 3.0, 0, step)]
        else:
            metrics += [Metric("insufficient", 0.0, 0, step), Metric("p_value", p, 0, step)]
    client.log_batch(run.info.run_id, metrics=metrics)


def cfg(settings: Settings, **changes) -> DriftSettings:
    return dataclasses.replace(settings.drift, **changes)


@pytest.mark.parametrize(("force", "signals", "retrain", "reason"), [
    (True, decision.Signals("3"), True, "force_retrain"),
    (False, decision.Signals(None), True, "no champion"),
    (False, decision.Signals("3", 30.0), True, "30.0 days old (maximum 30)"),  # exactly at the maximum: retrain
    (False, decision.Signals("3", 29.99), False, "no drift signal"),
    (False, decision.Signals("3", 1.0, drift.DRIFT, "p < 0.01 in each of the last 3 windows", 30.0), True,
     "drift confirmed for champion version 3"),
    (False, decision.Signals("3", 1.0, drift.DRIFT, "p < 0.01", 23.9), False, "inside the 24 h cooldown"),
    (False, decision.Signals("3", 1.0, drift.OK, "drift monitor reports no drift: 1 of 3"), False, "1 of 3"),
])
def test_decide(force, signals, retrain, reason):
    result = decision.decide(force, signals, DriftSettings())
    assert result.retrain is retrain and reason in result.reason


def test_one_window_over_the_threshold_starts_no_run(world):
    settings, client, _, created = world
    log_windows(client, settings, [0.5, 0.4, 0.001])
    result = decision.check(settings, False, client, now=created + 10 * HOUR)
    assert not result.retrain and "1 of the last 3 scored windows drifted" in result.reason


def test_a_sustained_shift_starts_exactly_one_run(world):
    settings, client, _, created = world
    experiment_id = client.get_experiment_by_name(settings.experiment).experiment_id
    log_windows(client, settings, [0.6])
    started = []
    for hour in range(1, 10):  # drift every hour from now on; each hourly check sees one more window
        log_windows(client, settings, [0.001], start=hour * 60)
        now = created + 48 * HOUR + hour * HOUR
        if decision.check(settings, False, client, now=now).retrain:
            started.append(hour)
            client.create_run(experiment_id, start_time=int(now * 1000), tags={"stage": "train"})  # what it records
    assert started == [3]  # K = 3 drifted windows; then the 24 h cooldown holds


def test_insufficient_windows_neither_confirm_nor_clear_drift(world):
    settings, client, _, _ = world
    log_windows(client, settings, [0.001, None, 0.002, None, None, 0.003])
    result = decision.check(settings, False, client, now=time.time() + 48 * HOUR)
    assert result.retrain and "drift confirmed" in result.reason


def test_a_value_exactly_at_the_threshold_decides_the_same_way_every_time(world):
    settings, client, _, created = world
    log_windows(client, settings, [0.01, 0.01, 0.01])
    results = {decision.check(settings, False, client, cfg(settings, alpha=0.01), now=created + 5 * HOUR).retrain
               for _ in range(3)}
    assert results == {False}  # p < alpha is strict: at the threshold is not drift


def test_nan_scores_and_an_empty_history_never_retrain_they_raise(world):
    settings, client, _, created = world
    with pytest.raises(monitor.DriftSignalError, match="no scored drift window"):
        decision.check(settings, False, client, now=created + 10 * HOUR)  # watched long enough, nothing logged
    young = decision.check(settings, False, client, now=created + 60)
    assert not young.retrain and "no drift window scored yet" in young.reason
    log_windows(client, settings, [0.5, math.nan, 0.001])
    with pytest.raises(monitor.DriftSignalError, match="NaN p-value"):
        decision.check(settings, False, client, now=created + 10 * HOUR)


def test_an_unreachable_mlflow_never_retrains(world, monkeypatch):
    settings, _, _, _ = world
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(Exception, match="127.0.0.1:9"):
        decision.check(settings, False, MlflowClient("http://127.0.0.1:9"))


def test_monitor_scores_closed_windows_once_and_alerts_on_state_changes(world):
    settings, client, rng, _ = world
    settings = dataclasses.replace(settings, drift=cfg(settings, windows=2, alert_cooldown_h=1000))
    same = lambda n: unit(rng.standard_normal((n, 16)) + 2.0)  # noqa: E731
    shifted = lambda n: unit(rng.standard_normal((n, 16)) + np.r_[np.full(8, 3.0), np.full(8, 1.0)])  # noqa: E731
    t0 = 1_800_000_000
    write_window(settings, t0, same(40), "a")
    write_window(settings, t0, same(40), "b")  # two replicas, one window
    write_window(settings, t0 + 60, same(5))  # too few
    write_window(settings, t0 + 120, shifted(80))
    write_window(settings, t0 + 180, shifted(80))
    write_window(settings, t0 + 240, shifted(80))  # still open at "now"

    report = monitor.monitor_once(settings, client, now=t0 + 240 + 30)
    assert report["scored"] == [t0, t0 + 60, t0 + 120, t0 + 180]
    assert report["state"] == drift.DRIFT and report["confirmed"]
    run_id = report["monitoring_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "n_production")] == [80, 5, 80, 80]
    assert [m.step for m in client.get_metric_history(run_id, "p_value")] == [t0, t0 + 120, t0 + 180]
    alerts = Path(settings.alert_file).read_text().splitlines()
    assert len(alerts) == 1 and "drift confirmed for image-embedder version 1" in alerts[0]
    assert '"threshold": 0.01' in alerts[0] and "mlflow_link" in alerts[0] and '"p_value"' in alerts[0]

    again = monitor.monitor_once(settings, client, now=t0 + 240 + 30)  # nothing new: nothing scored, no alert
    assert again["scored"] == [] and again["confirmed"]
    assert len(Path(settings.alert_file).read_text().splitlines()) == 1

    write_window(settings, t0 + 300, same(80))
    write_window(settings, t0 + 360, same(80))
    cleared = monitor.monitor_once(settings, client, now=t0 + 420 + 30)
    assert cleared["state"] == drift.OK and not cleared["confirmed"]
    lines = Path(settings.alert_file).read_text().splitlines()
    assert len(lines) == 2 and "drift cleared" in lines[1]
