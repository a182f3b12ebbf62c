"""The one stage runner: the same command, arguments and environment as a local subprocess or a pod.

A stage is ``python -m embedder.<name> <arguments>`` (:mod:`retrain_contract.stages`). The arguments
are Airflow templates, rendered by the operator, so XCom and Params flow into both runners the same
way. ``RETRAIN_RUNNER`` picks :mod:`~retrain.runners.local` or :mod:`~retrain.runners.kubernetes`; in
kubernetes mode, ``RETRAIN_TRAIN_NODES`` > 1 runs train on that many pods (:mod:`~retrain.runners.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from retrain.runners.common import STAGES
from retrain.settings import Settings
from retrain_contract.params import ParamSpec


def param_arguments(specs: Sequence[ParamSpec]) -> list[str]:
    """The stage flags of these run Params, as templates of their values (an empty optional one: ``""``)."""
    return [arg for spec in specs
            for arg in (spec.flag, f"{{{{ '' if params.{spec.name} is none else params.{spec.name} }}}}")]


def stage_operator(name: str, arguments: list[str], settings: Settings, **kwargs: Any) -> BaseOperator:
    """The operator that runs stage ``name`` with the configured runner."""
    spec = STAGES[name]
    if settings.runner == "local":
        from retrain.runners.local import LocalStageOperator

        return LocalStageOperator(task_id=name, stage=spec, arguments=arguments, python=settings.local_python,
                                  env=settings.stage_env(), preemption_delay_s=settings.preemption_delay_s,
                                  nproc_per_node=settings.train_procs if spec.gpu else 1, **kwargs)
    if name == "train" and settings.pods.train_nodes > 1:
        from retrain.runners.distributed import distributed_train_operator

        return distributed_train_operator(arguments, settings, **kwargs)
    from retrain.runners.kubernetes import stage_pod_operator

    return stage_pod_operator(name, arguments, spec.gpu, settings, **kwargs)
