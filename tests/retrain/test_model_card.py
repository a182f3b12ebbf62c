"""The evaluation report and the model card after real stages and a real promotion, on a real MLflow server.

Two tiny models are trained on the digits, each evaluated (the second against the first as champion)
and promoted through the control plane, as the DAG's tasks do; everything is read back the way an
operator's browser reads it: artifacts from the run, the card from the model version, the card's
figures through the URLs it names.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from retrain import model_card, registry
from retrain.settings import Settings
from retrain_contract import artifacts
from tests.helpers import check_figure, run_stage

MODEL = "card-model"
DAG, AIRFLOW_RUN = "retrain_embedder", "manual__2026-01-01T02:00:00+00:00"


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, digits_root, mlflow_server):
    """Runs prepare_data, then twice train (1 and 2 epochs), evaluate and promote; returns what they returned."""
    tmp = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(mlflow_server)
        settings = Settings.from_env({"MLFLOW_TRACKING_URI": mlflow_server, "RETRAIN_HOME": str(tmp),
                                      "RETRAIN_AIRFLOW_URL": "http://airflow.example:8081"})
        common = ("--experiment", "card", "--airflow-dag-id", DAG, "--airflow-run-id", AIRFLOW_RUN)
        prepared, _ = run_stage("prepare_data", "--data-uri", digits_root.as_uri(), "--storage-uri",
                                (tmp / "s").as_uri(), "--model-name", MODEL, *common, tmp_path=tmp)
        rounds = []
        for epochs in (1, 2):
            trained, _ = run_stage("train", "--manifest-uri", prepared["manifest_uri"], "--architecture", "resnet18",
                                   "--image-size", "32", "--epochs", str(epochs), "--batch-size", "32", *common,
                                   tmp_path=tmp)
            evaluated, _ = run_stage("evaluate", "--manifest-uri", prepared["manifest_uri"], "--challenger-uri",
                                     trained["model_uri"], "--challenger-run-id", trained["mlflow_run_id"],
                                     "--model-name", MODEL, "--gallery-size", "0", *common, tmp_path=tmp)
            promotion = registry.promote(MODEL, trained, evaluated, 0.0, MlflowClient(mlflow_server),
                                         preparation=prepared, settings=settings)
            rounds.append((trained, evaluated, promotion))
        mlflow.set_tracking_uri(None)
    return settings, prepared, rounds


def artifact(client: MlflowClient, run_id: str, path: str, tmp_path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


def table_row(card: str, label: str) -> list[str]:
    [row] = [line for line in card.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


@pytest.mark.training
def test_each_report_figure_is_a_png_the_page_embeds_and_the_card_shows(promoted, mlflow_server, tmp_path):
    settings, _, rounds = promoted
    client = MlflowClient(mlflow_server)
    trained, _, promotion = rounds[1]
    run_id = trained["mlflow_run_id"]
    listed = {f.path for f in client.list_artifacts(run_id, artifacts.REPORT_DIR)}
    assert listed == {f"{artifacts.REPORT_DIR}/{name}" for name in artifacts.REPORT_FIGURES} | {
        artifacts.REPORT_PAGE, artifacts.REPORT_SCORES}
    page = artifact(client, run_id, artifacts.REPORT_PAGE, tmp_path).decode()
    card = client.get_model_version(MODEL, promotion["version"]).description
    for name in artifacts.REPORT_FIGURES:
        data = artifact(client, run_id, f"{artifacts.REPORT_DIR}/{name}", tmp_path)
        check_figure(data)
        embedded = re.search(rf'<img src="data:image/png;base64,([^"]+)" alt="[^"]*" '
                             rf'data-artifact="{artifacts.REPORT_DIR}/{re.escape(name)}"', page)
        assert embedded and base64.b64decode(embedded.group(1)) == data, f"{name} is not the page's figure"
        url = model_card.figure_url(settings, model_card.read_facts(
            client, model_name=MODEL, version=promotion["version"], promoted=promotion["promoted"],
            reason=promotion["reason"], champion_version="1", prepare_run_id=promoted[1]["mlflow_run_id"],
            train_run_id=run_id, evaluation_run_id=rounds[1][1]["mlflow_run_id"]), name)
        assert f"]({url})" in card, f"the card does not show {name}"
        served = requests.get(url, timeout=30)  # what the MLflow page's <img> loads
        assert served.status_code == 200 and served.content == data
    assert client.get_model_version(MODEL, promotion["version"]).tags["eval.report"] == \
        f"runs:/{run_id}/{artifacts.REPORT_PAGE}"
    report_link = settings.mlflow_artifact_url(trained["mlflow_experiment_id"], run_id, artifacts.REPORT_PAGE)
    assert f"[evaluation report]({report_link})" in card


@pytest.mark.training
def test_the_card_s_numbers_are_the_runs_metrics(promoted, mlflow_server, tmp_path):
    settings, prepared, rounds = promoted
    client = MlflowClient(mlflow_server)
    trained, evaluated, promotion = rounds[1]
    card = client.get_model_version(MODEL, promotion["version"]).description
    scores = client.get_run(evaluated["mlflow_run_id"]).data.metrics
    for key, label in model_card.SCORES:
        new, old = scores[f"challenger_{key}"], scores[f"champion_{key}"]
        assert table_row(card, label) == [f"{new:.4f}", f"{old:.4f}", f"{new - old:+.4f}"]
        # ...which are the scores evaluate returned and logged on the training run (the report's numbers too).
        assert new == pytest.approx(evaluated["challenger"][key])
        assert client.get_run(trained["mlflow_run_id"]).data.metrics[f"test_{key}"] == pytest.approx(new)
    assert "| metric | this version | champion (version 1) | change |" in card

    training = client.get_run(trained["mlflow_run_id"]).data
    assert f"{training.metrics['images_per_sec']:.1f} images/s in the last epoch" in card
    assert f"final train loss {training.metrics['train_loss']:.4f}" in card
    assert f"Trained on {training.params['device'].upper()}" in card
    for name in ("epochs", "image_size", "batch_size", "architecture", "learning_rate"):
        assert table_row(card, name) == [f"`{training.params[name]}`"]
    assert training.params["epochs"] == "2"
    assert f"code version `{training.tags['code_version']}`, image `{training.tags['image']}`" in card

    data = client.get_run(prepared["mlflow_run_id"]).data.metrics
    assert (f"{int(data['train_images'])} train, {int(data['val_images'])} val, {int(data['test_images'])} test "
            f"images in {int(data['num_classes'])} classes; {int(data['quarantined_files'])} files quarantined") in card
    assert f"dataset version `{prepared['dataset_version']}`" in card
    counts = json.loads(artifact(client, prepared["mlflow_run_id"], artifacts.DATA_REPORT, tmp_path))["counts"]
    for name in counts["train"]:
        assert table_row(card, name) == [str(counts[split][name]) for split in ("train", "val", "test")]

    decision = "promoted to `@champion`" if promotion["promoted"] else "not promoted"
    assert card.startswith(f"## {MODEL} version 2: {decision}\n\n**Why:** {promotion['reason']}\n")
    assert f"Made by Airflow run [`{AIRFLOW_RUN}`]({settings.airflow_run_url(DAG, AIRFLOW_RUN)}) of `{DAG}`" in card
    assert len(card) <= model_card.MAX_LENGTH


@pytest.mark.training
def test_the_first_model_s_card_has_no_champion_to_compare_with(promoted, mlflow_server):
    _, _, rounds = promoted
    client = MlflowClient(mlflow_server)
    card = client.get_model_version(MODEL, rounds[0][2]["version"]).description
    scores = client.get_run(rounds[0][1]["mlflow_run_id"]).data.metrics
    assert card.startswith(f"## {MODEL} version 1: promoted to `@champion`")
    assert table_row(card, "recall@1") == [f"{scores['challenger_recall_at_1']:.4f}"]
    assert "No champion to compare with" in card


def test_a_card_with_a_thousand_classes_and_many_quarantined_files_fits_mlflow_s_limit():
    run = model_card.RunFacts("r" * 32, "1", {"device": "cpu", "epochs": "2", "data_uri": "s3://bucket/images"},
                              {"num_classes": 1000, "train_images": 90_000, "test_images": 10_000,
                               "quarantined_files": 500, "images_per_sec": 1000.0}, {"dataset_version": "d" * 16},
                              1_000, 61_000)
    report = {"dataset_version": "d" * 16, "counts": {"train": {f"class-{i:04d}": 90 for i in range(1000)},
                                                      "test": {f"class-{i:04d}": 10 for i in range(1000)}},
              "quarantined": [{"path": f"train/class-0001/{i}" + "x" * 600 + ".png", "reason": "not a decodable image"}
                              for i in range(500)]}
    facts = model_card.CardFacts("m", "7", False, "challenger recall_at_1 0.5 vs champion 0.6: champion kept", "6",
                                 run, run, run, report)
    card = model_card.render(facts, Settings.from_env({}))
    assert len(card) <= model_card.MAX_LENGTH
    assert "- images per class: 100 to 100" in card and "500 quarantined files" in card
    assert card.count("](") == 4 + 4  # every link and every figure survived the shortening


def test_the_card_names_the_gpu_and_the_processes_a_distributed_run_trained_on():
    run = model_card.RunFacts("r" * 32, "1", {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "world_size": "16",
                                              "batch_size": "256", "global_batch_size": "4096", "amp_dtype": "bfloat16"},
                              {"images_per_sec": 48_000.0}, {}, 1_000, 601_000)
    facts = model_card.CardFacts("m", "7", True, "first version", None, run, run, run, {})
    card = model_card.render(facts, Settings.from_env({}))
    assert "Trained on GPU (NVIDIA H100 80GB HBM3) x 16 processes: run took" in card
    assert "48000.0 images/s in the last epoch" in card
    assert "global_batch_size `4096`" in card and "amp_dtype `bfloat16`" in card
    assert table_row(card, "batch_size") == ["`256`"]

