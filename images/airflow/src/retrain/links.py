"""Extra links on the tasks (buttons in the Airflow UI): from a task to what it made, in MLflow or serving.

Each link is resolved from the task's own result (its ``return_value`` XCom) when the task ends,
in the worker; Airflow stores the URL and the UI shows it. Nothing here calls MLflow: the URLs are
built from ids in the result and the browser-facing addresses in the settings
(``RETRAIN_MLFLOW_UI_URL``, ``RETRAIN_SERVING_URL``). A task without a result (failed, skipped)
gets no URL, so its button stays disabled.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from retrain.settings import Settings


class ResultLink(BaseOperatorLink):
    """A link computed from the task's result; ``""`` (no link) while there is none."""

    name = "result"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        result = XCom.get_value(ti_key=ti_key, key="return_value")
        if not isinstance(result, dict):
            return ""
        return self.url(Settings.from_env(), result) or ""

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        raise NotImplementedError


class MLflowRunLink(ResultLink):
    """The stage's MLflow run (``prepare_data``, ``train``: its training run, ``evaluate``: the evaluation run)."""

    name = "MLflow run"

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        if result.get("mlflow_run_id") and result.get("mlflow_experiment_id"):
            return settings.mlflow_run_url(result["mlflow_experiment_id"], result["mlflow_run_id"])
        return None


class ModelVersionLink(ResultLink):
    """The model version ``promote`` registered, with its scores, lineage and decision."""

    name = "Model version"

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        if result.get("model_name") and result.get("version"):
            return settings.model_version_url(result["model_name"], result["version"])
        return None


class ServingLink(ResultLink):
    """What serves after ``deploy``: the serving API's own report of the model it runs."""

    name = "Serving"

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        return f"{settings.serving_url}/metadata" if result.get("model_version") else None


class RolloutRecordLink(ResultLink):
    """The rollout's record in MLflow's ``<experiment>-serving`` experiment (what served when, from which run)."""

    name = "Rollout record"

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        if result.get("serving_run_id") and result.get("serving_experiment_id"):
            return settings.mlflow_run_url(result["serving_experiment_id"], result["serving_run_id"])
        return None


ALL = (MLflowRunLink(), ModelVersionLink(), ServingLink(), RolloutRecordLink())
