"""Micro-batching: concurrent requests share one forward pass.

Requests hand their preprocessed images to :class:`MicroBatcher` and await the result. One worker
thread takes the oldest waiting request, then keeps adding waiting requests for the same model
until the batch holds ``max_batch`` images or ``max_wait_s`` has passed since it started (the
bounded wait), runs the forward pass, and hands each request its rows. Under load the wait costs
nothing (the next batch is already queued while the current one runs); when idle a lone request
waits at most ``max_wait_s``.

The queue is bounded (``max_queued`` images): past it :class:`Overloaded` is raised at once, so a
burst gets 503s with ``Retry-After`` instead of unbounded memory and latency.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full (or the batcher is stopping): the request should be retried later."""


@dataclass
class _Job:
    model: Any  # anything with .embed(tensor) -> tensor; jobs for different models never share a batch
    images: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future, result: torch.Tensor | None, error: BaseException | None) -> None:
    if future.done():  # the request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class MicroBatcher:
    def __init__(self, max_batch: int = 32, max_wait_s: float = 0.005, max_queued: int = 256,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_wait_s < 0 or max_queued < max_batch:
            raise ValueError(f"micro-batching needs max_batch >= 1, max_wait >= 0 and max_queued >= max_batch "
                             f"(got {max_batch}, {max_wait_s}, {max_queued})")
        self.max_batch, self.max_wait_s, self.max_queued = max_batch, max_wait_s, max_queued
        self.on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images waiting
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def queued_images(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; what is queued is still run. Waits for the worker to finish."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    async def embed(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        job = _Job(model, images, loop.create_future(), loop)
        n = len(images)
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if self._queued and self._queued + n > self.max_queued:
                raise Overloaded(f"{self._queued} images are already waiting (limit {self.max_queued})")
            self._queue.append(job)
            self._queued += n
            self._cond.notify()
        return await job.future

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, n = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                if not self._queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closing:
                        break
                    self._cond.wait(remaining)
                    continue
                head = self._queue[0]
                if head.model is not first.model or n + len(head.images) > self.max_batch:
                    break
                batch.append(self._queue.popleft())
                n += len(head.images)
            self._queued -= n
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._forward(batch)

    def _forward(self, batch: list[_Job]) -> None:
        model = batch[0].model
        try:
            started = time.perf_counter()
            x = torch.cat([job.images for job in batch]) if len(batch) > 1 else batch[0].images
            # A single request larger than max_batch runs in max_batch chunks.
            out = torch.cat([model.embed(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
            if self.on_batch:
                self.on_batch(len(x), time.perf_counter() - started)
        except Exception as exc:  # every waiting request gets the error; the worker goes on
            log.exception("forward pass over %d requests failed", len(batch))
            for job in batch:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
            return
        start = 0
        for job in batch:
            rows = out[start : start + len(job.images)]
            start += len(job.images)
            job.loop.call_soon_threadsafe(_resolve, job.future, rows, None)
