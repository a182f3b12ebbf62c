"""The model registry's names, and the one way to ask which version an alias points at.

Aliases, never MLflow's deprecated stages: ``champion`` is what serving runs, ``challenger`` the
latest candidate. Promotion compares :data:`HEADLINE_METRIC` on the same data snapshot. Every model
version carries the :data:`LINEAGE_TAGS` of the run that trained it.
"""

from __future__ import annotations

from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
HEADLINE_METRIC = "recall_at_1"
LINEAGE_TAGS = ("airflow.dag_id", "airflow.run_id", "dataset_version", "code_version", "image")
# What an MlflowException says when the model or the alias does not exist (any other error is raised).
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def alias_model_version(client: Any, model_name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` that ``alias`` points at (``client``: an ``MlflowClient``), or None when there is none.

    Only "no such model" and "no such alias" mean None; an unreachable server or any other error is
    raised, so a caller never mistakes an outage for "no champion yet".
    """
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except Exception as exc:
        if getattr(exc, "error_code", None) in _MISSING:
            return None
        raise


def alias_version(client: Any, model_name: str, alias: str) -> str | None:
    """The version number ``alias`` points at, as a string, or None (see :func:`alias_model_version`)."""
    found = alias_model_version(client, model_name, alias)
    return None if found is None else str(found.version)
