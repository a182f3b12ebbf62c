"""The control plane's own tasks as operators: the retrain decision, promotion and deployment.

They are thin: each calls one function of the control plane (:mod:`retrain.decision`,
:mod:`retrain.registry`, :mod:`retrain.rollout`) with its rendered inputs, logs what it decided at
INFO, and returns a small JSON result (the task's XCom) from which its extra links are built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin

from retrain import links
from retrain.settings import Settings
from retrain_contract.results import CheckDriftResult


class CheckDriftOperator(BaseOperator, SkipMixin):
    """Decide from the registry and MLflow whether this run trains; when not, skip the rest and say why.

    Reads the run's Params ``force_retrain``, ``drift_alpha``, ``drift_windows``, ``drift_cooldown_h``
    and ``max_champion_age_days``. The reason is logged at INFO before the task ends and returned as
    the task's result (``{"retrain": ..., "reason": ...}``); a run that skips also gets it as its note.
    """

    ui_color = "#fdf6e3"

    def execute(self, context: Any) -> dict[str, Any]:
        from retrain import decision

        settings = Settings.from_env()
        p = context["params"]
        cfg = dataclasses.replace(settings.drift, alpha=float(p["drift_alpha"]), windows=int(p["drift_windows"]),
                                  cooldown_h=float(p["drift_cooldown_h"]), max_age_days=float(p["max_champion_age_days"]))
        result = decision.check_serving(settings, bool(p["force_retrain"]), run_id=context["run_id"], cfg=cfg,
                                        lift=bool(p.get("lift_veto", False)))
        verdict = CheckDriftResult(retrain=result.retrain, reason=result.reason, champion_version=result.champion_version,
                                   serving_version=result.serving_version,
                                   vetoed_version=result.vetoed_version).to_json()
        if not result.retrain:
            self.log.info("no retrain, skipping the rest of the run: %s", result.reason)
            context["ti"].xcom_push(key="return_value", value=verdict)
            # skip() ends the task here (successfully, by raising), so the result is pushed first.
            self.skip(ti=context["ti"], tasks=list(self.get_direct_relatives(upstream=False)))
        self.log.info("retrain: %s", result.reason)
        return verdict


class PromoteOperator(BaseOperator):
    """Register the challenger with its model card and move ``@champion`` only if it beats the champion on the same data.

    The card (the version's description) reads the runs of ``preparation``, ``train_result`` and ``evaluation``.
    """

    template_fields: Sequence[str] = ("preparation", "train_result", "evaluation")
    operator_extra_links = (links.MODEL_VERSION,)
    ui_color = "#e8eefa"

    def __init__(self, *, preparation: Any, train_result: Any, evaluation: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.preparation, self.train_result, self.evaluation = preparation, train_result, evaluation

    def execute(self, context: Any) -> dict[str, Any]:
        from retrain import registry

        settings = Settings.from_env()
        min_improvement = float(context["params"]["min_improvement"])
        result = registry.promote(settings.model_name, self.train_result, self.evaluation, min_improvement,
                                  preparation=self.preparation, settings=settings)
        url = settings.model_version_url(result["model_name"], result["version"])
        self.log.info("%s: %s version %s: %s (%s)", "PROMOTED" if result["promoted"] else "NOT PROMOTED",
                      result["model_name"], result["version"], result["reason"], url)
        return result


class DeployOperator(BaseOperator):
    """Serve the champion, one embedding space at a time: a preview beside the active version, proven on mirrored
    live traffic (topped up with the snapshot's held-out images), then every client switched at once.

    A verdict (preview, analysis or switch failed) fails the task without retries. A retry after anything
    else (a worker lost, MLflow or the API server down) goes on from the state it finds (:mod:`retrain.rollout`).
    """

    template_fields: Sequence[str] = ("promotion", "preparation")
    operator_extra_links = (links.SERVING, links.ROLLOUT_RECORD, links.ANALYSIS_RECORD)
    ui_color = "#e8f4fa"

    def __init__(self, *, promotion: Any, preparation: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.promotion, self.preparation = promotion, preparation

    def execute(self, context: Any) -> dict[str, Any]:
        from retrain import rollout
        from retrain_contract.results import PrepareResult

        def replay_images(count: int) -> list[tuple[str, bytes]]:
            return rollout.held_out_images(PrepareResult.from_json(self.preparation).manifest_uri, count)

        # A verdict raises RolloutFailed: no retries, and (alerted) no second alert.
        return rollout.roll_out_champion(Settings.from_env(), self.promotion, context["run_id"],
                                         replay_images=replay_images if self.preparation else None,
                                         lift_veto=bool(context.get("params", {}).get("lift_veto", False)))
