"""Stage ``train``: fine-tune a torchvision ResNet as a classifier and log the embedder to MLflow.

Trains on the manifest's ``train`` split (validation accuracy on ``val`` when present), logs
params, metrics (a batch loss every few steps; loss, accuracy, images/s per epoch) and the model
(PyTorch flavor, with a signature) whose forward drops the head and returns L2-normalised
embeddings. The run is tagged with the Airflow DAG/run, the dataset version, the code version and
the image.

Fault tolerance. With a checkpoint location (``--checkpoint-root`` plus the Airflow DAG and run,
or ``--checkpoint-uri``) the stage saves the whole training state every
``--checkpoint-every-steps`` steps and at each epoch end (see :mod:`embedder.checkpoint`). When it
starts for a run that has checkpoints it resumes from the newest intact one, in the same MLflow
run, without logging any metric step twice. On SIGTERM (a preempted node, a drained pod) it
finishes the current step, saves a checkpoint and exits with ``EXIT_PREEMPTED``, which the runner
turns into a reschedule rather than a retry. Training is reproducible across such interruptions:
each epoch's order and each image's augmentation are drawn from generators seeded by
``(seed, epoch, index)``, not from history, so with ``--deterministic`` a resumed run ends with the
same weights as an uninterrupted one. When training finishes, the checkpoint files of the DAG's runs
that finished at least ``--checkpoint-retention-days`` ago are deleted (with 0, this run's at
once); each run's small manifest stays, so a retry of a finished run still returns its result.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import embedder
from embedder import checkpoint, data, images, model, stage, tracking
from retrain_contract import params
from retrain_contract.results import TrainResult

log = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "train_accuracy", "images_per_sec", "epoch_seconds", "learning_rate", "val_accuracy")
STEP_METRICS = ("batch_loss",)
# Arguments that change what is trained; a checkpoint saved under other values is not resumed.
CONFIG_ARGS = ("architecture", "image_size", "epochs", "batch_size", "learning_rate", "weight_decay", "augment",
               "pretrained_weights", "seed", "amp")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.train", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest-uri", required=True, help="manifest written by prepare_data")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    for spec in params.TRAINING:  # the run Params: same defaults and bounds as the DAG's
        spec.add_argument(parser)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--augment", default="crop", choices=images.AUGMENTATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="mixed precision with a gradient scaler (auto: on for CUDA, off on the CPU)")
    parser.add_argument("--num-workers", type=int, default=-1, help="data loader workers (-1: from the CPU budget)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower; for reproducible runs)")
    group = parser.add_argument_group("checkpoints and resume")
    group.add_argument("--checkpoint-root", default="",
                       help="storage prefix for checkpoints; this run's are under <root>/<airflow dag id>/<airflow run id>")
    group.add_argument("--checkpoint-uri", default="", help="this run's checkpoint location (overrides --checkpoint-root)")
    group.add_argument("--checkpoint-every-steps", type=int, default=500,
                       help="save every N optimizer steps, besides every epoch end (0: epoch ends only)")
    group.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept, besides the best one")
    group.add_argument("--checkpoint-retention-days", type=float, default=7.0,
                       help="when training finishes, delete the checkpoint files of this DAG's runs that finished at "
                            "least this many days ago, keeping their manifests (0: this run's at once too; inf: never)")
    group.add_argument("--max-preemptions", type=int, default=20,
                       help="after this many SIGTERM stops the run fails like any other error")
    group.add_argument("--log-every-steps", type=int, default=10, help="log the batch loss to MLflow every N steps")
    group.add_argument("--progress-every-steps", type=int, default=50,
                       help="log progress within an epoch every N steps, or every --progress-every-s, whichever comes first")
    group.add_argument("--progress-every-s", type=float, default=30.0, help="see --progress-every-steps")
    return stage.add_common_arguments(parser)


def validate_args(args: argparse.Namespace) -> None:
    """The flags that are not run Params (those are checked by their specs as they are parsed)."""
    for name, minimum in (("checkpoint_every_steps", 0), ("keep_checkpoints", 1), ("log_every_steps", 1),
                          ("max_preemptions", 0), ("progress_every_steps", 1), ("progress_every_s", 0)):
        if getattr(args, name) < minimum:
            raise stage.StageInputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(args, name)}")
    if math.isnan(args.checkpoint_retention_days) or args.checkpoint_retention_days < 0:
        raise stage.StageInputError(f"--checkpoint-retention-days must be at least 0, got {args.checkpoint_retention_days}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise stage.StageInputError("--device cuda, but no CUDA device is visible (check the GPU request and driver)")


def config_fingerprint(args: argparse.Namespace, classes: list[str]) -> str:
    config = {name: getattr(args, name) for name in CONFIG_ARGS} | {"classes": classes}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# -- data: an order and augmentations that do not depend on history ----------------------------


def _mix(*values: int) -> int:
    h = 0
    for v in values:
        h = (h * 1_000_003 + v) % (2**63 - 1)
    return h


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys: epoch ``e``'s order comes from a generator seeded by
    ``(seed, e)``, so it is the same whether or not training was interrupted before it, and
    ``set_epoch(e, start_batch)`` resumes in the middle of it."""

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool):
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [(self.epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


class SeededDataset(Dataset):
    """Looks up ``(epoch, index)`` keys; each sample's random augmentation is seeded by ``(seed, epoch, index)``."""

    def __init__(self, base: data.ManifestDataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        # Torchvision's random transforms draw from the default CPU generator: seed it for this
        # sample and put its state back after (cheaper than torch.random.fork_rng by ~50x).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(_mix(self.seed, epoch, index))
        try:
            return self.base[index]
        finally:
            generator.set_state(saved)


def _worker_init(_worker_id: int) -> None:
    # SIGTERM goes to the trainer, which stops the workers itself after saving a checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    budget = model.cpu_budget()
    return 0 if budget <= 2 else min(8, budget - 1)


def make_loaders(manifest: data.Manifest, class_to_idx: dict[str, int], args: argparse.Namespace,
                 pin_memory: bool = False):
    workers = loader_workers(args.num_workers)
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin_memory,
              "worker_init_fn": _worker_init if workers else None}
    train_set = data.ManifestDataset(manifest, "train", class_to_idx, images.train_transform(args.image_size, args.augment))
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, drop_last=len(train_set) > args.batch_size)
    train_loader = DataLoader(SeededDataset(train_set, args.seed), batch_sampler=sampler, **common)
    val_set = data.ManifestDataset(manifest, "val", class_to_idx, images.eval_transform(args.image_size))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, **common) if len(val_set) else None
    return train_loader, val_loader


