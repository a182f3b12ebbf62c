"""Extra links on the tasks (buttons in the Airflow UI): from a task to what it made, in MLflow or serving.

Each link is resolved from the task's own result (its ``return_value`` XCom) when the task ends,
in the worker; Airflow stores the URL and the UI shows it. Nothing here calls MLflow: the URLs are
built from ids in the result and the browser-facing addresses in the settings
(``RETRAIN_MLFLOW_UI_URL``, ``RETRAIN_SERVING_URL``). A task without a result (failed, skipped), or
whose result lacks the ids, gets no URL, so its button stays disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from retrain.settings import Settings


class ResultLink(BaseOperatorLink):
    """A link named ``name``, built by ``build`` from the task's result once it has every field in ``needs``."""

    def __init__(self, name: str, needs: tuple[str, ...], build: Callable[[Settings, dict[str, Any]], str]):
        self._name, self.needs, self.build = name, needs, build

    @property
    def name(self) -> str:
        return self._name

    @property
    def xcom_key(self) -> str:
        return f"_link_{self._name.replace(' ', '_')}"

    def url(self, settings: Settings, result: dict[str, Any]) -> str | None:
        return self.build(settings, result) if all(result.get(k) for k in self.needs) else None

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        result = XCom.get_value(ti_key=ti_key, key="return_value")
        return (self.url(Settings.from_env(), result) or "") if isinstance(result, dict) else ""


# The stage's MLflow run (prepare_data, train: the training run, evaluate: the evaluation run).
MLFLOW_RUN = ResultLink("MLflow run", ("mlflow_experiment_id", "mlflow_run_id"),
                        lambda s, r: s.mlflow_run_url(r["mlflow_experiment_id"], r["mlflow_run_id"]))
# The model version promote registered, with its scores, lineage and decision.
MODEL_VERSION = ResultLink("Model version", ("model_name", "version"),
                           lambda s, r: s.model_version_url(r["model_name"], r["version"]))
# What serves after deploy: the serving API's own report of the model it runs.
SERVING = ResultLink("Serving", ("model_version",), lambda s, r: f"{s.serving_url}/metadata")
# The rollout's record in MLflow's <experiment>-serving experiment (what served when, from which run).
ROLLOUT_RECORD = ResultLink("Rollout record", ("serving_experiment_id", "serving_run_id"),
                            lambda s, r: s.mlflow_run_url(r["serving_experiment_id"], r["serving_run_id"]))
# The analysis of the preview on mirrored traffic: its gates, their thresholds and what they measured.
ANALYSIS_RECORD = ResultLink("Analysis record", ("serving_experiment_id", "analysis_run_id"),
                             lambda s, r: s.mlflow_run_url(r["serving_experiment_id"], r["analysis_run_id"]))
ALL = (MLFLOW_RUN, MODEL_VERSION, SERVING, ROLLOUT_RECORD, ANALYSIS_RECORD)
