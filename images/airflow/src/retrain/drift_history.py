"""The drift history: each monitored window's scores in MLflow, and the drift state they add up to.

The monitor writes it (:mod:`retrain.monitor`) and the retrain decision reads it (:mod:`retrain.decision`):
one MLflow run per model version in the ``<experiment>-monitoring`` experiment, whose metric series
``p_value`` and ``insufficient`` have the window's start (epoch seconds) as their step.
"""

from __future__ import annotations

import math

from mlflow import MlflowClient

from retrain import drift
from retrain.settings import Settings


class DriftSignalError(RuntimeError):
    """The drift history cannot be read or makes no sense (NaN); never a reason to retrain."""


def monitoring_experiment(settings: Settings) -> str:
    return f"{settings.experiment}-monitoring"


def monitoring_run(client: MlflowClient, settings: Settings, model_name: str, version: str, create: bool = True):
    """The MLflow run that holds ``version``'s drift series (created on first use)."""
    name = monitoring_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            return None
        experiment_id = client.create_experiment(name)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], f"tags.`drift.model_name` = '{model_name}' and "
                                                f"tags.`drift.model_version` = '{version}'", max_results=1)
    if found:
        return found[0]
    if not create:
        return None
    return client.create_run(experiment_id, run_name=f"drift {model_name} v{version}",
                             tags={"drift.model_name": model_name, "drift.model_version": str(version),
                                   "drift.state": drift.OK})


def history(client: MlflowClient, run_id: str) -> list[tuple[int, float | None]]:
    """``(window start, p-value or None when insufficient)``, oldest first."""
    insufficient = {m.step for m in client.get_metric_history(run_id, "insufficient") if m.value == 1}
    p_values = {m.step: m.value for m in client.get_metric_history(run_id, "p_value")}
    steps = sorted(insufficient | p_values.keys())
    return [(s, None if s in insufficient else p_values[s]) for s in steps]


def drift_state(windows: list[tuple[int, float | None]], alpha: float, k: int) -> tuple[str, str]:
    """(state, why): ``drift`` when the last ``k`` sufficient windows all have ``p < alpha``.

    Insufficient windows are skipped (they neither confirm nor clear drift). A NaN p-value among the
    windows considered raises DriftSignalError: the history is broken, which must not retrain.
    """
    scored = [(start, p) for start, p in windows if p is not None]
    if not scored:
        raise DriftSignalError("no scored drift window yet (empty history or only insufficient windows)")
    recent = scored[-k:]
    if any(math.isnan(p) for _, p in recent):
        raise DriftSignalError(f"NaN p-value in the last {k} drift windows: {recent}")
    drifted = sum(p < alpha for _, p in recent)
    if len(recent) == k and drifted == k:
        return drift.DRIFT, f"p < {alpha} in each of the last {k} windows (latest p = {recent[-1][1]:.4g})"
    return drift.OK, f"{drifted} of the last {len(recent)} scored windows drifted (need {k} in a row)"