# -- the training state ------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch in progress
    global_step: int = 0
    loss_sum: float = 0.0  # over the epoch in progress
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = self.seen = self.correct = 0
        self.loss_sum = self.seconds = 0.0


class EpochMeter:
    """The epoch's loss and correct counts: summed on the device, copied into ``progress`` by ``sync``.

    Keeping the sums on the device avoids a GPU sync per step; ``sync`` (at checkpoints and the
    epoch end) also adds the time since the last sync to ``progress.seconds``.
    """

    def __init__(self, progress: Progress, device: torch.device):
        self.progress = progress
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.loss_before, self.correct_before = progress.loss_sum, progress.correct
        self.mark = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        self.loss_sum += loss_sum
        self.correct += correct

    def sync(self) -> None:
        self.progress.loss_sum = self.loss_before + self.loss_sum.item()
        self.progress.correct = self.correct_before + int(self.correct.item())
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


class Trainer:
    """The model, optimizer, LR schedule and gradient scaler, and one optimizer step."""

    def __init__(self, net: model.Classifier, args: argparse.Namespace, device: torch.device):
        self.net = net.to(device)
        self.device = device
        self.amp = (device.type == "cuda" and args.amp == "auto") or args.amp == "on"
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (the net in train mode); returns the batch's summed loss and correct count (on the device)."""
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.net(inputs)
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
def accuracy(net: model.Classifier, loader: DataLoader, device: torch.device | None = None) -> float:
    net.eval()
    correct = seen = 0
    for inputs, targets in loader:
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        correct += (net(inputs).argmax(1) == targets).sum().item()
        seen += len(targets)
    return correct / seen if seen else float("nan")


