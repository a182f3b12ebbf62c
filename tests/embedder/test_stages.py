"""Stage CLI tests: the real ``python -m embedder.<stage>`` commands, their results and exit codes."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model

from embedder import model
from tests.helpers import run_stage


@pytest.fixture
def prepared(digits_root, tmp_path, mlflow_sqlite):
    result, _ = run_stage("prepare_data", "--data-uri", digits_root.as_uri(), "--storage-uri", (tmp_path / "s").as_uri(),
                          "--experiment", "t", tmp_path=tmp_path)
    return result


def test_prepare_data_writes_a_content_addressed_manifest(prepared, digits_root):
    assert prepared["manifest_uri"].endswith(f"/datasets/{prepared['dataset_version']}/manifest.json")
    assert prepared["counts"]["train"] == sum(1 for _ in (digits_root / "train").rglob("*.png"))
    run = MlflowClient().get_run(prepared["mlflow_run_id"])
    assert run.inputs.dataset_inputs[0].dataset.digest == prepared["dataset_version"]


def test_prepare_data_missing_root_exits_2_naming_the_path(tmp_path, mlflow_sqlite):
    result, err = run_stage("prepare_data", "--data-uri", str(tmp_path / "absent"), "--storage-uri", str(tmp_path),
                            "--experiment", "t", tmp_path=tmp_path, expect=2)
    assert result is None
    assert f"data root {tmp_path / 'absent'}: not a directory" in err


def test_train_rejects_bad_values_before_doing_anything(prepared, tmp_path):
    _, err = run_stage("train", "--manifest-uri", prepared["manifest_uri"], "--experiment", "t", "--epochs", "0",
                       tmp_path=tmp_path, expect=2)
    assert "argument --epochs: epochs must be an integer from 1 to 500; got 0" in err
    _, err = run_stage("train", "--manifest-uri", prepared["manifest_uri"], "--experiment", "t",
                       "--architecture", "resnet5", tmp_path=tmp_path, expect=2)
    assert "architecture must be one of resnet18, resnet34, resnet50, resnet101, resnet152; got 'resnet5'" in err
    _, err = run_stage("train", "--manifest-uri", str(tmp_path / "none.json"), "--experiment", "t",
                       tmp_path=tmp_path, expect=2)
    assert "none.json: no such file" in err
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                          "tags.stage = 'train'")


@pytest.mark.training
def test_tiny_training_run_logs_metrics_tags_and_a_head_less_embedder(prepared, tmp_path):
    train, _ = run_stage("train", "--manifest-uri", prepared["manifest_uri"], "--experiment", "t",
                         "--architecture", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "32",
                         "--airflow-dag-id", "retrain_embedder", "--airflow-run-id", "manual__1", tmp_path=tmp_path)
    client = MlflowClient()
    run = client.get_run(train["mlflow_run_id"])
    assert run.data.tags["dataset_version"] == prepared["dataset_version"]
    assert run.data.tags["airflow.run_id"] == "manual__1"
    assert run.data.tags["code_version"]
    assert run.data.params["architecture"] == "resnet18"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert {"train_accuracy", "val_accuracy", "images_per_sec"} <= run.data.metrics.keys()
    assert run.data.metrics["images_per_sec"] == pytest.approx(train["images_per_sec"])

    loaded = model.load(train["model_uri"])
    assert loaded.classes == prepared["classes"]
    out = loaded.embed(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 512) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    sig = Model.load(train["model_uri"]).signature
    assert sig.inputs.inputs[0].shape == (-1, 3, 32, 32) and sig.outputs.inputs[0].shape == (-1, 512)

    evaluation, _ = run_stage("evaluate", "--manifest-uri", prepared["manifest_uri"], "--challenger-uri", train["model_uri"],
                              "--challenger-run-id", train["mlflow_run_id"], "--model-name", "m", "--experiment", "t",
                              tmp_path=tmp_path)
    assert evaluation["champion"] is None
    scores = evaluation["challenger"]
    assert scores["num_queries"] == prepared["counts"]["test"]
    assert 0.1 < scores["recall_at_1"] <= scores["recall_at_5"] <= 1.0
    assert client.get_run(train["mlflow_run_id"]).data.metrics["test_recall_at_1"] == pytest.approx(scores["recall_at_1"])
    # The drift monitor's reference: the challenger's embeddings of the test split, stored with its run.
    reference = np.load(mlflow.artifacts.download_artifacts(f"runs:/{train['mlflow_run_id']}/drift/reference.npy"))
    assert reference.shape == (prepared["counts"]["test"], 512) and reference.dtype == np.float32
    assert np.allclose(np.linalg.norm(reference, axis=1), 1, atol=1e-4)
