"""Capturing the training state and writing it off the training thread.

Training waits only while the state is copied to CPU memory (:func:`snapshot`); serialising, hashing
and uploading happen on a writer thread (:class:`AsyncCheckpointer`), with at most one write in
flight. :func:`rng_state` captures every random generator training touches, so a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import numpy as np
import torch

from embedder.checkpoint import CheckpointError, CheckpointStore, Record

log = logging.getLogger("embedder.checkpoint")


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
