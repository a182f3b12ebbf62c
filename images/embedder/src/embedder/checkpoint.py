"""Training checkpoints: atomic, verified, resumable, on ``file://`` or ``s3://``.

One training run (one Airflow DAG run) owns one checkpoint location,
``<checkpoint root>/<dag id>/<run id>/``, so every retry of that run finds what the previous
attempts saved::

    ckpt-000000120.pt   torch.save of the full training state after global step 120
    ckpt-000000160.pt
    latest.json         the manifest, always written last

A checkpoint is written in two steps: the state object first (locally a temporary file, fsync and
``os.replace``; on S3 one ``PutObject``), then the manifest naming it with its sha256 and size. A
writer killed at any moment therefore leaves the previous manifest, and every checkpoint it
names, intact; an object that no manifest names is an orphan and is removed by the next save.
Loading checks the sha256, the dataset version and the training configuration, newest first, and
falls back to the previous checkpoint with a warning when one does not match. The manifest keeps
the newest ``keep_last`` checkpoints plus the best one by its validation metric.

The manifest also carries what a retry needs beyond the weights: the MLflow run to continue, how
many times the run was preempted, and, once training finished, the stage's result.

Checkpoints are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from retrain_contract import storage

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "latest.json"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none of the saved ones can be used."""


def run_location(root: str, dag_id: str, run_id: str) -> str:
    """``<root>/<dag id>/<run id>`` with every character outside ``[A-Za-z0-9._=-]`` replaced by ``_``.

    Airflow run ids hold ``:`` and ``+`` (``scheduled__2026-11-22T02:00:00+00:00``); the replacement
    keeps keys portable across file systems and S3 tooling, and is the same on every retry.
    """
    return storage.join(root, _UNSAFE.sub("_", dag_id), _UNSAFE.sub("_", run_id))


@dataclass(frozen=True)
class Record:
    """One saved checkpoint, as the manifest names it."""

    name: str
    global_step: int
    epoch: int  # epochs completed when it was saved
    batch: int  # batches done in the epoch in progress (0 at an epoch end)
    sha256: str
    bytes: int
    dataset_version: str
    metric: float | None = None  # the validation metric at an epoch end; picks the best checkpoint
    saved_at: str = ""


@dataclass
class Manifest:
    dataset_version: str
    config: str  # fingerprint of the training configuration (see train.config_fingerprint)
    mlflow_run_id: str | None = None
    checkpoints: list[Record] = field(default_factory=list)  # newest first
    best: str | None = None
    preemptions: int = 0
    resumes: int = 0
    completed: dict[str, Any] | None = None  # the stage result once the model is logged
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"manifest format {raw.get('format')!r}, this code reads format {FORMAT}")
        raw["checkpoints"] = [Record(**r) for r in raw.get("checkpoints", [])]
        return cls(**raw)

    def matches(self, dataset_version: str, config: str) -> bool:
        return self.dataset_version == dataset_version and self.config == config


@dataclass
class Restored:
    """A checkpoint that passed every check, loaded."""

    record: Record
    state: dict[str, Any]
    skipped: list[str]  # why newer checkpoints were not used


