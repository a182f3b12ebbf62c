"""Model registry: register the challenger, decide promotion, move aliases. MLflow stages are never used.

Aliases: ``challenger`` is the latest candidate, ``champion`` is what serving should run. The
champion moves only when the challenger beats it on the same data snapshot by at least
``min_improvement`` in recall@1; the decision and both scores are recorded on the new version, and its
description is the model card (:mod:`retrain.model_card`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from retrain import model_card
from retrain.settings import Settings
from retrain_contract import artifacts
from retrain_contract.registry import CHALLENGER, CHAMPION, HEADLINE_METRIC, LINEAGE_TAGS, alias_version
from retrain_contract.results import EvaluateResult, PrepareResult, PromoteResult, TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def decide_promotion(challenger_score: float, champion_score: float | None, min_improvement: float) -> PromotionDecision:
    """Promote when there is no champion, or when the challenger is better by at least ``min_improvement``.

    "Better" is strict: with ``min_improvement=0`` an equal score keeps the champion.
    """
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
    if champion_score is None:
        return PromotionDecision(True, "no champion yet: the first model is promoted")
    delta = challenger_score - champion_score
    if delta > 0 and delta >= min_improvement:
        return PromotionDecision(
            True, f"challenger {HEADLINE_METRIC} {challenger_score:.4f} beats champion {champion_score:.4f} "
                  f"by {delta:+.4f} (>= {min_improvement})")
    return PromotionDecision(
        False, f"challenger {HEADLINE_METRIC} {challenger_score:.4f} vs champion {champion_score:.4f}: "
               f"{delta:+.4f} is not an improvement of at least {min_improvement}; champion kept")


def register_challenger(client: MlflowClient, model_name: str, model_uri: str, run_id: str,
                        extra_tags: dict[str, str]) -> str:
    """Register the challenger once per training run (a retried task finds its earlier version)."""
    import mlflow

    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        version = str(max(existing, key=lambda mv: int(mv.version)).version)
        log.info("run %s is already registered as %s version %s", run_id, model_name, version)
        return version
    run_tags = client.get_run(run_id).data.tags
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags} | extra_tags
    # register_model prints its progress ("Successfully registered model ...") to stderr, which a task
    # log shows as errors; it goes to this module's log at INFO instead.
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        mv = mlflow.register_model(model_uri, model_name, tags=tags)
    for line in printed.getvalue().splitlines():
        if line.strip():
            log.info("%s", line.strip())
    return str(mv.version)


def promote(model_name: str, train_result: dict[str, Any], evaluation: dict[str, Any], min_improvement: float,
            client: MlflowClient | None = None, *, preparation: dict[str, Any],
            settings: Settings | None = None) -> dict[str, Any]:
    """Register the evaluated challenger with its model card, set ``challenger``, and move ``champion`` if it earned it.

    The card (:mod:`retrain.model_card`) is the version's description; it is written before an alias
    moves, so no alias ever points at a version without one.
    """
    client = client or MlflowClient()
    settings = settings or Settings.from_env()
    prepared = PrepareResult.from_json(preparation)
    train, scored = TrainResult.from_json(train_result), EvaluateResult.from_json(evaluation)
    challenger, champion = scored.challenger, scored.champion
    current = alias_version(client, model_name, CHAMPION)
    evaluated_against = champion.version if champion else None
    if current != evaluated_against:
        done = _already_promoted(client, model_name, train.mlflow_run_id, current, evaluated_against)
        if done is not None:  # a retry of this task after it had moved @champion: the same result again
            log.info("%s version %s was promoted by an earlier attempt of this task: %s", model_name, done.version,
                     done.reason)
            return done.to_json()
        raise RuntimeError(
            f"@{CHAMPION} of {model_name} is version {current}, but the challenger was evaluated against "
            f"{evaluated_against}; another run moved it. Re-run evaluate so both are scored on the same data."
        )
    champion_score = getattr(champion, HEADLINE_METRIC) if champion else None
    decision = decide_promotion(getattr(challenger, HEADLINE_METRIC), champion_score, min_improvement)
    tags = {
        "eval.dataset_version": scored.dataset_version,
        "eval.recall_at_1": f"{challenger.recall_at_1:.6f}",
        "eval.recall_at_5": f"{challenger.recall_at_5:.6f}",
        "eval.top1_accuracy": f"{challenger.top1_accuracy:.6f}",
        "eval.run_id": scored.mlflow_run_id,
        "eval.report": f"runs:/{train.mlflow_run_id}/{artifacts.REPORT_PAGE}",
        "champion.version": champion.version if champion else "none",
        f"champion.{HEADLINE_METRIC}": f"{champion_score:.6f}" if champion else "none",
        "promotion.min_improvement": str(min_improvement),
        "promotion.decision": "promoted" if decision.promote else "rejected",
        "promotion.reason": decision.reason,
    }
    version = register_challenger(client, model_name, challenger.model_uri, train.mlflow_run_id, tags)
    for key, value in tags.items():  # also on a re-used version, so the latest decision is what it shows
        client.set_model_version_tag(model_name, version, key, value)
    model_card.write(client, settings, model_card.read_facts(
        client, model_name=model_name, version=version, promoted=decision.promote, reason=decision.reason,
        champion_version=evaluated_against, prepare_run_id=prepared.mlflow_run_id, train_run_id=train.mlflow_run_id,
        evaluation_run_id=scored.mlflow_run_id))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("%s version %s: %s", model_name, version, decision.reason)
    return PromoteResult(model_name=model_name, version=version, promoted=decision.promote, reason=decision.reason,
                         previous_champion=current, champion=version if decision.promote else current,
                         recall_at_1=getattr(challenger, HEADLINE_METRIC), champion_recall_at_1=champion_score,
                         dataset_version=scored.dataset_version).to_json()


def _already_promoted(client: MlflowClient, model_name: str, train_run_id: str, current: str | None,
                      evaluated_against: str | None) -> PromoteResult | None:
    """The result of an earlier attempt that registered this training run and moved ``@champion`` to it, if one did."""
    mine = client.search_model_versions(f"name = '{model_name}' and run_id = '{train_run_id}'")
    if not mine or current is None:
        return None
    mv = max(mine, key=lambda m: int(m.version))
    tags = mv.tags or {}
    if str(mv.version) != current or tags.get("promotion.decision") != "promoted" or \
            tags.get("champion.version", "none") != (evaluated_against or "none"):
        return None
    champion_score = tags.get(f"champion.{HEADLINE_METRIC}", "none")
    return PromoteResult(model_name=model_name, version=current, promoted=True, reason=tags.get("promotion.reason", ""),
                         previous_champion=evaluated_against, champion=current,
                         recall_at_1=float(tags["eval.recall_at_1"]), dataset_version=tags["eval.dataset_version"],
                         champion_recall_at_1=None if champion_score == "none" else float(champion_score))


def embedding_dim(client: MlflowClient, name: str, version: str) -> int | None:
    """The embedding width recorded in the model version's MLmodel metadata, read through ``client``'s server."""
    import yaml
    from mlflow.artifacts import download_artifacts

    try:
        # The version's artifact location from the registry, then its MLmodel through the tracking server.
        # (A models:/ URI would be resolved with MLflow's default registry, not this client's.)
        location = client.get_model_version_download_uri(name, version)
        with tempfile.TemporaryDirectory(prefix="mlmodel-") as tmp:
            path = download_artifacts(artifact_uri=f"{location.rstrip('/')}/MLmodel", dst_path=tmp,
                                      tracking_uri=client.tracking_uri)
            return int(yaml.safe_load(Path(path).read_text())["metadata"]["embedding_dim"])
    except Exception as exc:  # the smoke test then checks the norm and latency only
        log.warning("could not read the embedding dimension of %s version %s (%s)", name, version, exc)
        return None
