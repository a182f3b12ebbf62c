"""Fixtures of the control-plane tests."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from retrain.settings import Settings
from tests.support.samples import MODEL, serve, unit


@pytest.fixture
def world(mlflow_sqlite, tmp_path):
    """A champion (version 1) that serves (local mode's record) and whose training run holds a reference sample, and
    settings pointing at tmp."""
    settings = Settings.from_env({"RETRAIN_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_sqlite,
                                  "RETRAIN_DRIFT_WINDOW_S": "60", "RETRAIN_DRIFT_PERMUTATIONS": "199",
                                  "RETRAIN_DRIFT_MIN_SAMPLES": "30"})
    client = MlflowClient()
    mlflow.set_experiment(settings.experiment)
    rng = np.random.default_rng(0)
    reference = unit(rng.standard_normal((200, 16)) + 2.0)
    with mlflow.start_run(tags={"stage": "train"}) as run:
        path = tmp_path / "reference.npy"
        np.save(path, reference)
        mlflow.log_artifact(str(path), "drift")
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", "1")
    serve(settings, "1")
    created = client.get_model_version(MODEL, "1").creation_timestamp / 1000
    return settings, client, rng, created
