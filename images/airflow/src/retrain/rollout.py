"""Roll serving forward to the champion version, wait until it serves, roll back when it does not.

Local mode's serving "Deployment" is a desired-state record (JSON) that the serving process
follows. Like a pod template, the record pins a model **version** (never an alias); each change
is a new revision with a change-cause, and a bounded history is kept so a rollback restores the
previous revision. Waiting is done the way ``kubectl rollout status`` does it: the rollout is
complete only when the server reports the desired version loaded and ready.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from mlflow import MlflowClient

from retrain.alerts import Alert, send_alert
from retrain.registry import CHAMPION, HEADLINE_METRIC
from retrain.settings import Settings

log = logging.getLogger(__name__)
REVISION_HISTORY_LIMIT = 10
HISTORY_FIELDS = ("revision", "model_name", "model_version", "change_cause", "updated_at", "applied_by_run")


class RolloutFailed(RuntimeError):
    """The new version did not serve in time; ``alerted`` is set once the rollback alert went out."""

    alerted = False


@dataclass(frozen=True)
class ServingStatus:
    reachable: bool
    version: str | None = None
    ready: bool = False
    error: str | None = None


def _path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"local serving state must be a file:// URI, got {uri!r}")
    return Path(parsed.path if parsed.scheme else uri)


class LocalDeployment:
    """The desired-state record of the local serving process."""

    name = "embedder-serving"

    def __init__(self, state_uri: str, serving_url: str):
        self.path = _path(state_uri)
        self.serving_url = serving_url

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.path)

    def apply(self, model_name: str, version: str, change_cause: str, run_id: str = "") -> tuple[dict[str, Any], bool]:
        """Pin ``version``; returns (record, changed). Re-applying the pinned version changes nothing."""
        current = self.read()
        if current and current["model_name"] == model_name and current["model_version"] == str(version):
            return current, False
        history = (current or {}).get("history", [])
        if current:
            history = [*history, {k: current.get(k) for k in HISTORY_FIELDS}]
        record = {
            "model_name": model_name,
            "model_version": str(version),
            "revision": (current or {}).get("revision", 0) + 1,
            "change_cause": change_cause,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "applied_by_run": run_id,
            "history": history[-REVISION_HISTORY_LIMIT:],
        }
        self._write(record)
        return record, True

    def rollback_target(self, run_id: str) -> dict[str, Any] | None:
        """The revision before the current one, if Airflow run ``run_id`` made the current one."""
        current = self.read()
        if not current or not run_id or current.get("applied_by_run") != run_id or not current.get("history"):
            return None
        return current["history"][-1]

    def status(self) -> ServingStatus:
        try:
            meta = requests.get(f"{self.serving_url}/metadata", timeout=5).json()
        except (requests.RequestException, ValueError):
            return ServingStatus(False)
        return ServingStatus(True, meta.get("model_version"), bool(meta.get("ready")), meta.get("last_error"))

    def wait(self, version: str, timeout_s: float, poll_s: float) -> ServingStatus:
        """Block until the server serves ``version`` and is ready, or raise RolloutFailed after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            st = self.status()
            if st.reachable and st.version == str(version) and st.ready:
                log.info('deployment "%s" successfully rolled out (serving model version %s)', self.name, version)
                return st
            message = self._progress(st, version)
            if message != last:
                log.info(message)
                last = message
            if time.monotonic() >= deadline:
                raise RolloutFailed(f'deployment "{self.name}" did not serve model version {version} within '
                                    f"{timeout_s:.0f}s: {message}")
            time.sleep(poll_s)

    def _progress(self, st: ServingStatus, version: str) -> str:
        if not st.reachable:
            return (f"Waiting for deployment \"{self.name}\" rollout to finish: serving process not reachable at "
                    f"{self.serving_url} (start it with `make serve`)")
        detail = f"; last error: {st.error}" if st.error else ""
        return (f"Waiting for deployment \"{self.name}\" rollout to finish: serving version {st.version or 'none'}, "
                f"want {version}{detail}")


