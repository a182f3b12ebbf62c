"""Stage ``train``: fine-tune a torchvision ResNet as a classifier and log the embedder to MLflow.

Trains on the manifest's ``train`` split (validation accuracy on ``val`` when present), logs
params, per-epoch metrics (loss, accuracy, images/s) and the model (PyTorch flavor, with a
signature) whose forward drops the head and returns L2-normalised embeddings. The run is tagged
with the Airflow DAG/run, the dataset version, the code version and the image.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn
from torch.utils.data import DataLoader

import embedder
from embedder import contract, data, images, model, tracking

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.train", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest-uri", required=True, help="manifest written by prepare_data")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--architecture", default="resnet50", choices=sorted(model.ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=224, help="images are resized to this square side")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--augment", default="crop", choices=images.AUGMENTATIONS)
    parser.add_argument("--pretrained-weights", default="", help="optional torchvision state dict (file:// or s3://)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=-1, help="data loader workers (-1: from the CPU budget)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower; for reproducible runs)")
    return contract.add_common_arguments(parser)


def validate_args(args: argparse.Namespace) -> None:
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("image_size", 32)):
        if getattr(args, name) < minimum:
            raise contract.StageInputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise contract.StageInputError(f"--learning-rate must be positive, got {args.learning_rate}")


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def train_one_epoch(net: model.Classifier, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: DataLoader) -> EpochStats:
    net.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for inputs, targets in loader:
        logits = net(inputs)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return EpochStats(total_loss / seen, correct / seen, seen, time.perf_counter() - start)


@torch.inference_mode()
def accuracy(net: model.Classifier, loader: DataLoader) -> float:
    net.eval()
    correct = seen = 0
    for inputs, targets in loader:
        correct += (net(inputs).argmax(1) == targets).sum().item()
        seen += len(targets)
    return correct / seen if seen else float("nan")


def loader_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    budget = model.cpu_budget()
    return 0 if budget <= 2 else min(8, budget - 1)


def make_loaders(manifest: data.Manifest, class_to_idx: dict[str, int], args: argparse.Namespace):
    workers = loader_workers(args.num_workers)
    gen = torch.Generator().manual_seed(args.seed)
    common = {"batch_size": args.batch_size, "num_workers": workers, "persistent_workers": workers > 0}
    train_set = data.ManifestDataset(manifest, "train", class_to_idx, images.train_transform(args.image_size, args.augment))
    train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, generator=gen, **common)
    val_set = data.ManifestDataset(manifest, "val", class_to_idx, images.eval_transform(args.image_size))
    val_loader = DataLoader(val_set, shuffle=False, **common) if len(val_set) else None
    return train_loader, val_loader


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


def main(args: argparse.Namespace) -> dict[str, Any]:
    validate_args(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or model.cpu_budget())
    if args.deterministic:
        torch.use_deterministic_algorithms(True)

    manifest = data.read_manifest(args.manifest_uri)
    version = manifest.dataset_version
    classes = manifest.classes
    class_to_idx = {c: i for i, c in enumerate(classes)}
    try:
        net = model.build(args.architecture, len(classes), args.pretrained_weights or None)
    except ValueError as exc:
        raise contract.StageInputError(str(exc)) from None
    train_loader, val_loader = make_loaders(manifest, class_to_idx, args)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    criterion = nn.CrossEntropyLoss()

    tags = {**contract.airflow_tags(args), "stage": "train", "dataset_version": version,
            "code_version": tracking.code_version(), "image": tracking.image_ref()}
    tracking.use_experiment(args.experiment)
    with mlflow.start_run(run_name=f"train {args.airflow_run_id or version}", tags=tags) as run:
        mlflow.log_input(tracking.dataset_input(args.manifest_uri, version), context="training")
        mlflow.log_params({
            "architecture": args.architecture, "image_size": args.image_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
            "augment": args.augment, "seed": args.seed, "pretrained_weights": args.pretrained_weights or "none",
            "num_classes": len(classes), "train_images": len(train_loader.dataset),
            "num_workers": train_loader.num_workers, "threads": torch.get_num_threads(),
        })
        stats = None
        for epoch in range(args.epochs):
            stats = train_one_epoch(net, criterion, optimizer, train_loader)
            scheduler.step()
            metrics = {"train_loss": stats.loss, "train_accuracy": stats.accuracy,
                       "images_per_sec": stats.images_per_sec, "epoch_seconds": stats.seconds,
                       "learning_rate": scheduler.get_last_lr()[0]}
            if val_loader is not None:
                metrics["val_accuracy"] = accuracy(net, val_loader)
            mlflow.log_metrics(metrics, step=epoch + 1)
            log.info("epoch %d/%d: %s", epoch + 1, args.epochs, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

        info = log_model(net, classes, version, args)
    return {
        "mlflow_run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "dataset_version": version,
        "architecture": args.architecture,
        "image_size": args.image_size,
        "embedding_dim": net.embedder.embedding_dim,
        "final_train_loss": stats.loss,
        "final_val_accuracy": metrics.get("val_accuracy"),
        "images_per_sec": stats.images_per_sec,
    }


if __name__ == "__main__":
    sys.exit(contract.run_stage(get_args_parser(), main))
