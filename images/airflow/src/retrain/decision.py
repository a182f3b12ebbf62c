"""Whether a ``retrain_embedder`` run should train at all, decided from the registry and MLflow metrics.

Retrain when forced, when there is no champion, when the champion is older than the maximum age, or
when the drift monitor has confirmed drift (K consecutive drifted windows) and the last training is
outside the cooldown. A NaN score, an empty history for a champion the monitor has had time to
watch, or an unreachable MLflow never retrain: they raise, the task retries, and its final failure
alerts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from mlflow import MlflowClient

from retrain import drift, drift_history
from retrain.settings import DriftSettings, Settings
from retrain_contract import artifacts
from retrain_contract.registry import CHAMPION, alias_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    champion_version: str | None = None
    serving_version: str | None = None
    vetoed_version: str | None = None


@dataclass(frozen=True)
class Signals:
    champion_version: str | None
    champion_age_days: float | None = None
    drift_state: str | None = None  # drift | ok | None (not monitored yet)
    drift_reason: str = ""
    hours_since_training: float | None = None


def decide(force: bool, signals: Signals, cfg: DriftSettings) -> RetrainDecision:
    champion = signals.champion_version
    if force:
        return RetrainDecision(True, "force_retrain was set on this run", champion)
    if champion is None:
        return RetrainDecision(True, "there is no champion model yet", None)
    age = signals.champion_age_days
    if age is not None and age >= cfg.max_age_days:
        return RetrainDecision(True, f"champion version {champion} is {age:.1f} days old (maximum "
                                     f"{cfg.max_age_days:g})", champion)
    if signals.drift_state == drift.DRIFT:
        since = signals.hours_since_training
        if since is not None and since < cfg.cooldown_h:
            return RetrainDecision(False, f"drift confirmed for champion version {champion} ({signals.drift_reason}), "
                                          f"but the last training was {since:.1f} h ago, inside the "
                                          f"{cfg.cooldown_h:g} h cooldown", champion)
        return RetrainDecision(True, f"drift confirmed for champion version {champion}: {signals.drift_reason}",
                               champion)
    detail = signals.drift_reason or "no drift signal"
    return RetrainDecision(False, f"champion version {champion} is serving and {detail}; nothing to do "
                                  f"(trigger with force_retrain to train anyway)", champion)


def gather(settings: Settings, cfg: DriftSettings, client: MlflowClient, now: float) -> Signals:
    """Read the signals from MLflow; raises (MlflowException, DriftSignalError) when they cannot be trusted."""
    name = settings.model_name
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return Signals(None)
    created = client.get_model_version(name, champion).creation_timestamp / 1000
    age_days = (now - created) / 86400
    run = drift_history.monitoring_run(client, settings, name, champion, create=False)
    windows = drift_history.history(client, run.info.run_id) if run else []
    if not any(p is not None for _, p in windows):
        watched_for = now - created
        needed = artifacts.window_complete_at(0, cfg.windows * cfg.window_s)
        if watched_for < needed:
            return Signals(champion, age_days, None, f"no drift window scored yet for version {champion} "
                                                     f"(promoted {watched_for / 3600:.1f} h ago)")
    state, why = drift_history.drift_state(windows, cfg.alpha, cfg.windows)  # raises on an empty history or NaN
    experiment = client.get_experiment_by_name(settings.experiment)
    since = None
    if experiment is not None:
        last = client.search_runs([experiment.experiment_id], "tags.stage = 'train'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if last:
            since = (now - last[0].info.start_time / 1000) / 3600
    return Signals(champion, age_days, state, why if state == drift.DRIFT else f"drift monitor reports no drift: {why}",
                   since)


def check(settings: Settings, force: bool, client: MlflowClient | None = None, cfg: DriftSettings | None = None,
          now: float | None = None) -> RetrainDecision:
    client = client or MlflowClient()
    cfg = cfg or settings.drift
    now = time.time() if now is None else now
    if force:
        return decide(True, Signals(alias_version(client, settings.model_name, CHAMPION)), cfg)
    return decide(False, gather(settings, cfg, client, now), cfg)


def check_serving(settings: Settings, force: bool, run_id: str, client: MlflowClient | None = None,
                  cfg: DriftSettings | None = None, now: float | None = None, target: Any = None,
                  lift: bool = False) -> RetrainDecision:
    """The run's first decision, on what actually serves: reconcile it with the registry (an operator's veto,
    a run that did not finish its rollout: :mod:`retrain.rollout.ownership`), lift a veto when asked, then
    :func:`check`. What reconciliation noticed and did leads the reason."""
    from retrain.rollout import ownership, target_for

    client = client or MlflowClient()
    own = ownership.reconcile(settings, client, target or target_for(settings), run_id)
    notes = list(own.notes)
    if lift:
        version = ownership.latest_veto(client, settings.model_name)
        if version is not None:
            notes.append(ownership.lift_veto(client, settings.model_name, version, run_id))
            force = True
        else:
            notes.append("lift_veto: no version carries an operator's veto; nothing to lift")
    decided = check(settings, force, client, cfg, now)
    if lift and force and decided.reason == "force_retrain was set on this run":
        decided = replace(decided, reason="lift_veto was set on this run")
    serving = f"version {own.serving} serves" if own.serving else "nothing serves yet"
    reason = " ".join([*notes, decided.reason]) if notes else decided.reason
    log.info("serving: %s; @%s: version %s", serving, CHAMPION, decided.champion_version)
    return replace(decided, reason=reason, serving_version=own.serving, vetoed_version=own.vetoed)
