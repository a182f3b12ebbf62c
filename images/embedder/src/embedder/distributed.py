"""Data-parallel training under torchrun: which rank this process is, the process group, and the few
collectives the train stage needs (sums of metrics, an agreement, a barrier).

torchrun (see :mod:`embedder.torchrun`) starts one process per GPU and tells each its place in the
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` variables. Without them, or with
``WORLD_SIZE=1``, :func:`initialized` gives :data:`SINGLE` and nothing here communicates: the
single-process path is today's, unchanged.

With several ranks the default process group uses NCCL on GPUs and gloo on CPUs, and every
collective gives up after ``timeout`` (``--collective-timeout-s``): a rank that stops answering fails
the stage instead of hanging it. A second, gloo, group carries the control traffic (the stop
agreement, barriers) on the CPU, so that it never waits behind, or synchronises, the GPU's stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from embedder import stage

log = logging.getLogger("embedder.distributed")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one per GPU; one in all without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among this node's processes: the GPU it uses
    local_size: int = 1  # processes on this node: they share its CPUs
    control: Any = None  # the gloo group for control traffic (None with one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs to MLflow, writes checkpoints and the result."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: Sequence[float | int | torch.Tensor], device: torch.device) -> list[float]:
        """The sums over every rank of ``values`` (numbers or 0-d tensors), in one all-reduce."""
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        if self.distributed:
            dist.all_reduce(local)
        return local.tolist()

    def barrier(self) -> None:
        """Until every rank is here (CPU-side; gives up after the collective timeout)."""
        if self.distributed:
            dist.barrier(group=self.control)

    def same(self, value: Any, what: str) -> None:
        """Raise unless every rank holds the same ``value`` (a small picklable object); ``what`` names it."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.control)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"the ranks disagree on {what}: " + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values)))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


SINGLE = World()


def world_from_env(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """``(rank, size, local_rank, local_size)`` from torchrun's variables; ``(0, 1, 0, 1)`` without them."""
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as exc:
        raise stage.StageInputError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE are not numbers ({exc})") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size):
        raise stage.StageInputError(f"RANK={rank} of WORLD_SIZE={size} (LOCAL_RANK={local_rank} of "
                                    f"LOCAL_WORLD_SIZE={local_size}) is not a place among the processes")
    return rank, size, local_rank, local_size


@contextlib.contextmanager
def initialized(device_type: str, timeout_s: float, env: Mapping[str, str] | None = None) -> Iterator[World]:
    """The process group for this stage's lifetime: NCCL on ``cuda``, gloo otherwise, collectives
    bounded by ``timeout_s``. With one process: :data:`SINGLE`, and nothing is initialised."""
    env = os.environ if env is None else env
    rank, size, local_rank, local_size = world_from_env(env)
    if LAUNCHER_PID_ENV in env:  # under embedder.torchrun, even as its only process
        die_with_launcher(int(env[LAUNCHER_PID_ENV]))
    if size == 1:
        yield SINGLE
        return
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        control = dist.new_group(backend="gloo", timeout=timeout)
        world = World(rank, size, local_rank, local_size, control)
        stage.label_log_lines(f"rank {rank}")
        if not world.is_main:  # rank 0 speaks for the job; the others only warn and fail
            logging.getLogger().setLevel(logging.WARNING)
        log.info("rank %d of %d (local rank %d of %d), %s, collectives time out after %g s", rank, size, local_rank,
                 local_size, dist.get_backend(), timeout_s)
        yield world
    finally:
        dist.destroy_process_group()


LAUNCHER_PID_ENV = "EMBEDDER_LAUNCHER_PID"  # set by embedder.torchrun for its ranks


def die_with_launcher(launcher: int) -> None:
    """SIGKILL this rank when its launcher dies (Linux): no rank trains on as an orphan.

    torchrun starts each rank in a session of its own, so killing the launcher's process group
    does not reach the ranks; a launcher that exits normally has already stopped them.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != launcher:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGKILL)
