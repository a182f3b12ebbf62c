"""The demo's second act, several times in a row, with a CPU hog on the other core: whole windows of one kind of
traffic (localdev.traffic), each confirmed written, so the monitor scores in-distribution traffic as no drift and
shifted traffic as drift confirmed, every time.

A real serving process (sampling every embedding to storage in 6 s windows) serves a small real model version;
the monitor is ``retrain.monitor.monitor_once``, the code ``monitor_drift``'s task runs.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from embedder import demo_data
from localdev.traffic import send_windows
from retrain import monitor
from retrain.rollout.targets import SWITCHED, LocalServing, Mark
from retrain.settings import Settings
from retrain_contract import artifacts
from retrain_contract.serving import Pin
from tests.conftest import SERVING_MODEL
from tests.helpers import free_port, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]
WINDOW_S, PER_WINDOW, MIN_SAMPLES = 6, 30, 20


@pytest.fixture
def cpu_hog():
    """A busy loop on the other core, for as long as the test runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield hog
    hog.kill()
    hog.wait()


def test_the_second_act_scores_whole_windows_of_one_kind_of_traffic_every_time(
        tmp_path, mlflow_server, serving_models, digits_root, cpu_hog):
    client = MlflowClient(mlflow_server)
    version = serving_models["champion"]
    samples = (tmp_path / "samples").as_uri()
    settings = Settings.from_env({
        "RETRAIN_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server, "RETRAIN_MODEL_NAME": SERVING_MODEL,
        "RETRAIN_EXPERIMENT": f"drift-traffic-{tmp_path.name}", "RETRAIN_SAMPLE_URI": samples,
        "RETRAIN_SAMPLE_RATE": "1.0", "RETRAIN_DRIFT_WINDOW_S": str(WINDOW_S), "RETRAIN_DRIFT_WINDOWS": "2",
        "RETRAIN_DRIFT_MIN_SAMPLES": str(MIN_SAMPLES), "RETRAIN_DRIFT_PERMUTATIONS": "200",
        "RETRAIN_DRIFT_COOLDOWN_H": "0"})
    state = (tmp_path / "serving" / "desired.json").as_uri()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    target = LocalServing(state, url, f"{url}/preview")
    target.switch(Pin(SERVING_MODEL, version), "test", Mark(SERVING_MODEL, version, "t", SWITCHED, time.time()), 0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedder.serving", "--state-uri", state, "--port", str(port), "--poll-interval", "0.2",
         "--threads", "1", "--sample-uri", samples, "--sample-rate", "1.0", "--window-seconds", str(WINDOW_S)],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, cwd=tmp_path,
        stdout=(tmp_path / "serving.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"{url}/readyz", timeout=120, proc=proc)
        test_images = sorted((digits_root / "test").rglob("*.png"))
        # The version's drift reference, as train logs it: its embeddings of the test split.
        reference = np.array([requests.post(f"{url}/embed", files={"file": (p.name, p.read_bytes())}, timeout=30)
                              .json()["embedding"] for p in test_images], dtype=np.float32)
        buf = io.BytesIO()
        np.save(buf, reference)
        (tmp_path / "reference.npy").write_bytes(buf.getvalue())
        client.log_artifact(client.get_model_version(SERVING_MODEL, version).run_id, str(tmp_path / "reference.npy"),
                            artifacts.REFERENCE_ARTIFACT.rsplit("/", 1)[0])
        shifted_dir = tmp_path / "shifted"
        shifted_dir.mkdir()
        shifted = []
        for p in test_images:
            shifted.append(shifted_dir / f"shifted-{p.name}")
            shifted[-1].write_bytes(demo_data.shifted_png(p.read_bytes()))
        rng = random.Random(0)
        lines = []

        for act in range(3):
            same = rng.sample(test_images, PER_WINDOW)
            sent = send_windows(settings, url, SERVING_MODEL, version, same, 2, PER_WINDOW, say=lines.append)
            report = monitor.monitor_once(settings, client, target=target)
            assert {w.start for w in sent} <= set(report["scored"]), (act, report, lines)
            assert report["state"] == "ok" and not report["confirmed"], (act, report, lines)

            moved = rng.sample(shifted, PER_WINDOW)
            sent = send_windows(settings, url, SERVING_MODEL, version, moved, 2, PER_WINDOW, say=lines.append)
            report = monitor.monitor_once(settings, client, target=target)
            assert {w.start for w in sent} <= set(report["scored"]), (act, report, lines)
            assert report["confirmed"], (act, report, lines)  # two shifted windows in a row, every time
            assert all(w.written == PER_WINDOW for w in sent), sent  # exactly what was sent, nothing from before
    finally:
        proc.terminate()
        proc.wait(30)
