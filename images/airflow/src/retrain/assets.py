"""The Airflow Assets the two DAGs share."""

from __future__ import annotations

from airflow.sdk import Asset

from retrain.settings import Settings


def drift_asset(settings: Settings) -> Asset:
    """Updated by ``monitor_drift`` when drift is confirmed; ``retrain_embedder`` runs on it (or its cron)."""
    return Asset(name=f"{settings.model_name}_drift_confirmed", uri=f"x-retrain://{settings.model_name}/drift")
