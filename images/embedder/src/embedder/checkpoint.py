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
many times the run was preempted, and, once training finished, the stage's result and when it
finished.

Retention: the checkpoints of a finished run are only needed until nobody will look at them
again. :func:`delete_expired_checkpoints` deletes the checkpoint files of every run under a DAG's
folder that finished at least a given time ago, keeping each one's manifest (with its result, so
a retry of that run still returns it without training). Runs that have not finished are never
touched.

Checkpoints are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so a checkpoint cannot run code.

(About 360 lines on purpose: the layout, the manifest, atomic saves, verified restores and retention
share one set of invariants, which is easier to check in one file.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import torch

from retrain_contract import artifacts, storage

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "latest.json"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none of the saved ones can be used."""


def run_location(root: str, dag_id: str, run_id: str) -> str:
    """Where one DAG run keeps its checkpoints: :func:`retrain_contract.artifacts.checkpoint_path` under ``root``."""
    return storage.join(root, *artifacts.checkpoint_path(dag_id, run_id))


def dag_location(root: str, dag_id: str) -> str:
    """``<root>/<dag id>``: the folder that holds one checkpoint location per run of the DAG."""
    return storage.join(root, *artifacts.checkpoint_path(dag_id))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is_checkpoint_file(name: str) -> bool:
    """A checkpoint, or what a killed write of one left behind (locally a temporary file)."""
    return bool(_NAME.match(name)) or (name.startswith(".ckpt-") and name.endswith(".tmp"))


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
    completed_at: str | None = None  # when it was recorded (ISO 8601, UTC)
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"manifest format {raw.get('format')!r}, this code reads format {FORMAT}")
        raw["checkpoints"] = [Record(**r) for r in raw.get("checkpoints", [])]
        # Fields a newer version added (same format) are dropped, not fatal: the manifest stays usable.
        return cls(**{k: v for k, v in raw.items() if k in _MANIFEST_FIELDS})

    def matches(self, dataset_version: str, config: str) -> bool:
        return self.dataset_version == dataset_version and self.config == config

    def completed_time(self) -> datetime | None:
        """When the run finished; None while it has not.

        Manifests written before the time was recorded fall back on their newest checkpoint's time
        (the last epoch's, saved just before the model was logged); None when they list none.
        """
        if self.completed is None:
            return None
        stamp = self.completed_at or max((r.saved_at for r in self.checkpoints if r.saved_at), default=None)
        try:
            when = datetime.fromisoformat(stamp) if stamp else None
        except ValueError:
            log.warning("completion time %r is not an ISO 8601 time; treating the run as unfinished", stamp)
            return None
        return when.replace(tzinfo=UTC) if when and when.tzinfo is None else when


_MANIFEST_FIELDS = {f.name for f in fields(Manifest)}


@dataclass
class Restored:
    """A checkpoint that passed every check, loaded."""

    record: Record
    state: dict[str, Any]
    skipped: list[str]  # why newer checkpoints were not used


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

    def uri_of(self, name: str) -> str:
        """The storage URI of the file ``name`` (a checkpoint or the manifest) in this run's location."""
        return storage.join(self.uri, name)

    # -- manifest ------------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The saved manifest; None when there is none or it cannot be read (with a warning)."""
        uri = self.uri_of(MANIFEST)
        if not storage.exists(uri):
            return None
        try:
            return Manifest.from_json(storage.read_bytes(uri).decode())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("checkpoint manifest %s is unreadable (%s); starting without it", uri, exc)
            return None

    def _write_manifest(self, manifest: Manifest) -> None:
        storage.write_bytes(self.uri_of(MANIFEST), manifest.to_json().encode())
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

    def complete(self, result: dict[str, Any], at: datetime | None = None) -> Manifest:
        """Record the run's result and when it finished (``at``, default now): a retry then returns it."""
        with self._lock:
            manifest = self.manifest or self.read_manifest()
            if manifest is None:
                raise CheckpointError(f"{self.uri}: no manifest yet (call begin first)")
            manifest.completed = result
            manifest.completed_at = (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
            self._write_manifest(manifest)
            return manifest

    def delete_checkpoints(self) -> list[str]:
        """Delete every checkpoint file of this finished run; returns their names.

        The manifest stays, with its result and no checkpoints listed: it is rewritten first, so an
        interrupted deletion leaves files no manifest names (removed by the next retention pass),
        never a manifest naming files that are gone. A run that has not finished is refused.
        """
        with self._lock:
            manifest = self.manifest or self.read_manifest()
            if manifest is None or manifest.completed is None:
                raise CheckpointError(f"{self.uri}: the run has not finished; its checkpoints are still needed")
            if manifest.checkpoints or manifest.best:
                manifest.checkpoints, manifest.best = [], None
                self._write_manifest(manifest)
            return self._prune(set())

    # -- save ----------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, global_step: int, epoch: int, batch: int,
             metric: float | None = None) -> Record:
        """Write ``state`` (already on CPU), then the manifest naming it; prune what is no longer kept."""
        if self.manifest is None:
            raise CheckpointError(f"{self.uri}: no manifest yet (call begin first)")
        data = serialize(state)
        name = f"ckpt-{global_step:09d}.pt"
        storage.write_bytes(self.uri_of(name), data)
        record = Record(name=name, global_step=global_step, epoch=epoch, batch=batch,
                        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                        dataset_version=self.manifest.dataset_version, metric=metric, saved_at=_now())
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

    def _prune(self, keep: set[str]) -> list[str]:
        """Delete the checkpoint files not in ``keep`` and stale temporary files; returns their names."""
        try:
            names = storage.list_files(self.uri)
        except storage.StorageError:
            return []
        deleted = []
        for name in names:
            if "/" in name:
                continue
            if _is_checkpoint_file(name) and name not in keep:
                storage.delete(self.uri_of(name))
                deleted.append(name)
        return deleted

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
                    data = storage.read_bytes(self.uri_of(record.name))
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
            message = f"checkpoint {self.uri_of(record.name)} skipped: {reason}"
            log.warning("%s; trying the previous one", message)
            skipped.append(message)
        log.warning("no usable checkpoint in %s; training starts from the beginning", self.uri)
        return None


def delete_expired_checkpoints(dag_uri: str, older_than: timedelta, now: datetime | None = None) -> list[str]:
    """Delete the checkpoint files of every run under ``dag_uri`` that finished at least ``older_than`` ago.

    ``dag_uri`` is a DAG's folder (:func:`dag_location`), holding one location per run. Each
    cleaned run keeps its manifest (see :meth:`CheckpointStore.delete_checkpoints`). Runs without
    a manifest, with an unreadable one, or that have not finished are left alone. Returns the
    locations of the runs whose checkpoint files were deleted.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    try:
        names = storage.list_files(dag_uri)
    except storage.StorageError:  # no run has saved anything yet
        return []
    holding: dict[str, set[str]] = {}  # run folder -> its files
    for name in names:
        run, _, rest = name.partition("/")
        if rest and "/" not in rest:
            holding.setdefault(run, set()).add(rest)
    cleaned = []
    for run, run_files in sorted(holding.items()):
        if MANIFEST not in run_files or not any(_is_checkpoint_file(f) for f in run_files):
            continue
        store = CheckpointStore(storage.join(dag_uri, run))
        try:
            manifest = store.manifest = store.read_manifest()
            finished = manifest.completed_time() if manifest else None
            if finished is None or finished > cutoff:
                continue
            deleted = store.delete_checkpoints()
        except Exception as exc:  # one run's storage trouble does not keep the others' files forever
            log.warning("checkpoint retention: %s skipped (%s: %s)", store.uri, type(exc).__name__, exc)
            continue
        log.info("checkpoint retention: %s finished %s; deleted %s", store.uri, finished.isoformat(),
                 ", ".join(deleted) or "nothing")
        cleaned.append(store.uri)
    return cleaned
