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

Several GPUs and nodes. Under torchrun (``python -m embedder.torchrun ... -m embedder.train``, see
:func:`retrain_contract.stages.command`) the stage runs as one process per GPU with
``DistributedDataParallel``: ``--batch-size`` is per process, so a step trains on ``--batch-size``
x processes images, exactly those one process with that batch size would (see
:class:`embedder.loaders.EpochBatchSampler`). Every rank restores from the same checkpoint; rank 0
alone logs to MLflow, saves checkpoints and writes the result, after the epoch's sums are added up
over the ranks. A SIGTERM stops every rank after the same step, rank 0 saves once, and every rank
exits with ``EXIT_PREEMPTED``.

(About 450 lines on purpose: the stage's flags and the steps of ``main`` read best in one file.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

import embedder
from embedder import checkpoint, checkpoint_writer, data, device_decode, distributed, images, loop, model, stage, tracking
from embedder.distributed import World
from embedder.loaders import make_loaders
from embedder.loop import EPOCH_METRICS, STEP_METRICS, MetricLog, Progress, SampleTrace, StopSignal, Trainer, fit
from retrain_contract import params
from retrain_contract.results import TrainResult

log = logging.getLogger(__name__)

# Arguments that change what is trained; a checkpoint saved under other values is not resumed.
CONFIG_ARGS = ("architecture", "image_size", "epochs", "batch_size", "learning_rate", "weight_decay", "augment",
               "pretrained_weights", "seed", "amp")


def get_args_parser() -> argparse.ArgumentParser:
    parser = stage.new_parser("embedder.train", __doc__)
    parser.add_argument("--manifest-uri", required=True, help="manifest written by prepare_data")
    for spec in params.TRAINING:  # the run Params: same defaults and bounds as the DAG's
        spec.add_argument(parser)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--augment", default="crop", choices=images.AUGMENTATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="mixed precision: bfloat16, or float16 with a gradient scaler on GPUs without bfloat16 "
                             "(auto: on for CUDA, off on the CPU)")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="channels_last memory format for the model and its inputs (auto: on for CUDA)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="train the torch.compile'd model (auto: on for CUDA, where it pays; off on the CPU)")
    parser.add_argument("--num-workers", type=int, default=-1,
                        help="data loader workers per process (-1: from the process's share of the CPU budget)")
    parser.add_argument("--decode-on", default="cpu", choices=device_decode.DECODE_ON,
                        help="where training JPEGs are decoded: cpu (the data loader workers) or device (the GPU, "
                             "nvJPEG; for when the workers cannot keep up, see make bench-gpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per process (0: the process's share of the CPU budget)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower; for reproducible runs)")
    parser.add_argument("--collective-timeout-s", type=float, default=600.0,
                        help="under torchrun: a collective (all-reduce, barrier) that waits longer than this for a rank "
                             "fails the stage instead of hanging it")
    parser.add_argument("--trace-samples", default="",
                        help="debugging: each rank appends the image indices of every step to <dir>/rank-<rank>.jsonl")
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
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """The flags that are not run Params (those are checked by their specs as they are parsed)."""
    for name, minimum in (("checkpoint_every_steps", 0), ("keep_checkpoints", 1), ("log_every_steps", 1),
                          ("max_preemptions", 0), ("progress_every_steps", 1), ("progress_every_s", 0)):
        if getattr(args, name) < minimum:
            raise stage.StageInputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(args, name)}")
    if not args.collective_timeout_s > 0:
        raise stage.StageInputError(f"--collective-timeout-s must be more than 0, got {args.collective_timeout_s}")
    if math.isnan(args.checkpoint_retention_days) or args.checkpoint_retention_days < 0:
        raise stage.StageInputError(f"--checkpoint-retention-days must be at least 0, got {args.checkpoint_retention_days}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise stage.StageInputError("--device cuda, but no CUDA device is visible (check the GPU request and driver)")


def config_fingerprint(args: argparse.Namespace, classes: list[str]) -> str:
    config = {name: getattr(args, name) for name in CONFIG_ARGS} | {"classes": classes}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


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


def device_type(args: argparse.Namespace) -> str:
    return "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"


def configure_torch(args: argparse.Namespace, world: World = distributed.SINGLE) -> torch.device:
    """Seed, threads and determinism as the flags say; returns the device to train on (this rank's GPU).

    The node's CPUs are shared among its training processes: each gets its share of threads.
    """
    device = torch.device("cuda", world.local_rank) if device_type(args) == "cuda" else torch.device("cpu")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or model.cpu_share(world.local_size))
    loop.configure_backends(device, deterministic=args.deterministic)
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