class ProgressLog:
    """Logs where training is within an epoch: every ``every_steps`` steps or ``every_s`` seconds, whichever first.

    A line says the epoch and step, the share done, images/s since the last line, the batch loss
    and the estimated time to the end of training (from the pace since this process started).
    """

    def __init__(self, every_steps: int, every_s: float, epochs: int, per_epoch: int, clock=time.monotonic):
        self.every_steps, self.every_s = every_steps, every_s
        self.epochs, self.per_epoch = epochs, per_epoch
        self.clock = clock
        self.started = self.last_time = clock()
        self.first_step: int | None = None
        self.last_step = 0
        self.images = 0

    def step(self, progress: Progress, images: int, loss_sum: torch.Tensor | float) -> str | None:
        """Count one step of ``images`` with summed loss ``loss_sum``; returns (and logs) the line when one is due.

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
                f"{self.images / max(now - self.last_time, 1e-9):.1f} images/s, loss {float(loss_sum) / images:.4f}, "
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


# -- the loop ----------------------------------------------------------------------------------


def fit(trainer: Trainer, progress: Progress, args: argparse.Namespace, train_loader: DataLoader,
        val_loader: DataLoader | None, metrics: MetricLog | None, saver: checkpoint.AsyncCheckpointer | None,
        stop: StopSignal, base_state: dict[str, Any]) -> dict[str, float]:
    """Train from ``progress`` to ``args.epochs``; returns the last epoch's metrics."""
    sampler: EpochBatchSampler = train_loader.batch_sampler
    per_epoch = sampler.batches_per_epoch
    last: dict[str, float] = {}
    reporter = ProgressLog(args.progress_every_steps, args.progress_every_s, args.epochs, per_epoch)

    def save(wait: bool = False, metric: float | None = None) -> None:
        if metrics:
            metrics.flush()
        if saver is None:
            return
        state = {**base_state, **trainer.state_dict(), "progress": asdict(progress), "rng": checkpoint.rng_state()}
        saver.save(state, wait=wait, global_step=progress.global_step, epoch=progress.epoch, batch=progress.batch,
                   metric=metric)

    for epoch in range(progress.epoch, args.epochs):
        sampler.set_epoch(epoch, progress.batch)
        trainer.net.train()  # validation at the end of the previous epoch left it in eval mode
        meter = EpochMeter(progress, trainer.device)
        for inputs, targets in train_loader:
            batch_loss, batch_correct = trainer.step(inputs, targets)
            meter.add(batch_loss, batch_correct)
            progress.batch += 1
            progress.global_step += 1
            progress.seen += len(targets)
            if metrics and progress.global_step % args.log_every_steps == 0:
                metrics.add({"batch_loss": batch_loss.item() / len(targets)}, progress.global_step)
            reporter.step(progress, len(targets), batch_loss)
            if stop.requested:
                meter.sync()
                if saver is None:
                    raise stage.StagePreempted("SIGTERM and no checkpoint location; the retry starts over")
                save(wait=True)
                raise stage.StagePreempted(
                    f"SIGTERM at epoch {epoch + 1}, step {progress.global_step}; checkpoint saved "
                    f"{time.monotonic() - stop.requested_at:.1f} s after the signal")
            if args.checkpoint_every_steps and progress.global_step % args.checkpoint_every_steps == 0 \
                    and progress.batch < per_epoch:
                meter.sync()
                save()
        meter.sync()
        learning_rate = trainer.scheduler.get_last_lr()[0]  # the rate this epoch trained with
        trainer.scheduler.step()  # the next epoch's
        last = epoch_metrics(progress, learning_rate, trainer, val_loader)
        log.info("epoch %d/%d: %s", epoch + 1, args.epochs, ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
        if metrics:
            metrics.add(last, epoch + 1)
        progress.next_epoch()
        # The best checkpoint is the one with the best validation accuracy (lowest loss without one).
        save(wait=epoch + 1 == args.epochs or stop.requested, metric=last.get("val_accuracy", -last["train_loss"]))
        if stop.requested:
            raise stage.StagePreempted(f"SIGTERM during epoch {epoch + 1}; its end-of-epoch checkpoint is saved")
    return last


def epoch_metrics(progress: Progress, learning_rate: float, trainer: Trainer,
                  val_loader: DataLoader | None) -> dict[str, float]:
    """The metrics of the epoch ``progress`` has just completed (validation accuracy when there is a ``val`` split)."""
    seen = progress.seen
    stats = EpochStats(progress.loss_sum / seen, progress.correct / seen, seen, progress.seconds)
    metrics = {"train_loss": stats.loss, "train_accuracy": stats.accuracy, "images_per_sec": stats.images_per_sec,
               "epoch_seconds": stats.seconds, "learning_rate": learning_rate}
    if val_loader is not None:
        metrics["val_accuracy"] = accuracy(trainer.net, val_loader, trainer.device)
    return metrics


def signature(image_size: int, dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), "embeddings")]),
    )


