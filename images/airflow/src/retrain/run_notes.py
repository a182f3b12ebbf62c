"""Run notes: each finished ``retrain_embedder`` run says, as its note, what it did and why.

A run that skipped training gets ``No retrain: <reason>``; a run that trained gets the decision and
the promotion's outcome, e.g. ``Retrained (drift confirmed ...). Promoted version 3: ...``. The note
shows in the Airflow UI (the run's details and its note button in the runs list) and through the
REST API, so a skipped run is told apart from a training run without opening a log.

A task cannot set its own run's note through the Task SDK; this listener runs in the scheduler when
the run's state becomes final, reads the ``check_drift`` and ``promote`` results from XCom in the
scheduler's own database session and sets the note. A note someone already wrote is never replaced.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)
DAG_ID = "retrain_embedder"
MAX_NOTE = 1000  # the API's limit on a note


def note_for(decision: dict[str, Any] | None, promotion: dict[str, Any] | None, state: str,
             deployment: dict[str, Any] | None = None) -> str | None:
    """The note for a run that ended in ``state``, from its ``check_drift``, ``promote`` and ``deploy`` results."""
    if not decision:
        return None
    if not decision.get("retrain"):
        return f"No retrain: {decision['reason']}"[:MAX_NOTE]
    text = f"Retrained ({decision['reason']})."
    if promotion:
        outcome = "Promoted" if promotion.get("promoted") else "Not promoted"
        text += f" {outcome}: version {promotion.get('version')}: {promotion.get('reason')}"
    elif state == "failed":
        text += " The run failed before promotion."
    if deployment:
        text += (f" Serving: version {deployment.get('model_version')}"
                 f"{' (switched)' if deployment.get('changed') else ' (unchanged)'}.")
        if deployment.get("note"):
            text += f" {deployment['note']}"
    elif promotion and state == "failed":
        text += " Serving did not change (the deploy task says why)."
    return text[:MAX_NOTE]


def _result(session: Any, dag_run: Any, task_id: str) -> Any:
    from airflow.models.xcom import XComModel

    row = session.execute(XComModel.get_many(key="return_value", run_id=dag_run.run_id, dag_ids=dag_run.dag_id,
                                             task_ids=task_id, map_indexes=-1)
                          .with_only_columns(XComModel.value)).first()
    return XComModel.deserialize_value(row) if row else None


def _annotate(dag_run: Any, state: str) -> None:
    if dag_run.dag_id != DAG_ID or dag_run.note:
        return
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)  # the scheduler's session: it commits the note with the run's state
    if session is None:
        return
    try:
        note = note_for(_result(session, dag_run, "check_drift"), _result(session, dag_run, "promote"), state,
                        _result(session, dag_run, "deploy"))
    except Exception:  # a note is a courtesy: it must never disturb the scheduler
        log.exception("could not build the note of run %s", dag_run.run_id)
        return
    if note:
        dag_run.note = note


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _annotate(dag_run, "success")


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _annotate(dag_run, "failed")