def snapshot(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to CPU memory, detached from training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """Every random number generator training touches, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class CheckpointStore:
    """The checkpoints of one training run at ``uri``; see the module docstring for the layout."""

    def __init__(self, uri: str, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.uri = uri.rstrip("/")
        self.keep_last = keep_last
        self._lock = threading.Lock()
        self.manifest: Manifest | None = None

    def _uri(self, name: str) -> str:
        return storage.join(self.uri, name)

    # -- manifest ------------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The saved manifest; None when there is none or it cannot be read (with a warning)."""
        uri = self._uri(MANIFEST)
        if not storage.exists(uri):
            return None
        try:
            return Manifest.from_json(storage.read_bytes(uri).decode())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("checkpoint manifest %s is unreadable (%s); starting without it", uri, exc)
            return None

    def _write_manifest(self, manifest: Manifest) -> None:
        storage.write_bytes(self._uri(MANIFEST), manifest.to_json().encode())
        self.manifest = manifest

    def begin(self, dataset_version: str, config: str, mlflow_run_id: str) -> Manifest:
        """Start a run's manifest (or adopt the saved one when it is for the same data and config)."""
        with self._lock:
            saved = self.read_manifest()
            if saved and saved.matches(dataset_version, config):
                saved.mlflow_run_id = mlflow_run_id
                self._write_manifest(saved)
            else:
                self._write_manifest(Manifest(dataset_version, config, mlflow_run_id))
            return self.manifest

    def update(self, change: Callable[[Manifest], None]) -> Manifest:
        with self._lock:
            if self.manifest is None:
                raise CheckpointError(f"{self.uri}: no manifest yet (call begin first)")
            change(self.manifest)
            self._write_manifest(self.manifest)
            return self.manifest

    # -- save ----------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, global_step: int, epoch: int, batch: int,
             metric: float | None = None) -> Record:
        """Write ``state`` (already on CPU), then the manifest naming it; prune what is no longer kept."""
        if self.manifest is None:
            raise CheckpointError(f"{self.uri}: no manifest yet (call begin first)")
        data = serialize(state)
        name = f"ckpt-{global_step:09d}.pt"
        storage.write_bytes(self._uri(name), data)
        record = Record(name=name, global_step=global_step, epoch=epoch, batch=batch,
                        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                        dataset_version=self.manifest.dataset_version, metric=metric,
                        saved_at=datetime.now(UTC).isoformat(timespec="seconds"))
        with self._lock:
            manifest = self.manifest
            kept = [record, *(r for r in manifest.checkpoints if r.name != name)]
            best = max((r for r in kept if r.metric is not None), key=lambda r: (r.metric, r.global_step), default=None)
            keep = kept[: self.keep_last]
            if best is not None and best not in keep:
                keep.append(best)
            manifest.checkpoints = keep
            manifest.best = best.name if best else None
            self._write_manifest(manifest)
        self._prune({r.name for r in keep})
        return record

    def _prune(self, keep: set[str]) -> None:
        try:
            names = storage.list_files(self.uri)
        except storage.StorageError:
            return
        for name in names:
            if "/" in name:
                continue
            stale_tmp = name.startswith(".ckpt-") and name.endswith(".tmp")
            if (_NAME.match(name) and name not in keep) or stale_tmp:
                storage.delete(self._uri(name))

    # -- load ----------------------------------------------------------------------------------

    def restore(self, dataset_version: str, config: str) -> Restored | None:
        """The newest checkpoint that is intact and belongs to this data and configuration.

        Newer checkpoints that fail a check are skipped with a warning naming the reason; None
        when there is no manifest or nothing usable in it.
        """
        saved = self.read_manifest()
        self.manifest = saved
        if saved is None or not saved.checkpoints:
            return None
        skipped: list[str] = []
        for record in saved.checkpoints:
            reason = None
            if record.dataset_version != dataset_version:
                reason = f"dataset version {record.dataset_version}, this run trains on {dataset_version}"
            elif saved.config != config:
                reason = "it was saved with a different training configuration"
            else:
                try:
                    data = storage.read_bytes(self._uri(record.name))
                except storage.StorageError as exc:
                    reason = f"unreadable ({exc})"
                else:
                    digest = hashlib.sha256(data).hexdigest()
                    if len(data) != record.bytes or digest != record.sha256:
                        reason = (f"sha256 mismatch ({len(data)} bytes, sha256 {digest[:12]}…; the manifest "
                                  f"says {record.bytes} bytes, {record.sha256[:12]}…): the file is corrupt")
                    else:
                        try:
                            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                        except Exception as exc:
                            reason = f"does not load ({type(exc).__name__}: {exc})"
                        else:
                            if state.get("dataset_version") != dataset_version:
                                reason = f"its state says dataset version {state.get('dataset_version')}"
            if reason is None:
                return Restored(record, state, skipped)
            message = f"checkpoint {self._uri(record.name)} skipped: {reason}"
            log.warning("%s; trying the previous one", message)
            skipped.append(message)
        log.warning("no usable checkpoint in %s; training starts from the beginning", self.uri)
        return None


class AsyncCheckpointer:
    """Writes checkpoints on a background thread so training does not wait for storage.

    ``save`` copies the state to CPU memory (the only part training waits for), then serialises,
    hashes and uploads it on a worker thread. At most one write is in flight: a second ``save``
    first waits for the previous one, which bounds memory to two copies of the state. ``flush``
    waits for the write in flight and re-raises its error, if any.
    """

    def __init__(self, store: CheckpointStore):
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blocking_seconds = 0.0  # time training spent inside save() and flush()
        self.write_seconds = 0.0  # time the writer thread spent serialising and uploading
        self.saved: list[Record] = []

    def save(self, state: dict[str, Any], *, wait: bool = False, **meta: Any) -> None:
        start = time.perf_counter()
        self._join()
        copy = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(copy, meta), name="checkpoint-writer", daemon=True)
        self._thread.start()
        if wait:
            self._join()
        self.blocking_seconds += time.perf_counter() - start

    def flush(self) -> None:
        start = time.perf_counter()
        self._join()
        self.blocking_seconds += time.perf_counter() - start

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint to {self.store.uri} failed: {error}") from error

    def _write(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            record = self.store.save(state, **meta)
            self.saved.append(record)
            log.info("checkpoint %s saved (epoch %d, step %d, %.1f MB, %.2f s)", record.name, record.epoch,
                     record.global_step, record.bytes / 1e6, time.perf_counter() - start)
        except BaseException as exc:
            self._error = exc
        finally:
            self.write_seconds += time.perf_counter() - start

