"""Promotion and the retrain decision, against a real MLflow registry (SQLite store)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from retrain import registry
from retrain_contract import artifacts
from retrain_contract.registry import alias_version
from retrain_contract.results import EvaluateResult, PrepareResult, Scores, TrainResult


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def logged_model(tags: dict[str, str] | None = None) -> dict:
    """A logged (tiny) model and its run, shaped like the train stage's result."""
    mlflow.set_experiment("t")
    with mlflow.start_run(tags={"dataset_version": "d1", "airflow.run_id": "manual__1", "code_version": "abc",
                                **(tags or {})}) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
    return TrainResult(mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id,
                       model_uri=info.model_uri, dataset_version="d1", architecture="resnet18", image_size=32,
                       embedding_dim=512).to_json()


def evaluation(train: dict, recall: float, champion: tuple[str, float] | None) -> dict:
    """An evaluation run with both models' metrics, and its result as the evaluate stage returns it."""
    def scores(model_uri: str, recall: float, version: str | None = None) -> Scores:
        return Scores(model_uri=model_uri, run_id="r", recall_at_1=recall, recall_at_5=min(1, recall + 0.05),
                      top1_accuracy=recall - 0.01, num_queries=60, version=version)

    challenger = scores(train["model_uri"], recall)
    scored = scores(f"models:/m/{champion[0]}", champion[1], champion[0]) if champion else None
    with mlflow.start_run(tags={"stage": "evaluate", "dataset_version": "d1"}) as run:
        mlflow.log_metrics({f"challenger_{k}": getattr(challenger, k) for k in ("recall_at_1", "recall_at_5", "top1_accuracy")}
                           | ({f"champion_{k}": getattr(scored, k) for k in ("recall_at_1", "recall_at_5", "top1_accuracy")}
                              if scored else {}))
    return EvaluateResult(dataset_version="d1", manifest_uri="file:///m.json", challenger=challenger, champion=scored,
                          mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id).to_json()


def preparation() -> dict:
    """A data snapshot run as prepare_data logs it (metrics and data report), and its result."""
    counts = {"train": {"cat": 8, "dog": 8}, "test": {"cat": 2, "dog": 2}}
    with mlflow.start_run(tags={"stage": "prepare_data", "dataset_version": "d1"}) as run:
        mlflow.log_params({"data_uri": "file:///data"})
        mlflow.log_metrics({"num_classes": 2, "quarantined_files": 1, "train_images": 16, "test_images": 4})
        mlflow.log_dict({"dataset_version": "d1", "counts": counts,
                         "quarantined": [{"path": "train/cat/x.png", "reason": "empty file (0 bytes)"}]},
                        artifacts.DATA_REPORT)
    return PrepareResult(mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id, dataset_version="d1",
                         manifest_uri="file:///m.json", classes=["cat", "dog"], counts={"train": 16, "test": 4}).to_json()


def promote(train: dict, evaluated: dict, min_improvement: float = 0.0) -> dict:
    return registry.promote("m", train, evaluated, min_improvement, preparation=preparation())


@pytest.mark.parametrize("challenger,champion,min_improvement,promote", [
    (0.50, None, 0.0, True),      # first model
    (0.80, 0.70, 0.05, True),     # clear gain
    (0.75, 0.70, 0.05, True),     # exactly the required gain
    (0.74, 0.70, 0.05, False),    # not enough
    (0.70, 0.70, 0.0, False),     # equal is not better
    (0.60, 0.70, 0.0, False),     # worse
])
def test_decide_promotion(challenger, champion, min_improvement, promote):
    assert registry.decide_promotion(challenger, champion, min_improvement).promote is promote


def test_negative_min_improvement_is_refused():
    with pytest.raises(ValueError, match="min_improvement must be >= 0"):
        registry.decide_promotion(0.5, 0.4, -0.1)


