"""Who owns what serves: the deploy step, until an operator's hand says otherwise; and ``@champion`` = what serves.

The deploy step leaves a :class:`~retrain.rollout.targets.Mark` beside what serves each time it changes it.
:func:`reconcile` compares the two at the start of every run (``check_drift``) and of every deploy attempt:

- **what serves is not what the system last made serve**: an operator changed it (``kubectl rollout undo``,
  a switch back, an edit). That is a **veto** on the version the system had put in: one alert, the version
  tagged ``serving.vetoed`` with the reason, a serving period of the operator's version in the history, and
  the mark now says the operator's version is what the system found serving (``adopted``). The system puts
  the vetoed version back only when a run sets the ``lift_veto`` Param; a new champion is deployed as usual;
- **the system's own act is not fully written down** (the worker was killed, or MLflow was down, between the
  change and its record): its alert, the ``@champion`` it restores and its serving history are finished now,
  in that order, each once;
- **``@champion`` is not what serves** once nothing is deploying (a run that promoted and then failed before
  its version served, or a veto): ``@champion`` moves to the version that serves, and the run says why.

Each step is recorded in the mark before or as it is done, so a retry after any failure does only what is left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mlflow import MlflowClient

from retrain.alerts import Alert, send_alert
from retrain.rollout.history import record_serving, unrecorded
from retrain.rollout.targets import ADOPTED, REJECTED, SWITCHED, SWITCHED_BACK, Mark, ServingState, ServingTarget
from retrain.settings import Settings
from retrain_contract.registry import CHAMPION, alias_version

log = logging.getLogger(__name__)
VETO_TAG = "serving.vetoed"  # on a version an operator took out of service: why, and who found it
VETO_AT_TAG = "serving.vetoed_at"


@dataclass(frozen=True)
class Ownership:
    state: ServingState
    serving: str | None  # the version that answers clients
    champion: str | None  # @champion after reconciliation
    notes: tuple[str, ...] = ()  # what was noticed and done, for the run's reason and note
    vetoed: str | None = None  # a version an operator took out of service, noticed now


def vetoed(client: MlflowClient, name: str, version: str) -> str | None:
    """Why an operator took ``version`` out of service, or None."""
    return client.get_model_version(name, version).tags.get(VETO_TAG)


def latest_veto(client: MlflowClient, name: str) -> str | None:
    """The newest version carrying a veto (what ``lift_veto`` puts back)."""
    found = [mv for mv in client.search_model_versions(f"name = '{name}'") if VETO_TAG in (mv.tags or {})]
    return str(max(found, key=lambda mv: float(mv.tags.get(VETO_AT_TAG, "0"))).version) if found else None


def lift_veto(client: MlflowClient, name: str, version: str, run_id: str) -> str:
    client.delete_model_version_tag(name, version, VETO_TAG)
    client.delete_model_version_tag(name, version, VETO_AT_TAG)
    client.set_registered_model_alias(name, CHAMPION, version)
    return (f"lift_veto: version {version}, which an operator had taken out of service, is @{CHAMPION} again "
            f"(run {run_id}); it serves once this run deploys it")


def _alert_for(mark: Mark) -> Alert:
    if mark.action == ADOPTED:
        return Alert(kind="veto", severity="warning", title=f"{mark.model_name} version {mark.vetoed} was taken out of "
                     f"service by hand", text=mark.reason, fields={"model_name": mark.model_name, "serving_version":
                     mark.version, "vetoed_version": mark.vetoed, "noticed_by_run": mark.run_id})
    kind = "rollback" if mark.action == SWITCHED_BACK else "analysis"
    verb = "was switched back from" if mark.action == SWITCHED_BACK else "did not go into service"
    return Alert(kind=kind, title=f"{mark.model_name} version {mark.rejected} {verb}", text=mark.reason,
                 fields={"model_name": mark.model_name, "rejected_version": mark.rejected, "serving_version":
                         mark.version, "airflow_run_id": mark.run_id, "gate": mark.gate})


def finish(client: MlflowClient, settings: Settings, target: ServingTarget, mark: Mark, state: ServingState) -> Mark:
    """Send the alert of the system's last act, restore ``@champion`` and write its history, each once."""
    if mark.action in (ADOPTED, REJECTED, SWITCHED_BACK) and (mark.vetoed or mark.rejected) and not mark.alerted:
        send_alert(_alert_for(mark), settings)
        mark = mark.done(alerted=True)
        target.set_mark(mark)
    if mark.recorded:
        return mark
    name = mark.model_name
    if mark.action == ADOPTED and mark.vetoed:
        client.set_model_version_tag(name, mark.vetoed, VETO_TAG, mark.reason)
        client.set_model_version_tag(name, mark.vetoed, VETO_AT_TAG, f"{mark.at:.3f}")
        record_serving(client, settings, model_name=name, version=mark.version, outcome="operator",
                       revision=state.revision, airflow_run_id=mark.run_id, reason=mark.reason)
    elif mark.action in (REJECTED, SWITCHED_BACK) and mark.rejected:
        if alias_version(client, name, CHAMPION) == mark.rejected:
            if mark.version:
                client.set_registered_model_alias(name, CHAMPION, mark.version)
            else:  # nothing served before it: no champion
                client.delete_registered_model_alias(name, CHAMPION)
            log.warning("@%s of %s moved back to %s", CHAMPION, name, f"version {mark.version}" if mark.version else "nothing")
        outcome = "rolled_back" if mark.action == SWITCHED_BACK else "rejected"
        record_serving(client, settings, model_name=name, version=mark.rejected, outcome=outcome,
                       revision=state.revision, airflow_run_id=mark.run_id, reason=mark.reason)
    elif mark.action in (SWITCHED, ADOPTED) and unrecorded(client, settings, name, mark.version):
        record_serving(client, settings, model_name=name, version=mark.version,
                       outcome="rolled_out" if mark.action == SWITCHED else "operator", revision=state.revision,
                       airflow_run_id=mark.run_id, reason=mark.reason)
    mark = mark.done(recorded=True)
    target.set_mark(mark)
    return mark