class KubernetesDeployment:
    """The serving Deployment: its pod template pins ``MODEL_NAME``/``MODEL_VERSION`` (never an alias).

    Roll forward is a strategic merge patch of the container's env, a model-version label on the pod
    template, and ``kubernetes.io/change-cause`` (what ``kubectl rollout history`` shows). Waiting
    follows ``kubectl rollout status``: done only when the controller has observed the new generation,
    every replica is updated, no old replica remains and every updated replica is available; a
    ``ProgressDeadlineExceeded`` condition fails at once.
    """

    CHANGE_CAUSE = "kubernetes.io/change-cause"
    REVISION = "deployment.kubernetes.io/revision"
    APPLIED_BY = "retrain.embedder/applied-by-run"  # the Airflow run that made the current revision
    ROLLBACK_TO = "retrain.embedder/rollback-to"  # the revision before it, as JSON: what a rollback restores

    def __init__(self, name: str, namespace: str, container: str, conn_id: str, api: Any = None):
        self.name, self.namespace, self.container, self.conn_id = name, namespace, container, conn_id
        self._api = api

    @property
    def api(self) -> Any:
        if self._api is None:
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
            from kubernetes.client import AppsV1Api

            self._api = AppsV1Api(KubernetesHook(conn_id=self.conn_id).api_client)
        return self._api

    def _get(self) -> Any:
        return self.api.read_namespaced_deployment(self.name, self.namespace)

    def read(self) -> dict[str, Any] | None:
        d = self._get()
        container = next(c for c in d.spec.template.spec.containers if c.name == self.container)
        env = {e.name: e.value for e in container.env or []}
        annotations = d.metadata.annotations or {}
        return {"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                "revision": int(annotations.get(self.REVISION, 0)), "change_cause": annotations.get(self.CHANGE_CAUSE, ""),
                "applied_by_run": annotations.get(self.APPLIED_BY, ""),
                "rollback_to": json.loads(annotations[self.ROLLBACK_TO]) if annotations.get(self.ROLLBACK_TO) else None}

    def apply(self, model_name: str, version: str, change_cause: str, run_id: str = "") -> tuple[dict[str, Any], bool]:
        """Patch the pod template to ``version``; the same patch records what a rollback would restore."""
        current = self.read()
        if current and (current["model_name"], current["model_version"]) == (model_name, str(version)):
            return current, False
        previous = {k: current[k] for k in ("model_name", "model_version", "revision", "change_cause")}
        body = {
            "metadata": {"annotations": {self.CHANGE_CAUSE: change_cause, self.APPLIED_BY: run_id,
                                         self.ROLLBACK_TO: json.dumps(previous, sort_keys=True)}},
            "spec": {"template": {
                "metadata": {"labels": {"retrain/model-version": str(version)}},
                "spec": {"containers": [{"name": self.container, "env": [
                    {"name": "MODEL_NAME", "value": model_name}, {"name": "MODEL_VERSION", "value": str(version)}]}]},
            }},
        }
        self.api.patch_namespaced_deployment(self.name, self.namespace, body,
                                             _content_type="application/strategic-merge-patch+json")
        return self.read(), True

    def rollback_target(self, run_id: str) -> dict[str, Any] | None:
        """The revision before the current one, if Airflow run ``run_id`` made the current one."""
        current = self.read()
        if not current or not run_id or current["applied_by_run"] != run_id:
            return None
        return current["rollback_to"]

    def rollout_status(self) -> tuple[bool, str]:
        """(done, message) in kubectl's words; raises RolloutFailed past the progress deadline."""
        d = self._get()
        st = d.status
        if (d.metadata.generation or 0) > (st.observed_generation or 0):
            return False, "Waiting for deployment spec update to be observed..."
        for cond in st.conditions or []:
            if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                raise RolloutFailed(f'deployment "{self.name}" exceeded its progress deadline')
        want, updated = d.spec.replicas or 0, st.updated_replicas or 0
        if updated < want:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{updated} out of {want} new replicas have been updated...")
        if (st.replicas or 0) > updated:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{st.replicas - updated} old replicas are pending termination...")
        if (st.available_replicas or 0) < updated:
            return False, (f'Waiting for deployment "{self.name}" rollout to finish: '
                           f"{st.available_replicas or 0} of {updated} updated replicas are available...")
        return True, f'deployment "{self.name}" successfully rolled out'

    def wait(self, version: str, timeout_s: float, poll_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            done, message = self.rollout_status()
            if message != last:
                log.info(message)
                last = message
            if done:
                return
            if time.monotonic() >= deadline:
                raise RolloutFailed(f'deployment "{self.name}" did not roll out model version {version} '
                                    f"within {timeout_s:.0f}s: {message}")
            time.sleep(poll_s)


def deployment_for(settings: Settings) -> LocalDeployment | KubernetesDeployment:
    if settings.runner == "kubernetes":
        return KubernetesDeployment(settings.serving_deployment, settings.pods.namespace, "server",
                                    settings.pods.conn_id)
    return LocalDeployment(settings.serving_state_uri, settings.serving_url)


def change_cause(model_name: str, version: str, run_id: str, metric: str, value: float | None) -> str:
    score = f"{metric}={value:.4f}" if value is not None else f"{metric}=n/a"
    return f"model {model_name} version {version} from Airflow run {run_id}: {score}"


def tiny_png(side: int = 32) -> bytes:
    """A valid grayscale PNG (a diagonal gradient) built with the standard library: the smoke test's image."""
    raw = b"".join(b"\x00" + bytes((x + y) * 255 // (2 * side) for x in range(side)) for y in range(side))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def smoke_test(url: str, model_name: str, version: str, expected_dim: int | None, max_latency_s: float) -> dict[str, Any]:
    """Check the serving API the way a client sees it (through the Service); raise RolloutFailed naming what failed.

    ``/readyz`` answers 200; ``/metadata`` reports ``model_name`` and ``version``; ``/embed`` of a small
    image returns an L2-normalised embedding of ``expected_dim`` floats within ``max_latency_s``.
    """
    def fail(what: str) -> RolloutFailed:
        return RolloutFailed(f"smoke test against {url} failed: {what}")

    try:
        ready = requests.get(f"{url}/readyz", timeout=10)
        if ready.status_code != 200:
            raise fail(f"/readyz answered {ready.status_code}: {ready.text[:200]}")
        meta = requests.get(f"{url}/metadata", timeout=10).json()
        if (meta.get("model_name"), str(meta.get("model_version"))) != (model_name, str(version)):
            raise fail(f"/metadata reports {meta.get('model_name')} version {meta.get('model_version')}, "
                       f"expected {model_name} version {version}")
        started = time.perf_counter()
        resp = requests.post(f"{url}/embed", files={"file": ("smoke.png", tiny_png(), "image/png")},
                             timeout=max(10.0, 3 * max_latency_s))
        latency = time.perf_counter() - started
    except requests.RequestException as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise fail(f"/metadata is not JSON ({exc})") from None
    if resp.status_code != 200:
        raise fail(f"/embed answered {resp.status_code}: {resp.text[:200]}")
    vector = resp.json().get("embedding") or []
    if expected_dim is not None and len(vector) != expected_dim:
        raise fail(f"/embed returned {len(vector)} values, model version {version} has {expected_dim}")
    norm = math.sqrt(sum(v * v for v in vector))
    if not vector or abs(norm - 1.0) > 1e-3:
        raise fail(f"/embed returned an embedding of norm {norm:.4f}, expected 1 (L2-normalised)")
    if latency > max_latency_s:
        raise fail(f"/embed took {latency * 1000:.0f} ms, the bound is {max_latency_s * 1000:.0f} ms")
    log.info("smoke test passed: %s version %s ready, /embed %d-d in %.0f ms", model_name, version, len(vector),
             latency * 1000)
    return {"embedding_dim": len(vector), "embed_latency_ms": round(latency * 1000, 1)}


def deploy(settings: Settings, model_name: str, version: str, cause: str,
           deployment: LocalDeployment | KubernetesDeployment | None = None, run_id: str = "",
           expected_dim: int | None = None) -> dict[str, Any]:
    """Roll serving forward to ``version``, wait, smoke-test; on failure restore the previous revision and raise.

    Idempotent per Airflow run: a retry of a run whose earlier attempt already patched the Deployment
    (and was killed while waiting) makes no new revision; it waits for that one and still knows,
    from what the patch recorded, which revision to restore if it fails.
    """
    deployment = deployment or deployment_for(settings)
    current = deployment.read()
    record, changed = deployment.apply(model_name, version, cause, run_id)
    if changed:
        previous = current
        log.info('deployment "%s" revision %d: %s', deployment.name, record["revision"], cause)
    else:
        previous = deployment.rollback_target(run_id)
        if previous:
            log.info('deployment "%s" revision %d was made by this run (%s) in an earlier attempt; waiting for it '
                     "(a rollback would restore model version %s)", deployment.name, record["revision"], run_id,
                     previous["model_version"])
        else:
            log.info('deployment "%s" already pins model version %s (revision %d); nothing to change',
                     deployment.name, version, record["revision"])
    try:
        deployment.wait(version, settings.deploy_timeout_s, settings.deploy_poll_s)
        smoke = smoke_test(settings.serving_url, model_name, version, expected_dim, settings.smoke_max_latency_s)
    except RolloutFailed as exc:
        if previous is None:
            raise RolloutFailed(f"{exc}. Nothing to roll back to: this run did not change the Deployment.") from None
        _restore(deployment, previous, run_id)
        try:
            deployment.wait(previous["model_version"], settings.deploy_timeout_s, settings.deploy_poll_s)
        except RolloutFailed as again:
            raise RolloutFailed(f"{exc}. The rollback did not complete either: {again}") from None
        failed = RolloutFailed(f"{exc}. Rolled back to model version {previous['model_version']}.")
        failed.rolled_back_to = previous
        failed.failed_revision = record["revision"]
        raise failed from None
    return {"deployment": deployment.name, "model_version": str(version), "revision": record["revision"],
            "changed": changed, "change_cause": record["change_cause"], **smoke}


def _restore(deployment: LocalDeployment | KubernetesDeployment, previous: dict[str, Any], run_id: str) -> None:
    record, _ = deployment.apply(previous["model_name"], previous["model_version"],
                                 f"rollback to revision {previous['revision']}: {previous['change_cause']}", run_id)
    log.warning('deployment "%s": rolled back to model version %s (revision %d)',
                deployment.name, previous["model_version"], record["revision"])


# -- serving history in MLflow -----------------------------------------------------------------

def serving_experiment(settings: Settings) -> str:
    return f"{settings.experiment}-serving"


def record_serving(client: MlflowClient, settings: Settings, *, model_name: str, version: str, outcome: str,
                   revision: int, airflow_run_id: str, reason: str = "",
                   details: dict[str, Any] | None = None) -> tuple[str, str]:
    """One MLflow run per rollout in the ``<experiment>-serving`` experiment; returns (experiment id, run id).

    ``outcome`` is ``rolled_out`` (``version`` serves from now on; the run it replaces gets
    ``serving.until``) or ``rolled_back`` (``version`` failed and the previous one serves on). With
    these runs, :func:`serving_at` answers "what was in production at time X".
    """
    name = serving_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    now_ms = int(time.time() * 1000)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000))
    if outcome == "rolled_out":
        for live in client.search_runs([experiment_id], "tags.`serving.live` = 'true'"):
            client.set_tag(live.info.run_id, "serving.until", iso)
            client.set_tag(live.info.run_id, "serving.live", "false")
    tags = {"serving.model_name": model_name, "serving.model_version": str(version), "serving.outcome": outcome,
            "serving.revision": str(revision), "airflow.run_id": airflow_run_id, "serving.deployment":
            settings.serving_deployment, "serving.live": str(outcome == "rolled_out").lower(), "serving.from": iso}
    if reason:
        tags["serving.reason"] = reason[:5000]
    run = client.create_run(experiment_id, start_time=now_ms, tags=tags,
                            run_name=f"{outcome} {model_name} v{version} (revision {revision})")
    for key, value in (details or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, key, float(value), timestamp=now_ms)
    client.set_terminated(run.info.run_id, "FINISHED" if outcome == "rolled_out" else "FAILED", end_time=now_ms)
    return experiment_id, run.info.run_id


def serving_at(client: MlflowClient, settings: Settings, when_ms: int) -> dict[str, str] | None:
    """The rollout that was serving at ``when_ms`` (epoch milliseconds): its ``serving.*`` tags, or None."""
    experiment = client.get_experiment_by_name(serving_experiment(settings))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`serving.outcome` = 'rolled_out' and attributes.start_time <= {int(when_ms)}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return {k: v for k, v in runs[0].data.tags.items() if k.startswith(("serving.", "airflow."))} if runs else None


def _embedding_dim(client: MlflowClient, name: str, version: str) -> int | None:
    """The embedding width recorded in the model version's MLmodel metadata, read through ``client``'s server."""
    import tempfile

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


def roll_out_champion(settings: Settings, promotion: dict[str, Any], airflow_run_id: str | None,
                      client: MlflowClient | None = None,
                      deployment: LocalDeployment | KubernetesDeployment | None = None) -> dict[str, Any]:
    """Serve the champion chosen by ``promote``. On failure: serving and ``@champion`` go back, one alert, raise.

    Every rollout that changes what serves, and every rollback, is recorded in MLflow (see
    :func:`record_serving`).
    """
    name, version = promotion["model_name"], promotion["champion"]
    if version is None:
        raise RolloutFailed(f"{name} has no @{CHAMPION}: nothing to deploy")
    client = client or MlflowClient()
    run_id = airflow_run_id or "manual"
    score = promotion["recall_at_1"] if promotion["promoted"] else promotion.get("champion_recall_at_1")
    cause = change_cause(name, version, run_id, HEADLINE_METRIC, score)
    try:
        result = deploy(settings, name, version, cause, deployment, run_id, _embedding_dim(client, name, version))
    except RolloutFailed as exc:
        restored = None
        if promotion["promoted"]:
            restored = promotion["previous_champion"]
            if restored:
                client.set_registered_model_alias(name, CHAMPION, restored)
            else:
                client.delete_registered_model_alias(name, CHAMPION)
            log.warning("@%s of %s moved back to %s", CHAMPION, name, restored or "nothing")
        if getattr(exc, "rolled_back_to", None):
            record_serving(client, settings, model_name=name, version=version, outcome="rolled_back",
                           revision=exc.failed_revision, airflow_run_id=run_id, reason=str(exc))
        send_alert(Alert(kind="rollback", title=f"rollout of {name} version {version} failed", text=str(exc),
                         fields={"model_name": name, "version": version, "restored_champion": restored,
                                 "airflow_run_id": airflow_run_id}), settings)
        exc.alerted = True
        raise
    if result["changed"] or deployment_live_unrecorded(client, settings, name, version):
        result["serving_experiment_id"], result["serving_run_id"] = record_serving(
            client, settings, model_name=name, version=version, outcome="rolled_out", revision=result["revision"],
            airflow_run_id=run_id, details={"embed_latency_ms": result["embed_latency_ms"]})
    return result


def deployment_live_unrecorded(client: MlflowClient, settings: Settings, name: str, version: str) -> bool:
    """True when ``version`` serves but no live serving record says so (a retry after a kill mid-wait)."""
    live = serving_at(client, settings, int(time.time() * 1000) + 1)
    return not live or (live.get("serving.model_name"), live.get("serving.model_version")) != (name, str(version))
