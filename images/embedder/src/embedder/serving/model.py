"""The models being served: the active version, a preview beside it and a warm one behind it; readiness.

Local mode: a background thread follows the serving record (``--state-uri``,
:class:`retrain_contract.serving.ServingRecord`) the way a Deployment's pods follow their template. It
loads ``models:/<name>/<version>`` from MLflow with the version's ``/similar`` gallery, warms it up,
and keeps up to three versions in memory:

- :attr:`ModelHolder.current`, the **active** version, which answers every client request;
- :attr:`ModelHolder.preview`, loaded beside it when the record names a preview: it answers no client,
  only the deploy step's checks and the requests the active mirrors to it;
- :attr:`ModelHolder.warm`, the version that answered before the last switch, until the record's
  ``warm_until``.

A switch to the preview (or back to the warm version) is one assignment: each request reads
:attr:`ModelHolder.current` once, when it starts, so every request that starts after the switch is
answered by the new version, and none by the old. A version named by the record that is neither
previewed nor warm is loaded first (a cold start). A version that fails to load leaves everything as it
was and is reported (``last_error``); it is tried again after :data:`RETRY_FAILED_AFTER_S`.

On Kubernetes the record is replaced by a fixed version (the pod template's ``MODEL_NAME``/
``MODEL_VERSION``), loaded once at start; the preview is another Deployment's pods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from embedder import gallery as gallery_mod
from embedder.model import LoadedModel
from embedder.model import load as load_model
from retrain_contract import storage
from retrain_contract.serving import Pin, ServingRecord

log = logging.getLogger(__name__)
RETRY_FAILED_AFTER_S = 30.0


@dataclass(frozen=True)
class Desired:
    model_name: str
    model_version: str
    revision: int = 0

    @property
    def pin(self) -> Pin:
        return Pin(self.model_name, self.model_version)


@dataclass
class Serving:
    desired: Desired
    loaded: LoadedModel
    dataset_version: str
    run_id: str
    gallery: gallery_mod.Gallery | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def pin(self) -> Pin:
        return self.desired.pin


def read_record(state_uri: str) -> ServingRecord | None:
    try:
        return ServingRecord.from_json(json.loads(storage.read_bytes(state_uri)))
    except storage.StorageError:
        return None


class ModelHolder:
    """The active, preview and warm versions, and the reconciliation toward the record (or a fixed version)."""

    def __init__(self, state_uri: str | None = None, fixed: Desired | None = None, warmup_batch: int = 1):
        self.state_uri = state_uri
        self.fixed = fixed
        self.warmup_batch = warmup_batch
        self.current: Serving | None = None
        self.preview: Serving | None = None
        self.warm: Serving | None = None
        self.warm_until = 0.0
        self.desired: Desired | None = fixed
        self.desired_preview: Pin | None = None
        self.last_error: str | None = None
        self.preview_error: str | None = None
        self._failed: dict[Pin, float] = {}  # pin -> when it last failed to load
        self._lock = threading.Lock()

    def record(self) -> ServingRecord | None:
        if self.fixed:
            return ServingRecord(active=self.fixed.pin, revision=self.fixed.revision)
        return read_record(self.state_uri) if self.state_uri else None

    def reconcile_once(self) -> None:
        record = self.record()
        if record is None:
            self.desired = None
            return
        self.desired = Desired(record.active.model_name, record.active.model_version, record.revision) \
            if record.active else None
        self.desired_preview = record.preview if record.preview != record.active else None
        if self.desired is not None:
            self._reconcile_active(self.desired, record)  # first: a switch back takes the warm version
        with self._lock:
            if record.warm is None or (self.warm and self.warm.pin != record.warm) or time.time() >= record.warm_until:
                self._drop_warm()
            else:
                self.warm_until = record.warm_until
        self._reconcile_preview(self.desired_preview)

    def _reconcile_active(self, desired: Desired, record: ServingRecord) -> None:
        cur = self.current
        if cur and cur.pin == desired.pin:
            if cur.desired.revision != desired.revision:
                cur.desired = desired  # an unchanged version under a new revision (a record rewritten)
            return
        with self._lock:
            ready = next((s for s in (self.preview, self.warm) if s is not None and s.pin == desired.pin), None)
        if ready is None:
            ready = self._try_load(desired.pin, "active")
            if ready is None:
                return
        ready.desired = desired
        with self._lock:
            if ready is self.preview:
                self.preview = None
            if ready is self.warm:
                self.warm = None
            old, self.current = self.current, ready  # the switch: requests read .current once, when they start
            if old is not None and record.warm == old.pin and time.time() < record.warm_until:
                self.warm, self.warm_until = old, record.warm_until
        self.last_error = None
        log.info("serving %s (revision %d, dataset %s, gallery %s)%s", desired.pin, desired.revision,
                 ready.dataset_version, f"{len(ready.gallery)} items" if ready.gallery else "none",
                 f"; {old.pin} kept warm until {time.strftime('%H:%M:%S', time.localtime(self.warm_until))}"
                 if self.warm is old and old is not None else "")

    def _reconcile_preview(self, wanted: Pin | None) -> None:
        if wanted is None:
            if self.preview is not None:
                log.info("preview %s dropped", self.preview.pin)
                self.preview = None
            self.preview_error = None
            return
        if self.preview is not None and self.preview.pin == wanted:
            return
        loaded = self._try_load(wanted, "preview")
        if loaded is not None:
            self.preview, self.preview_error = loaded, None
            log.info("preview %s loaded beside %s: it answers no client", wanted,
                     self.current.pin if self.current else "nothing")

    def _drop_warm(self) -> None:
        if self.warm is not None:
            log.info("warm %s unloaded", self.warm.pin)
        self.warm, self.warm_until = None, 0.0

    def _try_load(self, pin: Pin, role: str) -> Serving | None:
        failed_at = self._failed.get(pin)
        if failed_at is not None and time.time() - failed_at < RETRY_FAILED_AFTER_S:
            return None
        uri = f"models:/{pin.model_name}/{pin.model_version}"
        log.info("loading %s (%s)", uri, role)
        try:
            serving = self._load(Desired(pin.model_name, pin.model_version), uri)
        except Exception as exc:  # any load failure must leave what serves as it is
            # Clients (/readyz, /metadata) learn which version failed and the kind of failure; the log has the rest
            # (paths, storage errors, what a hostile artifact held).
            error = f"loading {uri} failed ({type(exc).__name__}); the serving log says why"
            if role == "active":
                self.last_error = error
            else:
                self.preview_error = error
            self._failed[pin] = time.time()
            log.error("loading %s failed: %s: %s; still serving %s", uri, type(exc).__name__, exc,
                      self.current.pin if self.current else "nothing")
            return None
        self._failed.pop(pin, None)
        return serving

    def _load(self, desired: Desired, uri: str) -> Serving:
        from mlflow import MlflowClient

        client = MlflowClient()
        loaded = load_model(uri)
        mv = client.get_model_version(desired.model_name, desired.model_version)
        warm_up(loaded, self.warmup_batch)
        found = gallery_mod.download(client, mv.run_id) if mv.run_id else None
        if found is not None and found.dim != loaded.embedding_dim:
            raise ValueError(f"the gallery of run {mv.run_id} is {found.dim}-d, the model {loaded.embedding_dim}-d")
        dataset_version = mv.tags.get("dataset_version", loaded.metadata.get("dataset_version", ""))
        return Serving(desired, loaded, dataset_version, mv.run_id or "", found)

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile failed")
            stop.wait(interval)


def warm_up(loaded: LoadedModel, batch: int) -> None:
    """Run the batch sizes serving will see first, so no request pays for first-call set-up; check the shape."""
    size = loaded.image_size
    for n in sorted({1, batch}):
        out = loaded.embed(torch.zeros(n, 3, size, size))
        if out.shape != (n, loaded.embedding_dim):
            raise ValueError(f"warm-up produced shape {tuple(out.shape)}, expected ({n}, {loaded.embedding_dim})")


def configure_threads(threads: int) -> int:
    """Fit torch to the CPU budget: ``threads`` intra-op threads (the container's CPU limit), one inter-op."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set (or parallel work already ran) in this process
        torch.set_num_interop_threads(1)
    return threads