def reconcile(settings: Settings, client: MlflowClient, target: ServingTarget, run_id: str,
              deploying: bool = False) -> Ownership:
    """Notice an operator's hand, finish the system's unfinished bookkeeping, and (unless ``deploying``) make
    ``@champion`` what serves. Raises when MLflow or the cluster cannot be reached: nothing is guessed."""
    state = target.read()
    name = settings.model_name
    notes: list[str] = []
    noticed = None
    mark = state.mark
    if state.active is not None and state.active.model_name != name:
        # Serving runs another registered model (the deployment's model name changed): nothing of this model's
        # registry to reconcile with it; this model's first promotion replaces it.
        note = f"{state.active} serves, not a version of {name}: {name}'s first champion will replace it"
        log.info("%s", note)
        return Ownership(state, None, alias_version(client, name, CHAMPION), (note,), None)
    if mark is not None and not (mark.recorded and mark.alerted) and mark.pin == state.active:
        mark = finish(client, settings, target, mark, state)  # the system's own act, as it left it
    elif mark is not None and not mark.recorded and mark.action == SWITCHED:
        mark = finish(client, settings, target, mark, state)  # it served before the hand that changed it
    if state.active is not None:
        serving = state.active.model_version
        if mark is None or not mark.version:
            mark = Mark(name, serving, run_id, ADOPTED, time.time(), reason=f"version {serving} found serving "
                        f"(revision {state.revision}) with no record of who put it there; taken as it is")
            target.set_mark(mark)
            log.info("%s", mark.reason)
        elif mark.pin != state.active:
            noticed = mark.version
            reason = (f"{name} version {noticed}, which the system put into service (run {mark.run_id}), was taken "
                      f"out of service by hand: version {serving} serves (revision {state.revision}: "
                      f"{state.change_cause or 'no change-cause'}). The system will not put version {noticed} back "
                      f"until a new champion is promoted or a run sets lift_veto.")
            mark = Mark(name, serving, run_id, ADOPTED, time.time(), vetoed=noticed, reason=reason)
            target.set_mark(mark)  # first: from here on, the veto is known, whatever fails next
            log.warning("operator's veto: %s", reason)
            notes.append(reason)
    if mark is not None:
        mark = finish(client, settings, target, mark, state)
    state = target.read()
    champion = alias_version(client, name, CHAMPION)
    serving = state.version
    if not deploying and serving is not None and champion != serving:
        why = (f"@{CHAMPION} was version {champion}, but version {serving} serves"
               + (": an operator's veto" if noticed else ": the run that set it did not finish putting it into service"))
        client.set_registered_model_alias(name, CHAMPION, serving)
        notes.append(f"{why}; @{CHAMPION} is version {serving} again")
        log.warning("%s", notes[-1])
        champion = serving
    return Ownership(state, serving, champion, tuple(notes), noticed)
