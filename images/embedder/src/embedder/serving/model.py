"""The model being served: reconciliation to the desired-state record, warm-up, readiness.

The process reconciles to the record the way a Deployment's pods follow their template: a
background thread reads the record (``--state-uri``), and when it names a version other than the
one loaded it loads ``models:/<name>/<version>`` from MLflow with the version's ``/similar``
gallery, warms it up, and swaps it in. A version that fails to load leaves the old one serving and
is reported (``last_error``); it is tried again after :data:`RETRY_FAILED_AFTER_S`. On Kubernetes the
record is replaced by a fixed version (the pod template's ``MODEL_NAME``/``MODEL_VERSION``), loaded
once at start. The holder is ready once :attr:`ModelHolder.current` is set.
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

log = logging.getLogger(__name__)
RETRY_FAILED_AFTER_S = 30.0


@dataclass
class Desired:
    model_name: str
    model_version: str
    revision: int = 0


@dataclass
class Serving:
    desired: Desired
    loaded: LoadedModel
    dataset_version: str
    run_id: str
    gallery: gallery_mod.Gallery | None = None
    loaded_at: float = field(default_factory=time.time)


def read_desired(state_uri: str) -> Desired | None:
    try:
        doc = json.loads(storage.read_bytes(state_uri))
    except storage.StorageError:
        return None
    return Desired(doc["model_name"], str(doc["model_version"]), int(doc.get("revision", 0)))


class ModelHolder:
    """The model being served and the reconciliation toward the desired version."""

    def __init__(self, state_uri: str | None = None, fixed: Desired | None = None, warmup_batch: int = 1):
        self.state_uri = state_uri
        self.fixed = fixed
        self.warmup_batch = warmup_batch
        self.current: Serving | None = None
        self.desired: Desired | None = fixed
        self.last_error: str | None = None
        self._failed: tuple[str, float] | None = None  # (version, when)
        self._lock = threading.Lock()

    def reconcile_once(self) -> None:
        desired = self.fixed or (read_desired(self.state_uri) if self.state_uri else None)
        self.desired = desired
        if desired is None:
            return
        cur = self.current
        if cur and (cur.desired.model_name, cur.desired.model_version) == (desired.model_name, desired.model_version):
            return
        if self._failed and self._failed[0] == desired.model_version and time.time() - self._failed[1] < RETRY_FAILED_AFTER_S:
            return
        uri = f"models:/{desired.model_name}/{desired.model_version}"
        log.info("loading %s (revision %d)", uri, desired.revision)
        try:
            serving = self._load(desired, uri)
        except Exception as exc:  # any load failure must leave the old model serving
            self.last_error = f"loading {uri} failed: {type(exc).__name__}: {exc}"
            self._failed = (desired.model_version, time.time())
            log.error("%s; still serving %s", self.last_error, cur.desired.model_version if cur else "nothing")
            return
        with self._lock:
            self.current = serving
        self.last_error, self._failed = None, None
        log.info("serving %s (dataset %s, gallery %s)", uri, serving.dataset_version,
                 f"{len(serving.gallery)} items" if serving.gallery else "none")

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