def where_training_starts(start: Start) -> tuple[str | None, str | None]:
    """What every rank must agree on before training: the finished result, or the checkpoint restored."""
    finished = start.finished.model_uri if start.finished else None
    return finished, start.restored.record.name if start.restored else None


def build_model(args: argparse.Namespace, num_classes: int) -> model.Classifier:
    try:
        return model.build(args.architecture, num_classes, args.pretrained_weights or None)
    except ValueError as exc:
        raise stage.StageInputError(str(exc)) from None


def run_params(args: argparse.Namespace, trainer: Trainer, train_loader: DataLoader, num_classes: int,
               start: Start) -> dict[str, Any]:
    """What a new MLflow run records as its parameters (``batch_size``, workers and threads are per process)."""
    return {
        "architecture": args.architecture, "image_size": args.image_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
        "augment": args.augment, "seed": args.seed, "pretrained_weights": args.pretrained_weights or "none",
        "num_classes": num_classes, "train_images": len(train_loader.dataset),
        "world_size": trainer.world.size, "global_batch_size": train_loader.batch_sampler.global_batch,
        "num_workers": train_loader.num_workers, "threads": torch.get_num_threads(), "device": trainer.device.type,
        "gpu": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "none",
        "amp": trainer.amp, "checkpoint_every_steps": args.checkpoint_every_steps,
        "amp_dtype": trainer.precision or "none",
        "channels_last": trainer.channels_last, "compile": trainer.compiled,
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


def restored_progress(args: argparse.Namespace, trainer: Trainer, start: Start, world: World) -> Progress:
    """Where training stands: the restored checkpoint's progress (its state loaded into ``trainer`` and
    the RNGs, on every rank; rank 0 tags the run ``resume.*``), or the beginning.

    The position in the epoch is in images of all ranks (``Progress.samples``), so a resume with the
    world size of the run that saved it continues exactly; with another world size it continues from
    the same image of the same epoch with the new global batch (see
    :class:`embedder.loaders.EpochBatchSampler`), and says so.
    """
    restored, store = start.restored, start.store
    if restored is None:
        if start.resuming:
            log.info("continuing MLflow run %s from the beginning (no usable checkpoint)", start.mlflow_run_id)
        return Progress()
    trainer.load_state_dict(restored.state)
    saved = restored.state["progress"]
    progress = Progress(**saved)
    if "samples" not in saved:  # saved before positions were counted in images, by one process
        progress.samples = progress.batch * args.batch_size
    checkpoint_writer.set_rng_state(restored.state["rng"])
    saved_world = restored.state.get("world_size", 1)
    if saved_world != world.size and progress.samples:
        log.warning("the checkpoint was saved by %d training processes, this run has %d: epoch %d continues from "
                    "image %d of its order in global batches of %d (%d per process); the run is not bit-identical "
                    "to one that kept its world size", saved_world, world.size, progress.epoch + 1, progress.samples,
                    args.batch_size * world.size, args.batch_size)
    if not world.is_main:
        return progress
    resumes = store.update(lambda m: setattr(m, "resumes", m.resumes + 1)).resumes
    where = f"epoch {progress.epoch + 1}, batch {progress.batch}, global step {progress.global_step}"
    log.info("resuming from %s (%s); resume #%d", store.uri_of(restored.record.name), where, resumes)
    mlflow.set_tags({"resume.count": resumes, "resume.from_checkpoint": restored.record.name,
                     "resume.from_step": progress.global_step, "resume.skipped": "; ".join(restored.skipped) or "none"})
    return progress


def train_and_export(args: argparse.Namespace, trainer: Trainer, progress: Progress, train_loader: DataLoader,
                     val_loader: DataLoader | None, run: mlflow.ActiveRun | None, start: Start,
                     classes: list[str], world: World) -> TrainResult | None:
    """Train from ``progress`` to the last epoch and log the model; returns the stage's result (None on ranks but 0).

    Every rank trains; rank 0 (the one with the MLflow ``run``) logs metrics, saves checkpoints and
    logs the model. On SIGTERM (raised as :class:`stage.StagePreempted`) rank 0 counts the
    preemption in the manifest and marks the run ``KILLED``; when the ranks stopped together, every
    rank waits for that before it exits.
    """
    store = start.store
    metrics = MetricLog(run.info.run_id, EPOCH_METRICS + STEP_METRICS, resumed=start.resuming) if run else None
    saver = checkpoint_writer.AsyncCheckpointer(store) if store else None
    base_state = {"format": checkpoint.FORMAT, "dataset_version": start.dataset_version, "config": start.config,
                  "mlflow_run_id": run.info.run_id if run else None, "world_size": world.size}
    trace = SampleTrace(args.trace_samples, world.rank) if args.trace_samples else None
    stop = StopSignal()
    try:
        with stop:
            try:
                last = fit(trainer, progress, args, train_loader, val_loader, metrics, saver, stop, base_state,
                           world, trace)
            finally:
                if saver:
                    saver.flush()
                if metrics:
                    metrics.flush()
            stop.immediate = True
            if stop.requested:
                raise stage.StagePreempted("SIGTERM after the last checkpoint; the retry resumes from it")
            if run is None:
                return None
            if not last:  # resumed after the last epoch: nothing left but the export
                last = {k: v for k, v in mlflow.get_run(run.info.run_id).data.metrics.items() if k in EPOCH_METRICS}
            if metrics.dropped:
                log.info("%d metric values were already in the run and not logged again", metrics.dropped)
            if saver:
                mlflow.log_metrics({"checkpoint_blocking_seconds": saver.blocking_seconds,
                                    "checkpoint_write_seconds": saver.write_seconds}, step=progress.global_step)
            info = log_model(trainer.net.cpu().to(memory_format=torch.contiguous_format), classes,
                             start.dataset_version, args)
    except stage.StagePreempted:
        if run is not None:
            if store:
                store.update(lambda m: setattr(m, "preemptions", m.preemptions + 1))
            mlflow.set_tag("preempted", "true")
            mlflow.end_run(status="KILLED")
        if stop.stopping:
            world.barrier()  # no rank exits (and has torchrun stop the others) before rank 0 has saved and recorded
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


def main(args: argparse.Namespace) -> TrainResult | None:
    validate_args(args)
    with distributed.initialized(device_type(args), args.collective_timeout_s) as world:
        return train(args, world)


def train(args: argparse.Namespace, world: World) -> TrainResult | None:
    """The stage on one rank: every rank trains, rank 0 alone talks to MLflow and returns the result."""
    device = configure_torch(args, world)
    manifest = data.read_manifest(args.manifest_uri)
    classes = manifest.classes
    start = training_start(args, manifest.dataset_version, config_fingerprint(args, classes))
    world.same(where_training_starts(start), "where training starts (finished result, checkpoint)")
    if start.finished:
        return start.finished if world.is_main else None

    net = build_model(args, len(classes))
    train_loader, val_loader = make_loaders(manifest, {c: i for i, c in enumerate(classes)}, args,
                                            cuda=device.type == "cuda", world=world)
    trainer = Trainer(net, args, device, world)
    if not world.is_main:
        if not world.broadcast(None):  # rank 0 found the checkpoint's MLflow run gone: start over, as it does
            start.restored = None
        progress = restored_progress(args, trainer, start, world)
        return train_and_export(args, trainer, progress, train_loader, val_loader, None, start, classes, world)
    tracking.use_experiment(args.experiment)
    with training_run(args, start, run_params(args, trainer, train_loader, len(classes), start)) as run:
        world.broadcast(start.restored is not None)
        progress = restored_progress(args, trainer, start, world)
        result = train_and_export(args, trainer, progress, train_loader, val_loader, run, start, classes, world)
        if start.store:
            start.store.complete(result.to_json())
    if start.store:
        apply_checkpoint_retention(args, start.store)
    return result


if __name__ == "__main__":
    sys.exit(record(stage.run_stage)(get_args_parser(), main))
