"""What one serving app runs, and the path from a request's images to checked embeddings.

The runtime owns the preprocessing pool (sized to the CPU budget), the micro-batcher (or none: each
request's forward pass on its own), the mirror (:mod:`embedder.serving.mirror`: a sample of answered
requests to the preview, and the preview's comparisons on a thread of their own) and two background
threads: the model holder's reconciliation and the embedding sample's writer. :meth:`Runtime.start` and
:meth:`Runtime.stop` are the app's lifespan; by the time ``stop`` runs, uvicorn has stopped accepting and
finished the requests in flight (graceful shutdown), so it only drains the batcher and the pools and
writes the last sample.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import HTTPException, Request

from embedder.model import cpu_budget
from embedder.serving.batching import MicroBatcher
from embedder.serving.inputs import Limits, preprocess, read_images
from embedder.serving.metrics import Metrics
from embedder.serving.mirror import Mirror, MirrorStats, compare_pool, compare_sync, source_sync
from embedder.serving.model import ModelHolder, Serving
from embedder.serving.sampling import EmbeddingSampler
from retrain_contract.serving import MirrorSource

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, holder: ModelHolder, metrics: Metrics, limits: Limits, sampler: EmbeddingSampler | None = None,
                 poll_interval: float = 1.0, micro_batching: bool = True, max_batch: int = 32,
                 batch_wait_s: float = 0.005, max_queued: int = 256, workers: int | None = None,
                 mirror: Mirror | None = None):
        self.holder, self.metrics, self.limits, self.sampler = holder, metrics, limits, sampler
        self.mirror = mirror
        self.mirror_stats = MirrorStats(metrics.registry)
        if mirror is not None:
            mirror.bind(metrics.registry)
        self.poll_interval = poll_interval
        self.micro_batching, self.max_batch, self.batch_wait_s, self.max_queued = (
            micro_batching, max_batch, batch_wait_s, max_queued)
        self.workers = workers or cpu_budget()
        self.pool: ThreadPoolExecutor | None = None
        self.mirror_pool: ThreadPoolExecutor | None = None
        self.batcher: MicroBatcher | None = None
        self._in_flight: collections.Counter[int] = collections.Counter()  # client requests per version (id)
        self._drained: asyncio.Event | None = None
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="preprocess")
        self.mirror_pool = compare_pool()
        if self.micro_batching:
            self.batcher = MicroBatcher(self.max_batch, self.batch_wait_s, self.max_queued, self.metrics.observe_batch)
            self.batcher.start()
        threading.Thread(target=self.holder.run_forever, args=(self.poll_interval, self._stop), daemon=True,
                         name="reconcile").start()
        if self.sampler:
            self._writer = threading.Thread(target=self.sampler.run_forever, args=(self._stop,), daemon=True,
                                            name="sample-writer")
            self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        if self.batcher:
            self.batcher.close(timeout=30)
        for pool in (self.pool, self.mirror_pool):
            if pool:
                pool.shutdown(wait=True)
        if self._writer:
            self._writer.join(30)
        log.info("stopped")

    def current(self) -> Serving:
        """The model being served, or a 503 (with the load error, if any) while there is none."""
        cur = self.holder.current
        if cur is None:
            reason = self.holder.last_error or ("no model version pinned yet: nothing has been deployed"
                                                if self.holder.desired is None else "loading")
            raise HTTPException(503, reason, headers={"Retry-After": "5"})
        return cur

    async def admit(self) -> Serving:
        """The active version for one client request, counted until :meth:`release`.

        After a switch, a request waits until every request the old version took is answered (tens of
        milliseconds): responses then come old, old, ..., new, new, never interleaved.
        """
        while True:
            cur = self.current()
            if not any(n for key, n in self._in_flight.items() if key != id(cur)):
                self._in_flight[id(cur)] += 1
                return cur
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()

    def release(self, cur: Serving) -> None:
        """A client request of ``cur`` is answered (called once its response is sent)."""
        self._in_flight[id(cur)] -= 1
        if self._in_flight[id(cur)] <= 0:
            del self._in_flight[id(cur)]
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    def previewed(self) -> Serving:
        """The preview (local mode), or a 503 saying why there is none."""
        cur = self.holder.preview
        if cur is None:
            wanted = self.holder.desired_preview
            raise HTTPException(503, self.holder.preview_error or (f"loading the preview {wanted}" if wanted else
                                                                   "no preview: the record names none"),
                                headers={"Retry-After": "5"})
        return cur

    async def measure(self, cur: Serving, items: list[tuple[str, bytes]]) -> MirrorSource:
        """The active's answer to a request it mirrors (the active's side, on the mirror's thread)."""
        return await asyncio.get_running_loop().run_in_executor(self.mirror_pool, source_sync, cur, items,
                                                                 self.limits.max_pixels)

    async def compare(self, target: Serving, items: list[tuple[str, bytes]], source: MirrorSource) -> dict:
        """Compare ``target``'s answer to a mirrored request with the source's, and count it (the preview's side)."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.mirror_pool, compare_sync, target, items, source,
                                            self.limits.max_pixels)
        self.mirror_stats.record(target.desired.model_version, source, result)
        return result

    async def embed(self, request: Request, cur: Serving, route: str, clients: bool = True) -> tuple[torch.Tensor, bool]:
        """The request's images embedded by ``cur``, and whether they came as a batch; offered to the sample and
        (after this returns, while the client gets its response) to the mirror."""
        items, batch = await read_images(request, self.limits)
        self.metrics.request_images.labels(route).observe(len(items))
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(self.pool, preprocess, items, cur.loaded.image_size,
                                             self.limits.max_pixels)
        if self.batcher:
            vectors = await self.batcher.embed(cur.loaded, tensors)
        else:
            started = time.perf_counter()
            vectors = await loop.run_in_executor(self.pool, cur.loaded.embed, tensors)
            self.metrics.observe_batch(len(tensors), time.perf_counter() - started)
        self._check(cur, vectors)
        if self.sampler and clients:
            for vector in vectors:
                self.sampler.offer(cur.desired.model_name, cur.desired.model_version, vector)
        if self.mirror is not None and clients:
            self.mirror.offer(items, cur, lambda: self.holder.preview, self.measure, self.compare)
        return vectors, batch

    def _check(self, cur: Serving, vectors: torch.Tensor) -> None:
        for value in vectors.norm(dim=1).tolist():
            self.metrics.norm.observe(value)
        if not torch.isfinite(vectors).all():
            self.metrics.nonfinite.inc()
            raise HTTPException(500, f"model version {cur.desired.model_version} produced a non-finite embedding")
