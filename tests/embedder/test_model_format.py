"""No code runs from the registry: a version whose model is a pickle is refused, in serving and in evaluate.

The hostile version looks like one ``embedder.train`` logged (MLmodel, metadata, head) but holds a pickled
``model.pth`` that writes a marker file when unpickled. MLflow's own loader runs it (the control, last); the
project's loader refuses it by name, before any of it is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from embedder import model
from retrain.rollout.targets import SWITCHED, LocalServing, Mark
from retrain.waiting import poll
from retrain_contract.serving import Pin
from tests.helpers import free_port, wait_http
from tests.support import models

NAME = "hostile"


@pytest.fixture
def hostile(mlflow_sqlite, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    marker = tmp_path / "pwned"
    good = models.register(client, NAME, models.Tiny(0))
    bad = models.register_pickled(client, NAME, models.Tiny(0), marker, tmp_path)
    return client, good, bad, marker


def test_a_pickled_version_is_refused_in_process_and_by_serving_and_evaluate_and_mlflow_alone_would_run_it(
        hostile, mlflow_sqlite, tmp_path, digits_root):
    client, good, bad, marker = hostile
    assert model.load(f"models:/{NAME}/{good}").embedding_dim == models.DIM  # the pt2 export loads

    with pytest.raises(model.UnsafeModelFormat, match=rf"models:/{NAME}/{bad}: refused to load a pickled module"):
        model.load(f"models:/{NAME}/{bad}")
    assert not marker.exists()

    # The serving process, its record pinning the pickled version: never ready, says why, runs nothing.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_sqlite, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    state = (tmp_path / "serving" / "desired.json").as_uri()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    LocalServing(state, url, f"{url}/preview").switch(Pin(NAME, bad), "test", Mark(NAME, bad, "t", SWITCHED, time.time()), 0)
    log = tmp_path / "serving.log"
    proc = subprocess.Popen([sys.executable, "-m", "embedder.serving", "--state-uri", state, "--port", str(port),
                             "--poll-interval", "0.2"], env=env, cwd=tmp_path, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_http(f"{url}/healthz", timeout=120, proc=proc)
        poll(lambda: "refused to load a pickled module" in log.read_text(), timeout_s=60, interval_s=0.2,
             what="the serving process refusing the version")
        ready = requests.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        # clients learn which version failed and how, not what the artifact held or where it lives
        assert ready.json()["reason"] == f"loading models:/{NAME}/{bad} failed (UnsafeModelFormat); the serving log says why"
        assert str(tmp_path) not in requests.get(f"{url}/metadata", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(30)
    assert not marker.exists()

    # The evaluate stage, the pickled version as the challenger: a clear error naming it, nothing run.
    prepared = tmp_path / "prepared.json"
    subprocess.run([sys.executable, "-m", "embedder.prepare_data", "--data-uri", digits_root.as_uri(), "--storage-uri",
                    tmp_path.as_uri(), "--experiment", "t", "--result-path", str(prepared)], env=env, cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    evaluated = subprocess.run(
        [sys.executable, "-m", "embedder.evaluate", "--manifest-uri", json.loads(prepared.read_text())["manifest_uri"],
         "--challenger-uri", f"models:/{NAME}/{bad}", "--challenger-run-id", client.get_model_version(NAME, bad).run_id,
         "--model-name", NAME, "--experiment", "t", "--result-path", str(tmp_path / "evaluated.json")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode != 0
    assert f"models:/{NAME}/{bad}: refused to load a pickled module" in evaluated.stderr, evaluated.stderr[-2000:]
    assert not marker.exists()

    # The control: MLflow's loader on its default settings unpickles it, and the payload runs.
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.pytorch.load_model('models:/{NAME}/{bad}')"],
                   env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert marker.exists()
