"""Whether a ``retrain_embedder`` run should train at all, decided from the registry and MLflow."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient

from retrain.registry import CHAMPION, alias_version


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    champion_version: str | None = None


def decide(force: bool, champion_version: str | None, drift_confirmed: bool | None) -> RetrainDecision:
    """``drift_confirmed`` is None while no drift monitor has reported for the champion."""
    if force:
        return RetrainDecision(True, "force_retrain was set on this run", champion_version)
    if champion_version is None:
        return RetrainDecision(True, "there is no champion model yet", None)
    if drift_confirmed:
        return RetrainDecision(True, f"drift confirmed for champion version {champion_version}", champion_version)
    signal = "no drift signal" if drift_confirmed is None else "drift monitor reports no drift"
    return RetrainDecision(
        False, f"champion version {champion_version} is serving and {signal}; "
               f"nothing to do (trigger with force_retrain to train anyway)", champion_version)


def check(model_name: str, force: bool, client: MlflowClient | None = None) -> RetrainDecision:
    client = client or MlflowClient()
    return decide(force, alias_version(client, model_name, CHAMPION), drift_confirmed=None)
