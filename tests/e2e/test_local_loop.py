"""The loop end to end in local mode: DAG runs through Airflow itself, a real MLflow server process,
real training, the real serving process. Tests run in order and share one stack (module scope)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from retrain import localstack, rollout
from retrain.registry import alias_version
from retrain.settings import Settings
from tests.helpers import free_port, wait_http

pytestmark = pytest.mark.e2e
MODEL = "image-embedder"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mlflow_server, digits_root):
    home = tmp_path_factory.mktemp("retrain-home")
    port = free_port()
    env = {
        "RETRAIN_HOME": str(home),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "RETRAIN_DATA_URI": digits_root.as_uri(),
        "RETRAIN_SERVING_URL": f"http://127.0.0.1:{port}",
        "RETRAIN_DEPLOY_TIMEOUT_S": "120",
        "RETRAIN_LOCAL_PYTHON": sys.executable,
    }
    settings = Settings.from_env(env)
    airflow_env = localstack.airflow_env(settings, {**os.environ, **env})
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=airflow_env, check=True,
                   capture_output=True, timeout=300)
    server = localstack.serving_service(settings)
    server.start(airflow_env, timeout_s=120)
    wait_http(f"{settings.serving_url}/healthz")
    try:
        yield settings, airflow_env
    finally:
        server.stop()


def dag_test(airflow_env: dict, conf: dict, **extra_env: str) -> tuple[str, str]:
    proc = subprocess.run([str(Path(sys.executable).with_name("airflow")), "dags", "test", "retrain_embedder",
                           "--conf", json.dumps(conf)], env={**airflow_env, **extra_env},
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    state = re.search(r"DagRun Finished: .*?state=(\w+)", out)
    assert state, out[-5000:]
    return state.group(1), out


CONF = {"epochs": 1, "image_size": 32, "batch_size": 32}


def test_first_run_trains_promotes_and_serves(stack):
    settings, airflow_env = stack
    state, out = dag_test(airflow_env, CONF)
    assert state == "success", out[-5000:]
    assert "retrain=True: there is no champion model yet" in out
    client = MlflowClient(settings.tracking_uri)
    assert alias_version(client, MODEL, "champion") == "1"
    assert alias_version(client, MODEL, "challenger") == "1"
    tags = client.get_model_version(MODEL, "1").tags
    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    assert (meta["model_version"], meta["ready"], meta["dataset_version"]) == ("1", True, tags["dataset_version"])
    image = next((Path(settings.data_uri.removeprefix("file://")) / "test").rglob("*.png"))
    body = requests.post(f"{settings.serving_url}/embed", files={"file": image.open("rb")}, timeout=30).json()
    assert body["dim"] == len(body["embedding"]) == 2048
    assert math.sqrt(sum(x * x for x in body["embedding"])) == pytest.approx(1.0, abs=1e-4)
    record = json.loads(Path(settings.serving_state_uri.removeprefix("file://")).read_text())
    assert record["model_version"] == "1" and "version 1 from Airflow run manual__" in record["change_cause"]
    # /similar searches the gallery evaluate logged with version 1: the training split, with labels.
    train_images = sum(1 for _ in (Path(settings.data_uri.removeprefix("file://")) / "train").rglob("*.png"))
    assert meta["gallery_size"] == train_images
    similar = requests.post(f"{settings.serving_url}/similar?k=3", files={"file": image.open("rb")}, timeout=30).json()
    (result,) = similar["results"]
    assert len(result["neighbors"]) == 3 and all(n["item"].startswith("train/") for n in result["neighbors"])


def test_forced_run_compares_on_the_same_snapshot_and_keeps_a_better_champion(stack):
    settings, airflow_env = stack
    state, out = dag_test(airflow_env, {**CONF, "force_retrain": True, "min_improvement": 1.0})
    assert state == "success", out[-5000:]
    client = MlflowClient(settings.tracking_uri)
    assert alias_version(client, MODEL, "challenger") == "2"
    assert alias_version(client, MODEL, "champion") == "1"
    v1, v2 = (client.get_model_version(MODEL, v).tags for v in ("1", "2"))
    assert v2["promotion.decision"] == "rejected" and v2["champion.version"] == "1"
    assert v2["eval.dataset_version"] == v1["eval.dataset_version"]  # both scored on the same snapshot
    assert float(v2["champion.recall_at_1"]) > 0
    assert requests.get(f"{settings.serving_url}/metadata", timeout=10).json()["model_version"] == "1"


def test_plain_run_with_a_champion_and_no_drift_skips_and_says_why(stack):
    settings, airflow_env = stack
    state, out = dag_test(airflow_env, CONF)
    assert state == "success"
    assert "retrain=False: champion version 1 is serving and no drift window scored yet" in out
    assert len(MlflowClient(settings.tracking_uri).search_model_versions(f"name = '{MODEL}'")) == 2


def test_run_that_fails_before_evaluation_registers_nothing_and_alerts(stack, tmp_path):
    settings, airflow_env = stack
    state, out = dag_test(airflow_env, {**CONF, "force_retrain": True}, RETRAIN_DATA_URI=(tmp_path / "gone").as_uri())
    assert state == "failed"
    assert f"data root {(tmp_path / 'gone').as_uri()}: not a directory" in out
    assert len(MlflowClient(settings.tracking_uri).search_model_versions(f"name = '{MODEL}'")) == 2
    alerts = [json.loads(line) for line in Path(settings.alert_file).read_text().splitlines()]
    assert [(a["kind"], a["fields"]["task_id"]) for a in alerts] == [("task_failed", "prepare_data")]


def test_rollout_that_never_becomes_ready_rolls_back_and_alerts_once(stack):
    settings, _ = stack
    settings = dataclasses.replace(settings, deploy_timeout_s=6)
    alert_lines = len(Path(settings.alert_file).read_text().splitlines())
    promotion = {"model_name": MODEL, "champion": "99", "promoted": True, "previous_champion": "1",
                 "recall_at_1": 0.5, "version": "99"}
    client = MlflowClient(settings.tracking_uri)
    with pytest.raises(rollout.RolloutFailed, match="did not serve model version 99 within 6s.*Rolled back to model version 1"):
        rollout.roll_out_champion(settings, promotion, "manual__bad", client=client)
    record = json.loads(Path(settings.serving_state_uri.removeprefix("file://")).read_text())
    assert record["model_version"] == "1" and record["change_cause"].startswith("rollback to revision 1")
    assert [h["model_version"] for h in record["history"]][-2:] == ["1", "99"]
    assert alias_version(client, MODEL, "champion") == "1"
    new_alerts = Path(settings.alert_file).read_text().splitlines()[alert_lines:]
    assert [json.loads(a)["kind"] for a in new_alerts] == ["rollback"]
    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    assert (meta["model_version"], meta["ready"]) == ("1", True)


def embed_all(settings: Settings, paths: list[Path]) -> np.ndarray:
    rows = []
    for path in paths:
        with path.open("rb") as fh:
            resp = requests.post(f"{settings.serving_url}/embed", files={"file": (path.name, fh, "image/png")}, timeout=30)
        rows.append(resp.json()["embedding"])
    return np.asarray(rows, dtype=np.float32)


def test_shifted_traffic_confirms_drift_alerts_emits_the_asset_and_check_drift_retrains(stack, digits_root, tmp_path):
    """monitor_drift and check_drift through Airflow, on real served embeddings against the champion's reference."""
    from embedder import demo_data, storage

    settings, airflow_env = stack
    drift_env = {"RETRAIN_DRIFT_WINDOW_S": "60", "RETRAIN_DRIFT_WINDOWS": "2", "RETRAIN_DRIFT_MIN_SAMPLES": "40",
                 "RETRAIN_DRIFT_PERMUTATIONS": "300", "RETRAIN_DRIFT_COOLDOWN_H": "0"}
    test_images = sorted((digits_root / "test").rglob("*.png"))[:80]
    shifted = []
    for path in test_images:
        target = tmp_path / f"shifted-{path.parent.name}-{path.name}"
        target.write_bytes(demo_data.shifted_png(path.read_bytes()))
        shifted.append(target)
    same, moved = embed_all(settings, test_images), embed_all(settings, shifted)  # what serving answered
    champion = alias_version(MlflowClient(settings.tracking_uri), MODEL, "champion")
    start = int(time.time()) // 60 * 60 - 600
    for i, rows in enumerate([same, moved, moved]):  # three closed windows, as the serving sampler writes them
        buffer = io.BytesIO()
        np.save(buffer, rows)
        storage.write_bytes(storage.join(settings.drift.sample_uri, MODEL, f"v{champion}", f"window={start + 60 * i}",
                                         "serving-1.npy"), buffer.getvalue())
    alert_lines = len(Path(settings.alert_file).read_text().splitlines())

    proc = subprocess.run([AIRFLOW, "dags", "test", "monitor_drift"], env={**airflow_env, **drift_env},
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert re.search(r"DagRun Finished: .*?state=success", out), out[-5000:]
    assert "drift state drift: p < 0.01 in each of the last 2 windows" in out
    assert f"drift Asset {MODEL}_drift_confirmed updated: champion version {champion}" in out
    [alert] = [json.loads(a) for a in Path(settings.alert_file).read_text().splitlines()[alert_lines:]]
    assert alert["kind"] == "drift" and alert["fields"]["model_version"] == champion
    assert alert["fields"]["p_value"] < 0.01 and alert["fields"]["threshold"] == 0.01
    client = MlflowClient(settings.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(f"{settings.experiment}-monitoring").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "p_value")] == [start, start + 60, start + 120]

    proc = subprocess.run([AIRFLOW, "tasks", "test", "retrain_embedder", "check_drift"], env={**airflow_env, **drift_env},
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert f"retrain=True: drift confirmed for champion version {champion}: p < 0.01 in each of the last 2 windows" in out


def test_an_unreachable_mlflow_starts_no_training_and_alerts_once_after_the_retries(stack):
    settings, airflow_env = stack
    alert_lines = len(Path(settings.alert_file).read_text().splitlines())
    state, out = dag_test(airflow_env, CONF, MLFLOW_TRACKING_URI="http://127.0.0.1:9", RETRAIN_TASK_RETRIES="1",
                          RETRAIN_RETRY_DELAY_S="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                          MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    assert state == "failed"
    assert "prepare_data" not in re.findall(r"\[DAG TEST\] starting task_id=(\w+)", out)
    assert re.findall(r"\[DAG TEST\] starting task_id=(\w+)", out).count("check_drift") == 2  # one retry
    new_alerts = [json.loads(a) for a in Path(settings.alert_file).read_text().splitlines()[alert_lines:]]
    assert [(a["kind"], a["fields"]["task_id"]) for a in new_alerts] == [("task_failed", "check_drift")]