def test_first_model_becomes_champion_with_lineage_and_scores(mlflow_sqlite):
    client = MlflowClient()
    train = logged_model()
    result = promote(train, evaluation(train, 0.8, None))
    assert (result["version"], result["promoted"], result["previous_champion"]) == ("1", True, None)
    assert alias_version(client, "m", "champion") == "1"
    assert alias_version(client, "m", "challenger") == "1"
    tags = client.get_model_version("m", "1").tags
    assert tags["dataset_version"] == "d1" and tags["airflow.run_id"] == "manual__1" and tags["code_version"] == "abc"
    assert tags["promotion.decision"] == "promoted" and tags["eval.recall_at_1"] == "0.800000"
    assert client.get_model_version("m", "1").current_stage == "None"  # no MLflow stages


def test_weaker_challenger_is_registered_but_champion_stays(mlflow_sqlite):
    client = MlflowClient()
    first = logged_model()
    promote(first, evaluation(first, 0.8, None))
    second = logged_model()
    result = promote(second, evaluation(second, 0.79, ("1", 0.8)))
    assert (result["version"], result["promoted"], result["champion"]) == ("2", False, "1")
    assert alias_version(client, "m", "champion") == "1"
    assert alias_version(client, "m", "challenger") == "2"
    tags = client.get_model_version("m", "2").tags
    assert tags["promotion.decision"] == "rejected" and tags["champion.recall_at_1"] == "0.800000"
    assert "champion kept" in tags["promotion.reason"]


def test_retried_promote_reuses_the_version(mlflow_sqlite):
    train = logged_model()
    promote(train, evaluation(train, 0.8, None))
    again = promote(train, evaluation(train, 0.8, ("1", 0.8)))
    assert again["version"] == "1"
    assert len(MlflowClient().search_model_versions("name = 'm'")) == 1


def test_a_retry_after_promote_moved_the_champion_finishes_with_the_same_result(mlflow_sqlite):
    """The task's first attempt moved @champion and was lost before it returned: the retry (same inputs) succeeds
    with the same decision instead of refusing "another run moved it", so deploy runs."""
    first = logged_model()
    promote(first, evaluation(first, 0.8, None))
    second = logged_model()
    scored = evaluation(second, 0.9, ("1", 0.8))
    done = promote(second, scored)
    again = promote(second, scored)  # @champion is now 2, but 2 is this training run's version
    assert again == done and (again["version"], again["promoted"], again["previous_champion"]) == ("2", True, "1")
    assert again["champion_recall_at_1"] == 0.8
    assert alias_version(MlflowClient(), "m", "champion") == "2"


def test_champion_moved_since_evaluation_is_refused(mlflow_sqlite):
    first = logged_model()
    promote(first, evaluation(first, 0.8, None))
    second = logged_model()
    with pytest.raises(RuntimeError, match="evaluated against None; another run moved it"):
        promote(second, evaluation(second, 0.9, None))
    assert len(MlflowClient().search_model_versions("name = 'm'")) == 1


def test_the_card_says_why_a_weaker_challenger_was_not_promoted_with_the_evaluation_run_s_numbers(mlflow_sqlite):
    client = MlflowClient()
    first = logged_model()
    promote(first, evaluation(first, 0.8, None))
    second = logged_model()
    evaluated = evaluation(second, 0.79, ("1", 0.8))
    promote(second, evaluated)
    card = client.get_model_version("m", "2").description
    metrics = client.get_run(evaluated["mlflow_run_id"]).data.metrics
    assert card.startswith("## m version 2: not promoted\n")
    assert f"**Why:** {client.get_model_version('m', '2').tags['promotion.reason']}" in card
    assert (f"| recall@1 | {metrics['challenger_recall_at_1']:.4f} | {metrics['champion_recall_at_1']:.4f} | "
            f"{metrics['challenger_recall_at_1'] - metrics['champion_recall_at_1']:+.4f} |") in card
    assert "| metric | this version | champion (version 1) | change |" in card
    assert "16 train, 4 test images in 2 classes; 1 file quarantined" in card
    assert "- `train/cat/x.png`: empty file (0 bytes)" in card
    assert "Made by Airflow run [`manual__1`]" not in card  # the training run has no airflow.dag_id
    assert "code version `abc`" in card
    first_card = client.get_model_version("m", "1").description
    assert first_card.startswith("## m version 1: promoted to `@champion`") and "No champion to compare with" in first_card
