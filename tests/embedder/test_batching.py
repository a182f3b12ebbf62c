"""Micro-batching: concurrent requests share forward passes, within the batch and wait bounds; the queue is
bounded; models are never mixed in one batch; results go back to the right request. And the CPU budget
that sizes torch's threads follows a cgroup CPU limit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from embedder import model
from embedder.serving import batching


class Recording:
    """A stand-in model: doubles its input and records each batch size; the forward pass takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.05):
        self.delay, self.batches = delay, []
        self.lock = threading.Lock()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.batches.append(len(x))
        time.sleep(self.delay)
        return x * 2


def images(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 1), value)


async def gather(batcher, jobs):
    return await asyncio.gather(*(batcher.embed(m, x) for m, x in jobs))


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    """Yield to the event loop until ``condition()`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not after {timeout_s} s: {what}"
        await asyncio.sleep(0.001)


def run(batcher, jobs):
    batcher.start()
    try:
        return asyncio.run(gather(batcher, jobs))
    finally:
        batcher.close(timeout=10)


def test_concurrent_requests_share_forward_passes_within_the_bound_and_get_their_own_rows():
    net = Recording()
    batcher = batching.MicroBatcher(max_batch=8, max_wait_s=0.02)
    results = run(batcher, [(net, images(1, float(i))) for i in range(20)])
    assert [r.item() for r in results] == [2.0 * i for i in range(20)]  # each request its own answer
    assert sum(net.batches) == 20 and max(net.batches) == 8  # batches formed, never over the bound
    assert len(net.batches) <= 4  # 20 single-image requests in at most 4 forward passes (8 + 8 + 4, or so)


def test_a_lone_request_waits_at_most_the_bound():
    net = Recording(delay=0.0)
    batcher = batching.MicroBatcher(max_batch=8, max_wait_s=0.05)
    started = time.perf_counter()
    run(batcher, [(net, images(1, 1.0))])
    assert net.batches == [1]
    assert time.perf_counter() - started < 0.05 + 0.5  # the wait bound plus thread start-up, not more


def test_requests_for_different_models_never_share_a_batch():
    old, new = Recording(), Recording()
    batcher = batching.MicroBatcher(max_batch=16, max_wait_s=0.02)
    results = run(batcher, [(old if i % 2 else new, images(1, float(i))) for i in range(10)])
    assert [r.item() for r in results] == [2.0 * i for i in range(10)]
    assert sum(old.batches) == 5 and sum(new.batches) == 5


def test_a_request_larger_than_the_batch_bound_runs_in_chunks():
    net = Recording(delay=0.0)
    batcher = batching.MicroBatcher(max_batch=4, max_wait_s=0.0)
    (result,) = run(batcher, [(net, torch.arange(10.0).reshape(10, 1))])
    assert net.batches == [4, 4, 2] and result.flatten().tolist() == [2.0 * i for i in range(10)]


def test_a_full_queue_refuses_at_once_instead_of_growing():
    net = Recording(delay=0.3)
    batcher = batching.MicroBatcher(max_batch=2, max_wait_s=0.0, max_queued=4)

    async def burst():
        tasks = [asyncio.ensure_future(batcher.embed(net, images(1, 1.0))) for _ in range(12)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    batcher.start()
    try:
        outcomes = asyncio.run(burst())
    finally:
        batcher.close(timeout=10)
    refused = [o for o in outcomes if isinstance(o, batching.Overloaded)]
    assert refused and "images are already waiting (limit 4)" in str(refused[0])
    assert len(outcomes) - len(refused) == sum(net.batches)  # every accepted request was served


def test_a_failing_forward_pass_fails_its_requests_and_the_worker_goes_on():
    class Broken(Recording):
        def embed(self, x):
            raise RuntimeError("CUDA error: out of memory")

    net, broken = Recording(delay=0.0), Broken()
    batcher = batching.MicroBatcher(max_batch=4, max_wait_s=0.0)

    async def both():
        failed = await asyncio.gather(batcher.embed(broken, images(1, 1.0)), return_exceptions=True)
        ok = await batcher.embed(net, images(1, 3.0))
        return failed[0], ok

    batcher.start()
    try:
        failed, ok = asyncio.run(both())
    finally:
        batcher.close(timeout=10)
    assert isinstance(failed, RuntimeError) and ok.item() == 6.0


def test_close_runs_what_is_queued_then_refuses():
    net = Recording(delay=0.05)
    batcher = batching.MicroBatcher(max_batch=1, max_wait_s=0.0)

    async def scenario():
        batcher.start()
        pending = [asyncio.ensure_future(batcher.embed(net, images(1, float(i)))) for i in range(3)]
        # every request accepted (waiting, or taken by the worker) before the batcher closes
        await until(lambda: batcher.queued_images + len(net.batches) == 3, "the 3 requests accepted")
        closer = asyncio.get_running_loop().run_in_executor(None, batcher.close, 10)
        done = await asyncio.gather(*pending)
        await closer
        with pytest.raises(batching.Overloaded, match="shutting down"):
            await batcher.embed(net, images(1, 9.0))
        return done

    assert [r.item() for r in asyncio.run(scenario())] == [0.0, 2.0, 4.0]


@pytest.mark.parametrize(("cpu_max", "expected"), [("200000 100000", 2), ("150000 100000", 1), ("50000 100000", 1),
                                                   ("max 100000", None)])
def test_the_cpu_budget_follows_the_cgroup_limit(tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    cores = len(__import__("os").sched_getaffinity(0))
    assert model.cpu_budget(path) == (min(cores, expected) if expected else cores)
