"""Monitoring support: Debian's promtool and Prometheus, the shipped rules and dashboard, a real Prometheus server
scraping a real serving process, and model versions in MLflow that serve unit embeddings or do not.

``make test`` installs the ``prometheus`` package (the Makefile's ``prometheus`` target); run alone, these tests
fail at once with that advice rather than skipping.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, wait_http
from tests.support.prometheus import Prometheus, tool

MODEL = "embedder"


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


@pytest.fixture
def start_prometheus(tmp_path) -> Iterator:
    """Starts Debian's Prometheus scraping ``target`` every second and evaluating ``rules`` (text) every second."""
    binary = tool("prometheus")
    started: list[subprocess.Popen] = []

    def start(target: str, rules: str) -> Prometheus:
        home = tmp_path / f"prometheus-{len(started)}"
        home.mkdir()
        (home / "rules.yaml").write_text(rules)
        (home / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(home / "rules.yaml")],
            "scrape_configs": [{"job_name": "embedder-serving", "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        log = (home / "prometheus.log").open("wb")
        proc = subprocess.Popen([binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", timeout=60, proc=proc)
        return Prometheus(url, proc)

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def start_serving(tmp_path, mlflow_versions) -> Iterator:
    """Starts ``python -m embedder.serving`` with ``args`` on the versions' MLflow store; returns its base URL."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> str:
        port = free_port()
        log = (tmp_path / f"serving-{len(started)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "embedder.serving", *args, "--port", str(port),
                                 "--poll-interval", "0.2", "--max-batch", "4", "--threads", "1"],
                                env=mlflow_versions.env, cwd=mlflow_versions.home, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout=120, proc=proc)
        return url

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(30)


@dataclass
class Versions:
    home: Path
    env: dict[str, str]
    unnormalised: str  # a model version whose embeddings are not unit vectors
    healthy: str  # a model version as training logs it, with a /similar gallery


@pytest.fixture(scope="module")
def mlflow_versions(tmp_path_factory) -> Versions:
    """Two registered versions of ``embedder`` in a SQLite MLflow store, logged by the train stage's own
    ``log_model``: an untrained ResNet-18 exported without its normalisation (the fault EmbedderEmbeddingNormOff
    is about), and one exported as training does, with a small gallery logged as evaluate logs one."""
    import os

    import mlflow
    import torch
    from mlflow import MlflowClient
    from torchvision import models

    from embedder import gallery, model, train

    class Unnormalised(model.Embedder):
        """An embedder whose export lost its normalisation: pooled features as they are."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    home = tmp_path_factory.mktemp("monitoring-mlflow")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    versions = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)  # a SQLite store keeps its artifacts in ./mlruns
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        try:
            for kind in (Unnormalised, model.Embedder):
                torch.manual_seed(0)
                embedder = kind(models.resnet18(weights=None))
                net = model.Classifier(embedder, model.CosineClassifier(embedder.embedding_dim, 3))
                with mlflow.start_run() as run:
                    info = train.log_model(net, ["a", "b", "c"], "monitoring-test",
                                           argparse.Namespace(image_size=32, architecture="resnet18"))
                    if kind is model.Embedder:
                        with torch.inference_mode():
                            rows = embedder.eval()(torch.rand(6, 3, 32, 32))
                        gallery.log(client, run.info.run_id, gallery.Gallery(
                            rows, ["a", "b", "c"] * 2, [f"train/{i}.png" for i in range(6)], "monitoring-test"))
                versions.append(mlflow.register_model(info.model_uri, MODEL).version)
        finally:
            mlflow.set_tracking_uri(None)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return Versions(home, env, str(versions[0]), str(versions[1]))
