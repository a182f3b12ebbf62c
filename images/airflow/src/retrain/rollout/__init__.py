"""Put the champion into service, one embedding space at a time, proven on live traffic; or leave serving as it is.

:func:`roll_out_champion` is the deploy task. It follows Argo Rollouts' blue-green strategy:

1. **reconcile** (:mod:`.ownership`): notice an operator's veto, finish the system's unfinished bookkeeping;
2. the champion already serves: nothing changes (a leftover warm version is settled);
3. **preview**: the champion starts beside the active version and takes no client request; once ready it
   is smoke-tested at the preview's own address;
4. **analysis** (:mod:`.analysis`) on the active's mirrored live traffic, recorded in MLflow; a failed gate
   rejects the champion: no client ever saw it, ``@champion`` goes back, one alert names the gate;
5. **switch**: the preview gets the active's replica count, then every client request goes to it at once;
   the old version stays warm (``RETRAIN_SCALE_DOWN_DELAY_S``);
6. **verify** as a client does, through the serving address; a failure switches back at once (the old
   version is warm), ``@champion`` goes back, one alert;
7. **record** the serving period; after the warm window, **settle**: the old version goes.

A verdict (3, 4, 6) fails the task without retries. Anything else (a worker lost, MLflow or the API server
down) is retried, and the retry goes on from the state it finds: nothing is rolled out twice, and the
version a run rejected is never put into service by it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow import MlflowClient

from retrain.registry import embedding_dim
from retrain.rollout import analysis, ownership
from retrain.rollout.history import passed_analysis, record_analysis, serving_at, serving_experiment, serving_periods
from retrain.rollout.smoke import smoke_test
from retrain.rollout.targets import (
    REJECTED,
    SWITCHED,
    SWITCHED_BACK,
    LocalServing,
    Mark,
    RolloutFailed,
    ServingState,
    ServingTarget,
)
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract import manifests, storage
from retrain_contract.registry import CHAMPION, HEADLINE_METRIC
from retrain_contract.results import DeployResult, PromoteResult
from retrain_contract.serving import Pin

__all__ = ["LocalServing", "RolloutFailed", "roll_out_champion", "serving_at", "serving_experiment",
           "serving_periods", "smoke_test", "target_for"]
log = logging.getLogger(__name__)


def target_for(settings: Settings) -> ServingTarget:
    if settings.runner == "kubernetes" and settings.rollout.kind == "argo":
        from retrain.rollout.argo import ArgoServing

        return ArgoServing.from_settings(settings)
    if settings.runner == "kubernetes":
        from retrain.rollout.kubernetes import KubernetesServing

        return KubernetesServing.from_settings(settings)
    return LocalServing(settings.serving_state_uri, settings.serving_url, settings.rollout.preview_url)


def change_cause(model_name: str, version: str, run_id: str, metric: str, value: float | None) -> str:
    score = f"{metric}={value:.4f}" if value is not None else f"{metric}=n/a"
    return f"model {model_name} version {version} from Airflow run {run_id}: {score}"


def held_out_images(manifest_uri: str, count: int) -> list[tuple[str, bytes]]:
    """Up to ``count`` images of the snapshot's test split, spread over it (the analysis's replay traffic)."""
    try:
        data_uri, files = manifests.split_files(storage.read_bytes(manifest_uri).decode(), "test")
    except (storage.StorageError, ValueError, KeyError) as exc:
        log.warning("no held-out images to replay (%s)", exc)
        return []
    step = max(1, len(files) // max(count, 1))
    picked = files[::step][:count]
    return [(path.rsplit("/", 1)[-1], storage.read_bytes(storage.join(data_uri, path))) for path, _ in picked]


def wait_for(status: Callable[[Pin], tuple[bool, str]], pin: Pin, timeout_s: float, poll_s: float, what: str) -> str:
    """Block until ``status(pin)`` is done, logging each new progress message; RolloutFailed after ``timeout_s``."""
    last = [""]

    def done() -> bool:
        finished, message = status(pin)
        if message != last[0]:
            log.info("%s", message)
            last[0] = message
        return finished

    poll(done, timeout_s=timeout_s, interval_s=poll_s, on_timeout=lambda: RolloutFailed(
        f"{what} did not serve {pin} within {timeout_s:.0f}s: {last[0]}"))
    return last[0]


class Rollout:
    """One deploy attempt of one Airflow run: the champion into service, or a verdict."""

    def __init__(self, settings: Settings, client: MlflowClient, target: ServingTarget, promoted: PromoteResult,
                 run_id: str, replay_images: Callable[[int], list[tuple[str, bytes]]] | None, lift_veto: bool):
        self.settings, self.client, self.target, self.run_id = settings, client, target, run_id
        self.replay_images, self.lift_veto = replay_images, lift_veto
        assert promoted.champion is not None
        self.pin = Pin(promoted.model_name, promoted.champion)
        score = promoted.recall_at_1 if promoted.promoted else promoted.champion_recall_at_1
        self.cause = change_cause(self.pin.model_name, self.pin.model_version, run_id, HEADLINE_METRIC, score)
        self.result: dict[str, Any] = {"deployment": target.name, "change_cause": self.cause, "analysis": None,
                                       "analysis_run_id": None, "note": ""}

    # -- the steps ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        own = ownership.reconcile(self.settings, self.client, self.target, self.run_id, deploying=True)
        state, mark = own.state, own.state.mark
        if mark and mark.run_id == self.run_id and mark.rejected == self.pin.model_version:
            # A retry after this run's verdict (its bookkeeping was just finished): never roll it out again.
            raise self._alerted(RolloutFailed(mark.reason, gate=mark.gate))
        if state.active != self.pin:
            veto = ownership.vetoed(self.client, self.pin.model_name, self.pin.model_version)
            if veto and not self.lift_veto:
                return self._vetoed(state, veto)
        expected_dim = embedding_dim(self.client, self.pin.model_name, self.pin.model_version)
        if state.active == self.pin:
            return self._serving(state, expected_dim)
        self.target.start_preview(self.pin, self.cause, self.run_id)
        try:
            wait_for(self.target.preview_status, self.pin, self.settings.deploy_timeout_s, self.settings.deploy_poll_s,
                     "the preview")
            smoke_test(self.target.preview_url, self.pin.model_name, self.pin.model_version, expected_dim,
                       self.settings.smoke_max_latency_s)
        except RolloutFailed as exc:
            self._reject(state, "preview", f"the preview of {self.pin} failed: {exc}")
        if state.active is not None:
            self._analyse(state.active)
        self.target.scale_preview()
        wait_for(self.target.preview_status, self.pin, self.settings.deploy_timeout_s, self.settings.deploy_poll_s,
                 "the preview, at full size")
        mark = Mark(self.pin.model_name, self.pin.model_version, self.run_id, SWITCHED, time.time(), reason=self.cause)
        self.target.switch(self.pin, self.cause, mark, self.settings.rollout.warm_s)
        log.info("SWITCHED: every client request now goes to %s (%s kept warm for %.0f s)", self.pin,
                 state.active or "nothing", self.settings.rollout.warm_s)
        return self._serving(self.target.read(), expected_dim, switched_from=state.active)

    def _analyse(self, active: Pin) -> None:
        done = passed_analysis(self.client, self.settings, model_name=self.pin.model_name,
                               preview=self.pin.model_version, active=active.model_version, airflow_run_id=self.run_id)
        if done is not None:  # a retry after the analysis passed (and the preview may be at full size now)
            self.result["analysis_run_id"], self.result["analysis"] = done
            log.info("analysis already passed in this run (MLflow run %s): %s", done[0], done[1]["reason"])
            return
        cfg = self.settings.rollout.analysis
        verdict = analysis.analyse(cfg, self.target.preview_url, self.target.serving_url, self.pin, active,
                                   self.replay_images)
        self.result["analysis"] = verdict.to_json()
        for gate in verdict.gates:
            log.info("analysis gate %-10s %s: %s", gate.name, "pass" if gate.passed else "FAIL", gate.detail)
        _, self.result["analysis_run_id"] = record_analysis(
            self.client, self.settings, model_name=self.pin.model_name, preview=self.pin.model_version,
            active=active.model_version, verdict=verdict.to_json(), airflow_run_id=self.run_id)
        if not verdict.passed:
            failed = verdict.failed
            assert failed is not None
            self._reject(self.target.read(), failed.name,
                         f"{self.pin} did not pass the analysis against version {active.model_version} on mirrored "
                         f"traffic: {verdict.reason}; it never answered a client")
        log.info("analysis passed: %s", verdict.reason)

    def _serving(self, state: ServingState, expected_dim: int | None, switched_from: Pin | None = None) -> dict[str, Any]:
        """The champion is active: verify it as a client sees it, record it, keep the old one warm, settle."""
        try:
            wait_for(self.target.active_status, self.pin, self.settings.deploy_timeout_s, self.settings.deploy_poll_s,
                     f'deployment "{self.target.name}"')
            smoke = smoke_test(self.settings.serving_url, self.pin.model_name, self.pin.model_version, expected_dim,
                               self.settings.smoke_max_latency_s)
        except RolloutFailed as exc:
            ours = state.mark is not None and state.mark.run_id == self.run_id and state.mark.action == SWITCHED
            back = switched_from or (state.warm if ours and state.warm != self.pin else None)
            if back is None:
                raise RolloutFailed(f"{exc}. Nothing to switch back to: nothing served before {self.pin}.") from None
            self._switch_back(back, str(exc))
        mark = state.mark
        if mark is None or mark.version != self.pin.model_version:
            mark = Mark(self.pin.model_name, self.pin.model_version, self.run_id, SWITCHED, time.time(),
                        reason=self.cause)
            self.target.set_mark(mark)
        if not mark.recorded:
            ownership.finish(self.client, self.settings, self.target, mark, self.target.read())
        live = serving_at(self.client, self.settings, int(time.time() * 1000) + 1) or {}
        self._watch_warm(state, mark, switched_from, expected_dim)
        self.target.settle(self.pin, self.cause)
        state = self.target.read()
        self.result.update(model_version=self.pin.model_version, revision=state.revision,
                           changed=switched_from is not None or (mark.run_id == self.run_id and mark.action == SWITCHED),
                           **smoke)
        exp = self.client.get_experiment_by_name(serving_experiment(self.settings))
        if exp is not None and live.get("serving.model_version") == self.pin.model_version:
            runs = self.client.search_runs([exp.experiment_id], "tags.`serving.live` = 'true'", max_results=1)
            if runs:
                self.result.update(serving_experiment_id=exp.experiment_id, serving_run_id=runs[0].info.run_id)
        return DeployResult.from_json(self.result).to_json()

    def _watch_warm(self, state: ServingState, mark: Mark, switched_from: Pin | None, expected_dim: int | None) -> None:
        """Until the warm window closes, the new version must keep answering; else switch back while it is instant."""
        warm = switched_from or state.warm
        until = mark.at + self.settings.rollout.warm_s
        if warm is None or time.time() >= until:
            return
        log.info("%s stays warm until %s: a switch back is instant until then", warm,
                 time.strftime("%H:%M:%S", time.localtime(until)))
        while time.time() < until:
            done, message = self.target.active_status(self.pin)
            if not done:
                self._switch_back(warm, f"{self.pin} stopped serving during the warm window: {message}")
            time.sleep(min(self.settings.deploy_poll_s, max(0.0, until - time.time())))

    # -- verdicts ----------------------------------------------------------------------------------

    def _reject(self, state: ServingState, gate: str, reason: str) -> None:
        """The champion never answered a client: drop the preview, @champion back, one alert, fail without retries."""
        serving = state.active.model_version if state.active else ""
        mark = Mark(self.pin.model_name, serving, self.run_id, REJECTED, time.time(), rejected=self.pin.model_version,
                    gate=gate, reason=f"{reason}. {'Version ' + serving if serving else 'Nothing'} serves on.")
        self.target.set_mark(mark)  # first: no retry of this run puts the version into service again
        self.target.drop_preview()
        ownership.finish(self.client, self.settings, self.target, mark, self.target.read())
        raise self._alerted(RolloutFailed(mark.reason, gate=gate))

    def _switch_back(self, back: Pin, reason: str) -> None:
        mark = Mark(back.model_name, back.model_version, self.run_id, SWITCHED_BACK, time.time(),
                    rejected=self.pin.model_version, gate="serving",
                    reason=f"{self.pin} failed once it served clients: {reason}. Switched back to {back}.")
        self.target.switch_back(back, f"switch back to {back}: {reason}", mark)
        log.warning("SWITCHED BACK to %s: %s", back, reason)
        try:
            wait_for(self.target.active_status, back, self.settings.deploy_timeout_s, self.settings.deploy_poll_s,
                     f'deployment "{self.target.name}"')
        except RolloutFailed as again:
            raise RolloutFailed(f"{mark.reason} The switch back did not complete either: {again}") from None
        ownership.finish(self.client, self.settings, self.target, mark, self.target.read())
        raise self._alerted(RolloutFailed(mark.reason, rolled_back_to=back, gate="serving"))

    def _vetoed(self, state: ServingState, veto: str) -> dict[str, Any]:
        serving = state.active
        note = f"{self.pin} is not put into service: {veto}"
        if serving is not None:
            self.client.set_registered_model_alias(self.pin.model_name, CHAMPION, serving.model_version)
            note += f" @{CHAMPION} is version {serving.model_version}, which serves."
        log.warning("%s", note)
        self.result["note"] = note
        self.pin = serving or self.pin
        if serving is None:
            raise RolloutFailed(note)
        return self._serving(state, embedding_dim(self.client, serving.model_name, serving.model_version))

    @staticmethod
    def _alerted(exc: RolloutFailed) -> RolloutFailed:
        exc.alerted = True
        return exc


def roll_out_champion(settings: Settings, promotion: dict[str, Any], airflow_run_id: str | None,
                      client: MlflowClient | None = None, target: ServingTarget | None = None,
                      replay_images: Callable[[int], list[tuple[str, bytes]]] | None = None,
                      lift_veto: bool = False) -> dict[str, Any]:
    """Serve the champion ``promote`` chose, proven on live traffic; on any verdict, serving and ``@champion`` stay
    (or go back to) what served, with one alert. ``replay_images(n)``: held-out images for a quiet analysis."""
    promoted = PromoteResult.from_json(promotion)
    if promoted.champion is None:
        raise RolloutFailed(f"{promoted.model_name} has no @{CHAMPION}: nothing to deploy")
    return Rollout(settings, client or MlflowClient(), target or target_for(settings), promoted,
                   airflow_run_id or "manual", replay_images, lift_veto).run()
