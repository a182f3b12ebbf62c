from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Airflow reads its configuration at import: give the tests a private home and no example DAGs.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-home-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

from tests.helpers import free_port, wait_http  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_experiment(monkeypatch):
    """``mlflow.set_experiment`` exports ``MLFLOW_EXPERIMENT_ID``: one test's experiment must not follow the next
    test (or the processes it starts) to another tracking store."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A small real data set: 40 scikit-learn digits per class as an ImageFolder tree (read-only)."""
    from embedder import demo_data

    root = tmp_path_factory.mktemp("digits")
    demo_data.build(root.as_uri(), per_class=40)
    return root


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A private MLflow store (SQLite, local artifacts) for tests below the server level."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # A SQLite store's default artifact root is ./mlruns relative to the working directory: keep it
    # (and the stage subprocesses, which inherit the cwd) out of the checkout.
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real ``mlflow server`` process with a SQLite backend and proxied artifacts."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=home, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """No test may leave MLflow state in the checkout (MLflow's defaults are ./mlflow.db and ./mlruns)."""
    strays = ("mlflow.db", "mlruns", "mlartifacts")
    before = {name for name in strays if (REPO / name).exists()}
    yield
    created = {name for name in strays if (REPO / name).exists()} - before
    assert not created, f"tests wrote {sorted(created)} into the checkout: some MLflow client used the default URI"


@pytest.fixture(autouse=True)
def _no_ambient_retrain_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("RETRAIN_"):
            monkeypatch.delenv(key)


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server behind :class:`FlakyProxy` (every third request fails once, transiently); bucket ``images``."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    from retrain_contract import storage
    from tests.support.flaky_s3 import FlakyProxy

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    proxy = FlakyProxy(f"http://127.0.0.1:{port}")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for key, value in {"AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
                       "EMBEDDER_S3_PAGE_SIZE": "100"}.items():
        monkeypatch.setenv(key, value)
    storage._s3_client.cache_clear()
    direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    direct.create_bucket(Bucket="images")
    yield direct, proxy
    storage._s3_client.cache_clear()
    proxy.shutdown()
    moto.stop()


SERVING_MODEL = "switch-embedder"


@pytest.fixture(scope="session")
def serving_models(mlflow_server, digits_root) -> dict[str, str]:
    """Small real model versions on the session's MLflow server, each with a gallery of the digits' training images
    (:mod:`tests.support.models`): version 1 a champion, 2 a good challenger, 3 a collapsed embedding space, 4 NaN on
    most images, 5 slow. Tests move the aliases themselves; vetoes are cleared after each test that sets one."""
    import mlflow
    from mlflow import MlflowClient

    from tests.support import models

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    gallery = sorted((digits_root / "train").rglob("*.png"))
    base = models.Tiny(0)
    made = {name: models.register(client, SERVING_MODEL, module, gallery) for name, module in (
        ("champion", base), ("good", models.perturbed(base)), ("collapsed", models.Collapsed()),
        ("erroring", models.BrightNaN(0)), ("slow", models.Slow(base)))}
    mlflow.set_tracking_uri(None)
    assert list(made.values()) == ["1", "2", "3", "4", "5"], made
    return made


@pytest.fixture
def clean_vetoes(mlflow_server, serving_models):
    """After the test, no version of the serving models carries an operator's veto."""
    yield
    from mlflow import MlflowClient

    from retrain.rollout.ownership import VETO_AT_TAG, VETO_TAG

    client = MlflowClient(mlflow_server)
    for mv in client.search_model_versions(f"name = '{SERVING_MODEL}'"):
        for tag in (VETO_TAG, VETO_AT_TAG):
            if tag in (mv.tags or {}):
                client.delete_model_version_tag(SERVING_MODEL, mv.version, tag)