def log_model(net: model.Classifier, classes: list[str], dataset_version: str, args: argparse.Namespace):
    """Log the head-less embedder in pt2 format (no pickle), the head as an extra file."""
    net.eval()
    dim = net.embedder.embedding_dim
    with tempfile.TemporaryDirectory(prefix="embedder-head-") as tmp:
        return mlflow.pytorch.log_model(
            net.embedder,
            name="model",
            serialization_format="pt2",
            input_example=torch.zeros(2, 3, args.image_size, args.image_size),
            signature=signature(args.image_size, dim),
            extra_files=[str(model.head_file(net, Path(tmp), classes))],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"embedder=={embedder.__version__}"],
            metadata={"architecture": args.architecture, "image_size": args.image_size,
                      "embedding_dim": dim, "classes": classes, "dataset_version": dataset_version},
        )


# -- the stage: where training starts, the MLflow run, the loop and the export ------------------


def configure_torch(args: argparse.Namespace) -> torch.device:
    """Seed, threads and determinism as the flags say; returns the device to train on."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or model.cpu_budget())
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def checkpoint_location(args: argparse.Namespace) -> str | None:
    if args.checkpoint_uri:
        return args.checkpoint_uri
    if args.checkpoint_root and args.airflow_run_id:
        return checkpoint.run_location(args.checkpoint_root, args.airflow_dag_id or "no-dag", args.airflow_run_id)
    if args.checkpoint_root:
        log.warning("--checkpoint-root without --airflow-run-id: no run to key checkpoints by, so none are saved")
    return None


@dataclass
class Start:
    """Where this attempt of the run starts training (see :func:`training_start`)."""

    dataset_version: str
    config: str  # the training configuration's fingerprint
    location: str | None = None  # this run's checkpoint location
    store: checkpoint.CheckpointStore | None = None
    restored: checkpoint.Restored | None = None  # the checkpoint to resume from; None: from the beginning
    mlflow_run_id: str | None = None  # the MLflow run the saved manifest names
    finished: TrainResult | None = None  # the result, when this run's training already finished
    resuming: bool = False  # continuing mlflow_run_id (set when the run is opened, see training_run)


def training_start(args: argparse.Namespace, dataset_version: str, config: str) -> Start:
    """Where training starts: this run's newest usable checkpoint, or the beginning.

    The saved manifest counts only when it is for this data and configuration. When it holds the
    finished result, that is returned (``finished``) and nothing is loaded; when the run was
    preempted more than ``--max-preemptions`` times, this raises so the run fails like any error.
    """
    start = Start(dataset_version, config, location=checkpoint_location(args))
    if start.location is None:
        return start
    start.store = store = checkpoint.CheckpointStore(start.location, keep_last=args.keep_checkpoints)
    saved = store.read_manifest()
    saved = saved if saved and saved.matches(dataset_version, config) else None
    if saved and saved.completed:
        log.info("training for this run already finished (%s); returning its result", saved.completed.get("model_uri"))
        start.finished = TrainResult.from_json(saved.completed)
        return start
    if saved and saved.preemptions > args.max_preemptions:
        raise RuntimeError(f"this run was preempted {saved.preemptions} times (limit --max-preemptions "
                           f"{args.max_preemptions}); failing so it is retried or looked at")
    start.restored = store.restore(dataset_version, config)
    start.mlflow_run_id = saved.mlflow_run_id if saved else None
    return start


def build_model(args: argparse.Namespace, num_classes: int) -> model.Classifier:
    try:
        return model.build(args.architecture, num_classes, args.pretrained_weights or None)
    except ValueError as exc:
        raise stage.StageInputError(str(exc)) from None


def run_params(args: argparse.Namespace, trainer: Trainer, train_loader: DataLoader, num_classes: int,
               start: Start) -> dict[str, Any]:
    """What a new MLflow run records as its parameters."""
    return {
        "architecture": args.architecture, "image_size": args.image_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
        "augment": args.augment, "seed": args.seed, "pretrained_weights": args.pretrained_weights or "none",
        "num_classes": num_classes, "train_images": len(train_loader.dataset),
        "num_workers": train_loader.num_workers, "threads": torch.get_num_threads(), "device": trainer.device.type,
        "amp": trainer.amp, "checkpoint_every_steps": args.checkpoint_every_steps,
        "checkpoint_location": start.location or "none",
    }


def _usable_run(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


@contextlib.contextmanager
def training_run(args: argparse.Namespace, start: Start, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run to train in: the saved manifest's run when it still exists (a resume), else a new one.

    Sets ``start.resuming``. A new run gets the dataset input and ``params``; one continued already
    has them. When the saved run is gone, its checkpoint is not resumed either. The run's id goes
    into the checkpoint manifest.
    """
    start.resuming = _usable_run(start.mlflow_run_id)
    if start.mlflow_run_id and not start.resuming:
        log.warning("MLflow run %s of the saved checkpoints is gone; starting a new run", start.mlflow_run_id)
        start.restored = None
    tags = {**stage.airflow_tags(args), "stage": "train", "dataset_version": start.dataset_version,
            "code_version": tracking.code_version(), "image": tracking.image_ref()}
    with mlflow.start_run(run_id=start.mlflow_run_id if start.resuming else None,
                          run_name=f"train {args.airflow_run_id or start.dataset_version}", tags=tags) as run:
        if not start.resuming:
            mlflow.log_input(tracking.dataset_input(args.manifest_uri, start.dataset_version), context="training")
            mlflow.log_params(params)
        if start.store:
            start.store.begin(start.dataset_version, start.config, run.info.run_id)
        yield run


