"""The project's Airflow plugin: what Airflow's own components need from ``retrain``, and nothing else.

- extra links on the tasks (MLflow run, model version, serving, rollout record), computed in the
  worker from each task's result (:mod:`retrain.links`);
- a run note on every finished ``retrain_embedder`` run, set by a listener in the scheduler
  (:mod:`retrain.run_notes`);
- one-line messages for Params the API server refuses (:mod:`retrain.param_errors`).

``plugins/.airflowignore`` keeps Airflow's plugin loader out of the ``retrain`` package itself: the
loader would otherwise execute every module in it as a top-level module of its own name.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from retrain import links, run_notes
from retrain.param_errors import ParamErrorMiddleware


class RetrainPlugin(AirflowPlugin):
    name = "retrain"
    operator_extra_links = list(links.ALL)
    listeners = [run_notes]
    fastapi_root_middlewares = [
        {"middleware": ParamErrorMiddleware, "args": [], "kwargs": {}, "name": "one-line Param errors"},
    ]
