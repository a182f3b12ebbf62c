"""The training loop and its bookkeeping: the state a checkpoint saves, one optimizer step, the epoch
loop, its metrics (never logged twice), its progress lines, and SIGTERM honoured at a step boundary.

With several data-parallel processes (see :mod:`embedder.distributed`) every rank runs this loop on
its share of each step's global batch; the model is wrapped in ``DistributedDataParallel``, the
epoch's sums are added up over the ranks before anything is logged, rank 0 alone logs and saves,
and a SIGTERM to any rank stops every rank after the same step.

MLflow is imported only where metrics are logged, so the loop runs where MLflow is not installed
(the GPU benchmark, :mod:`embedder.bench_gpu`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from embedder import checkpoint_writer, model, stage
from embedder.device_decode import EncodedBatch
from embedder.distributed import SINGLE, World
from embedder.loaders import EpochBatchSampler

if TYPE_CHECKING:
    from mlflow.entities import Metric

log = logging.getLogger("embedder.train")
EPOCH_METRICS = ("train_loss", "train_accuracy", "images_per_sec", "epoch_seconds", "learning_rate", "val_accuracy")
STEP_METRICS = ("batch_loss",)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # optimizer steps done in the epoch in progress
    global_step: int = 0
    loss_sum: float = 0.0  # over the epoch in progress, all ranks together
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    samples: int = 0  # where the epoch in progress stands in its order: images done by all ranks together

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = self.seen = self.correct = self.samples = 0
        self.loss_sum = self.seconds = 0.0


class EpochMeter:
    """The epoch's loss, correct and image counts: summed on the device, added into ``progress`` by ``sync``.

    Keeping the sums on the device avoids a GPU sync per step. ``sync`` (at checkpoints and the
    epoch end, where every rank calls it at the same step) adds the sums of every rank since the
    last sync into ``progress``, which so holds the whole job's sums, the same on every rank, and
    adds the time since the last sync to ``progress.seconds``.
    """

    def __init__(self, progress: Progress, device: torch.device, world: World = SINGLE):
        self.progress, self.device, self.world = progress, device, world
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0
        self.mark = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += images

    def sync(self) -> None:
        loss_sum, correct, seen = self.world.sum([self.loss_sum, self.correct, self.seen], self.device)
        self.progress.loss_sum += loss_sum
        self.progress.correct += int(correct)
        self.progress.seen += int(seen)
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0
        now = time.perf_counter()
        self.progress.seconds += now - self.mark
        self.mark = now


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def switch(value: str, device: torch.device) -> bool:
    """An ``auto``/``on``/``off`` flag: ``auto`` is on for CUDA, off on the CPU."""
    return value == "on" or (value == "auto" and device.type == "cuda")


def amp_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's type: bfloat16 (no gradient scaler needed) where the device has it, else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Deterministic kernels, or, on CUDA, cuDNN's autotuning and TF32 for what autocast leaves in float32."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


class Trainer:
    """The model, optimizer, LR schedule and gradient scaler, and one optimizer step.

    ``net`` is the model itself (its state is what checkpoints save and what is exported);
    ``model`` is what trains: ``net`` in ``DistributedDataParallel`` with several ranks, compiled
    with ``--compile``. On CUDA by default (``auto``): mixed precision in bfloat16 (float16 with a
    gradient scaler on GPUs without bfloat16), ``channels_last`` memory format, ``torch.compile`` and
    the fused AdamW.
    """

    def __init__(self, net: model.Classifier, args: argparse.Namespace, device: torch.device, world: World = SINGLE):
        self.device, self.world = device, world
        self.channels_last = switch(args.channels_last, device)
        self.memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.net = net.to(device, memory_format=self.memory_format)
        self.amp = switch(args.amp, device)
        self.amp_dtype = amp_dtype(device)
        self.compiled = switch(args.compile, device)
        trained: nn.Module = self.net
        if world.distributed:
            trained = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
        self.model = torch.compile(trained) if self.compiled else trained
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                           fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss()

    @property
    def precision(self) -> str | None:
        """The autocast type's name (``bfloat16``, ``float16``); None without mixed precision."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp else None

    def step(self, inputs: torch.Tensor | EncodedBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (the model in train mode); returns the batch's summed loss and correct count (on the device).

        ``inputs``: a batch of images, or JPEG files for the device to decode (``--decode-on device``).
        """
        if isinstance(inputs, EncodedBatch):
            inputs = inputs.decode(self.device)
        inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.model(inputs)
            loss = self.criterion(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach() * len(targets), (logits.argmax(1) == targets).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


@torch.inference_mode()
def accuracy(net: model.Classifier, loader: DataLoader, device: torch.device | None = None,
             world: World = SINGLE) -> float:
    """Top-1 accuracy over ``loader``; with several ranks each scores its share and the counts are added up."""
    net.eval()
    correct = seen = 0
    for inputs, targets in loader:
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        correct += (net(inputs).argmax(1) == targets).sum().item()
        seen += len(targets)
    correct, seen = world.sum([correct, seen], device or torch.device("cpu"))
    return correct / seen if seen else float("nan")


class ProgressLog:
    """Logs where training is within an epoch: every ``every_steps`` steps or ``every_s`` seconds, whichever first.

    A line says the epoch and step, the share done, images/s since the last line, the batch loss
    (with several ranks, rank 0's share of the batch) and the estimated time to the end of training
    (from the pace since this process started).
    """

    def __init__(self, every_steps: int, every_s: float, epochs: int, per_epoch: int, clock=time.monotonic):
        self.every_steps, self.every_s = every_steps, every_s
        self.epochs, self.per_epoch = epochs, per_epoch
        self.clock = clock
        self.started = self.last_time = clock()
        self.first_step: int | None = None
        self.last_step = 0
        self.images = 0

    def step(self, progress: Progress, images: int, loss: torch.Tensor | float) -> str | None:
        """Count one step of ``images`` (of every rank) with mean batch loss ``loss``; returns (and logs) the line
        when one is due.

        The loss is read only when a line is due, so a GPU is not synchronised every step.
        """
        now = self.clock()
        if self.first_step is None:
            self.first_step = self.last_step = progress.global_step - 1
        self.images += images
        if progress.global_step - self.last_step < self.every_steps and now - self.last_time < self.every_s:
            return None
        total = self.epochs * self.per_epoch
        per_step = (now - self.started) / max(1, progress.global_step - self.first_step)
        eta = (total - progress.global_step) * per_step
        line = (f"epoch {progress.epoch + 1}/{self.epochs} step {progress.batch}/{self.per_epoch} "
                f"({100 * progress.global_step / total:.0f}% of training): "
                f"{self.images / max(now - self.last_time, 1e-9):.1f} images/s, loss {float(loss):.4f}, "
                f"ETA {_duration(eta)}")
        log.info(line)
        self.last_time, self.last_step, self.images = now, progress.global_step, 0
        return line


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# -- metrics that are never logged twice -------------------------------------------------------


class MetricLog:
    """Buffers metrics and logs them in batches; a ``(key, step)`` already in the run is dropped.

    A resumed run recomputes the steps between its checkpoint and the interruption; the floors
    read from the run's metric history keep those steps from being logged a second time.
    """

    def __init__(self, run_id: str, keys: tuple[str, ...], resumed: bool):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = run_id
        self.floor: dict[str, int] = {}
        if resumed:
            for key in keys:
                steps = [m.step for m in self.client.get_metric_history(run_id, key)]
                if steps:
                    self.floor[key] = max(steps)
        self.pending: list[Metric] = []
        self.dropped = 0

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self.floor.get(key, -1):
                self.dropped += 1
                continue
            self.pending.append(Metric(key, float(value), now, step))
            self.floor[key] = step

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)


# -- SIGTERM -----------------------------------------------------------------------------------


class StopSignal:
    """Turns SIGTERM into a request the training loop honours at the next step boundary.

    Outside the loop (``immediate``) the request raises at once: after the final checkpoint
    nothing is lost by stopping, and the grace period may be short.
    """

    def __init__(self):
        self.requested_at: float | None = None
        self.immediate = False
        self._previous = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # the stop reduction in flight (several ranks)
        self.stopping = False  # the ranks agreed to stop (set by agreed and settle)

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.requested_at is None
        self.requested_at = self.requested_at or time.monotonic()
        if first:
            log.warning("SIGTERM received: saving a checkpoint and stopping")
        if self.immediate:
            raise stage.StagePreempted("SIGTERM after the last checkpoint; the retry resumes from it")

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self, world: World = SINGLE) -> bool:
        """Whether to stop after this step, called after every step on every rank.

        One process: whether SIGTERM came. Several: whether it came to any rank by the previous
        step. Each call starts an all-reduce (MAX) of this rank's request on the control group and
        reads the one the previous call started, which is done by then: no rank waits, and every
        rank reads the same value at the same step, so all stop after the same step.
        """
        if not world.distributed:
            decided = self.requested
        else:
            decided = self._read_pending()
            flag = torch.tensor([int(self.requested)])
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=world.control, async_op=True)
            self._pending = (work, flag)
        self.stopping = self.stopping or decided
        return decided

    def settle(self, world: World = SINGLE) -> bool:
        """Whether any rank has asked to stop, now (a blocking reduction; every rank calls it at the same point)."""
        if not world.distributed:
            decided = self.requested
        else:
            decided = self._read_pending()
            flag = torch.tensor([int(self.requested)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=world.control)
            decided = decided or bool(flag.item())
        self.stopping = self.stopping or decided
        return decided

    def _read_pending(self) -> bool:
        if self._pending is None:
            return False
        (work, flag), self._pending = self._pending, None
        work.wait()
        return bool(flag.item())


class SampleTrace:
    """Which images each step trained on, one JSON line per step (``--trace-samples``: for checking, not for speed).

    Each rank appends to ``<dir>/rank-<rank>.jsonl``: ``{"epoch": e, "step": global step, "indices": [...]}``,
    the manifest indices of the split's images in the order the rank's batch held them.
    """

    def __init__(self, directory: str, rank: int):
        self.path = Path(directory) / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, epoch: int, step: int, indices: torch.Tensor) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({"epoch": epoch, "step": step, "indices": indices.tolist()}) + "\n")


# -- the loop ----------------------------------------------------------------------------------


def fit(trainer: Trainer, progress: Progress, args: argparse.Namespace, train_loader: DataLoader,
        val_loader: DataLoader | None, metrics: MetricLog | None, saver: checkpoint_writer.AsyncCheckpointer | None,
        stop: StopSignal, base_state: dict[str, Any], world: World = SINGLE,
        trace: SampleTrace | None = None) -> dict[str, float]:
    """Train from ``progress`` to ``args.epochs``; returns the last epoch's metrics.

    Every rank runs it: ``saver`` (given on every rank when there is a checkpoint location) writes
    on rank 0 only, ``metrics`` is rank 0's alone (None elsewhere).
    """
    sampler: EpochBatchSampler = train_loader.batch_sampler
    last: dict[str, float] = {}
    reporter = ProgressLog(args.progress_every_steps, args.progress_every_s, args.epochs,
                           sampler.batches_per_epoch) if world.is_main else None

    def save(wait: bool = False, metric: float | None = None) -> None:
        if metrics:
            metrics.flush()
        if saver is None or not world.is_main:
            return
        state = {**base_state, **trainer.state_dict(), "progress": asdict(progress), "rng": checkpoint_writer.rng_state()}
        saver.save(state, wait=wait, global_step=progress.global_step, epoch=progress.epoch, batch=progress.batch,
                   metric=metric)

    for epoch in range(progress.epoch, args.epochs):
        sampler.set_epoch(epoch, progress.samples)
        per_epoch = progress.batch + len(sampler)
        trainer.model.train()  # validation at the end of the previous epoch left it in eval mode
        meter = EpochMeter(progress, trainer.device, world)
        for inputs, targets, indices in train_loader:
            batch_loss, batch_correct = trainer.step(inputs, targets)
            meter.add(batch_loss, batch_correct, len(targets))
            progress.batch += 1
            progress.global_step += 1
            progress.samples = min(sampler.size, progress.samples + sampler.global_batch)
            if trace:
                trace.write(epoch + 1, progress.global_step, indices)
            if progress.global_step % args.log_every_steps == 0 and (metrics or world.distributed):
                loss_sum, images = world.sum([batch_loss, len(targets)], trainer.device)
                if metrics:
                    metrics.add({"batch_loss": loss_sum / images}, progress.global_step)
            if reporter:
                reporter.step(progress, len(targets) * world.size, batch_loss / len(targets))
            if stop.agreed(world):
                meter.sync()
                if saver is None:
                    raise stage.StagePreempted("SIGTERM and no checkpoint location; the retry starts over")
                save(wait=True)
                raise stage.StagePreempted(
                    f"SIGTERM at epoch {epoch + 1}, step {progress.global_step}; checkpoint saved "
                    f"{time.monotonic() - (stop.requested_at or time.monotonic()):.1f} s after the signal")
            if args.checkpoint_every_steps and progress.global_step % args.checkpoint_every_steps == 0 \
                    and progress.batch < per_epoch:
                meter.sync()
                save()
        meter.sync()
        learning_rate = trainer.scheduler.get_last_lr()[0]  # the rate this epoch trained with
        trainer.scheduler.step()  # the next epoch's
        last = epoch_metrics(progress, learning_rate, trainer, val_loader, world)
        log.info("epoch %d/%d: %s", epoch + 1, args.epochs, ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
        if metrics:
            metrics.add(last, epoch + 1)
        progress.next_epoch()
        stopping = stop.settle(world)
        # The best checkpoint is the one with the best validation accuracy (lowest loss without one).
        save(wait=epoch + 1 == args.epochs or stopping, metric=last.get("val_accuracy", -last["train_loss"]))
        if stopping:
            raise stage.StagePreempted(f"SIGTERM during epoch {epoch + 1}; its end-of-epoch checkpoint is saved")
    return last


def epoch_metrics(progress: Progress, learning_rate: float, trainer: Trainer,
                  val_loader: DataLoader | None, world: World = SINGLE) -> dict[str, float]:
    """The metrics of the epoch ``progress`` has just completed (validation accuracy when there is a ``val`` split),
    over all ranks."""
    seen = progress.seen
    stats = EpochStats(progress.loss_sum / seen, progress.correct / seen, seen, progress.seconds)
    metrics = {"train_loss": stats.loss, "train_accuracy": stats.accuracy, "images_per_sec": stats.images_per_sec,
               "epoch_seconds": stats.seconds, "learning_rate": learning_rate}
    if val_loader is not None:
        metrics["val_accuracy"] = accuracy(trainer.net, val_loader, trainer.device, world)
    return metrics