def restored_progress(trainer: Trainer, start: Start) -> Progress:
    """Where training stands: the restored checkpoint's progress (its state loaded into ``trainer`` and
    the RNGs, the run tagged ``resume.*``), or the beginning."""
    restored, store = start.restored, start.store
    if restored is None:
        if start.resuming:
            log.info("continuing MLflow run %s from the beginning (no usable checkpoint)", start.mlflow_run_id)
        return Progress()
    trainer.load_state_dict(restored.state)
    progress = Progress(**restored.state["progress"])
    checkpoint.set_rng_state(restored.state["rng"])
    resumes = store.update(lambda m: setattr(m, "resumes", m.resumes + 1)).resumes
    where = f"epoch {progress.epoch + 1}, batch {progress.batch}, global step {progress.global_step}"
    log.info("resuming from %s (%s); resume #%d", store.uri_of(restored.record.name), where, resumes)
    mlflow.set_tags({"resume.count": resumes, "resume.from_checkpoint": restored.record.name,
                     "resume.from_step": progress.global_step, "resume.skipped": "; ".join(restored.skipped) or "none"})
    return progress


def train_and_export(args: argparse.Namespace, trainer: Trainer, progress: Progress, train_loader: DataLoader,
                     val_loader: DataLoader | None, run: mlflow.ActiveRun, start: Start,
                     classes: list[str]) -> TrainResult:
    """Train from ``progress`` to the last epoch and log the model; returns the stage's result.

    On SIGTERM (raised as :class:`stage.StagePreempted`) the preemption is counted in the
    manifest and the run is marked ``KILLED`` before the exception propagates.
    """
    store = start.store
    metrics = MetricLog(run.info.run_id, EPOCH_METRICS + STEP_METRICS, resumed=start.resuming)
    saver = checkpoint.AsyncCheckpointer(store) if store else None
    base_state = {"format": checkpoint.FORMAT, "dataset_version": start.dataset_version, "config": start.config,
                  "mlflow_run_id": run.info.run_id}
    try:
        with StopSignal() as stop:
            try:
                last = fit(trainer, progress, args, train_loader, val_loader, metrics, saver, stop, base_state)
            finally:
                if saver:
                    saver.flush()
                metrics.flush()
            stop.immediate = True
            if stop.requested:
                raise stage.StagePreempted("SIGTERM after the last checkpoint; the retry resumes from it")
            if not last:  # resumed after the last epoch: nothing left but the export
                last = {k: v for k, v in mlflow.get_run(run.info.run_id).data.metrics.items() if k in EPOCH_METRICS}
            if metrics.dropped:
                log.info("%d metric values were already in the run and not logged again", metrics.dropped)
            if saver:
                mlflow.log_metrics({"checkpoint_blocking_seconds": saver.blocking_seconds,
                                    "checkpoint_write_seconds": saver.write_seconds}, step=progress.global_step)
            info = log_model(trainer.net.cpu(), classes, start.dataset_version, args)
    except stage.StagePreempted:
        if store:
            store.update(lambda m: setattr(m, "preemptions", m.preemptions + 1))
        mlflow.set_tag("preempted", "true")
        mlflow.end_run(status="KILLED")
        raise
    return TrainResult(
        mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id, model_uri=info.model_uri,
        dataset_version=start.dataset_version, architecture=args.architecture, image_size=args.image_size,
        embedding_dim=trainer.net.embedder.embedding_dim, final_train_loss=last.get("train_loss"),
        final_val_accuracy=last.get("val_accuracy"), images_per_sec=last.get("images_per_sec"),
        resumed=bool(start.restored))


