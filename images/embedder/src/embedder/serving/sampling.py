"""The sample of served embeddings that the drift monitor reads.

With ``--sample-uri`` the server keeps a random share (``--sample-rate``) of the embeddings it
serves and writes them per time window (``--window-seconds``) to storage, at most
``--max-per-window`` per window and process. Requests only append to a bounded in-memory buffer; a
background thread writes closed windows, so sampling never waits on storage. The file layout is
the contract's :func:`retrain_contract.artifacts.sample_path`
(``<sample uri>/<model>/v<version>/window=<start epoch s>/<host>-<pid>.npy``): every replica writes
its own, and the monitor reads them all.
"""

from __future__ import annotations

import io
import logging
import os
import random
import socket
import threading
import time

import numpy as np
import torch

from retrain_contract import artifacts, storage

log = logging.getLogger(__name__)


class EmbeddingSampler:
    """A bounded random sample of served embeddings, written to storage per closed time window."""

    def __init__(self, uri: str, rate: float, window_s: float, max_per_window: int, seed: int | None = None):
        if not 0 <= rate <= 1:
            raise ValueError(f"--sample-rate must be between 0 and 1, got {rate}")
        if window_s <= 0 or max_per_window < 1:
            raise ValueError("--window-seconds must be positive and --max-per-window at least 1")
        self.uri, self.rate, self.window_s, self.max_per_window = uri.rstrip("/"), rate, window_s, max_per_window
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._buffers: dict[tuple[str, str, int], list[np.ndarray]] = {}
        self.dropped = 0  # sampled but over the per-window bound
        self.written: list[str] = []
        self._me = f"{socket.gethostname()}-{os.getpid()}"

    def window_of(self, t: float) -> int:
        return int(t // self.window_s * self.window_s)

    def offer(self, model_name: str, version: str, vector: torch.Tensor, now: float | None = None) -> None:
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return
        key = (model_name, str(version), self.window_of(time.time() if now is None else now))
        row = vector.detach().cpu().numpy().astype(np.float32, copy=True)
        with self._lock:
            buffer = self._buffers.setdefault(key, [])
            if len(buffer) < self.max_per_window:
                buffer.append(row)
            else:
                self.dropped += 1

    def flush(self, now: float | None = None, everything: bool = False) -> list[str]:
        """Write the windows that have closed (all of them with ``everything``, at shutdown)."""
        now = time.time() if now is None else now
        with self._lock:
            due = [k for k in self._buffers if everything or k[2] + self.window_s <= now]
            batches = {k: self._buffers.pop(k) for k in due}
        written = []
        for (name, version, start), rows in batches.items():
            buffer = io.BytesIO()
            np.save(buffer, np.stack(rows))
            uri = storage.join(self.uri, *artifacts.sample_path(name, version, start, self._me))
            try:
                storage.write_bytes(uri, buffer.getvalue())
                written.append(uri)
            except Exception:  # a storage outage loses this window's sample, never a request
                log.exception("could not write the embedding sample %s", uri)
        self.written.extend(written)
        return written

    def run_forever(self, stop: threading.Event) -> None:
        interval = min(5.0, self.window_s / 4)
        while not stop.wait(interval):
            self.flush()
        self.flush(everything=True)