def apply_checkpoint_retention(args: argparse.Namespace, store: checkpoint.CheckpointStore) -> None:
    """Delete checkpoint files of finished runs as ``--checkpoint-retention-days`` says, manifests kept.

    With 0 days this run's go at once; with N, those of every run of this DAG under
    ``--checkpoint-root`` (this one included) that finished at least N days ago. Runs that have not
    finished are never touched. Housekeeping after the result is recorded: a failure is logged, not raised.
    """
    days = args.checkpoint_retention_days
    if math.isinf(days):
        return
    try:
        if days == 0:
            deleted = store.delete_checkpoints()
            log.info("checkpoint retention (0 days): deleted this run's %s; %s keeps its result",
                     ", ".join(deleted) or "checkpoints (none left)", store.uri_of(checkpoint.MANIFEST))
        if args.checkpoint_root and args.airflow_run_id and not args.checkpoint_uri:
            runs = checkpoint.dag_location(args.checkpoint_root, args.airflow_dag_id or "no-dag")
            cleaned = checkpoint.delete_expired_checkpoints(runs, older_than=timedelta(days=days))
            log.info("checkpoint retention (%g days): deleted the checkpoint files of %d finished run(s) under %s",
                     days, len(cleaned), runs)
    except Exception as exc:  # the model is logged: never fail the stage for housekeeping
        log.warning("checkpoint retention failed (%s: %s); a later run's pass deletes what is left",
                    type(exc).__name__, exc)


def main(args: argparse.Namespace) -> TrainResult:
    validate_args(args)
    device = configure_torch(args)
    manifest = data.read_manifest(args.manifest_uri)
    classes = manifest.classes
    start = training_start(args, manifest.dataset_version, config_fingerprint(args, classes))
    if start.finished:
        return start.finished

    net = build_model(args, len(classes))
    train_loader, val_loader = make_loaders(manifest, {c: i for i, c in enumerate(classes)}, args,
                                            pin_memory=device.type == "cuda")
    trainer = Trainer(net, args, device)
    tracking.use_experiment(args.experiment)
    with training_run(args, start, run_params(args, trainer, train_loader, len(classes), start)) as run:
        progress = restored_progress(trainer, start)
        result = train_and_export(args, trainer, progress, train_loader, val_loader, run, start, classes)
        if start.store:
            start.store.complete(result.to_json())
    if start.store:
        apply_checkpoint_retention(args, start.store)
    return result


if __name__ == "__main__":
    sys.exit(stage.run_stage(get_args_parser(), main))
