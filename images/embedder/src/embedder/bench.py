"""Benchmark: the train stage's images/s against a bare PyTorch loop, measured side by side.

The stage side is the stage's own code path: its DataLoader over the manifest (reading and
decoding every file, augmenting) and its ``train_one_epoch``. The bare side trains the same
architecture with the same optimizer and batch size on tensors decoded once up front, which is
as fast as that model can go on this machine. Epochs alternate (stage, bare, stage, ...) after
a warm-up so both see the same machine state; the medians are compared. Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

from embedder import data, demo_data, images, model, train


def bare_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor,
               y: torch.Tensor, batch_size: int, generator: torch.Generator) -> float:
    """One epoch over in-memory tensors; returns images per second."""
    net.train()
    order = torch.randperm(len(y), generator=generator)
    usable = len(y) - len(y) % batch_size
    start = time.perf_counter()
    for i in range(0, usable, batch_size):
        idx = order[i : i + batch_size]
        loss = criterion(net(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return usable / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet50", choices=sorted(model.ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured epochs per side")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(model.cpu_budget())

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        demo_data.build(tmp)
        manifest = data.scan(tmp)
        classes = manifest.classes
        class_to_idx = {c: i for i, c in enumerate(classes)}
        stage_args = train.get_args_parser().parse_args([
            "--manifest-uri", "unused", "--experiment", "unused", "--architecture", args.architecture,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)])
        loader, _ = train.make_loaders(manifest, class_to_idx, stage_args)
        transform = images.train_transform(args.image_size, stage_args.augment)
        dataset = data.ManifestDataset(manifest, "train", class_to_idx, transform)
        samples = [dataset[i] for i in range(len(dataset))]
        x = torch.stack([s[0] for s in samples])
        y = torch.tensor([s[1] for s in samples])

        criterion = nn.CrossEntropyLoss()
        nets = {side: model.build(args.architecture, len(classes)) for side in ("stage", "bare")}
        opts = {side: torch.optim.AdamW(net.parameters(), lr=1e-3) for side, net in nets.items()}
        gen = torch.Generator().manual_seed(0)
        results: dict[str, list[float]] = {"stage": [], "bare": []}
        for round_ in range(args.rounds + 1):  # round 0 warms both up and is not counted
            stage = train.train_one_epoch(nets["stage"], criterion, opts["stage"], loader).images_per_sec
            bare = bare_epoch(nets["bare"], opts["bare"], criterion, x, y, args.batch_size, gen)
            if round_:
                results["stage"].append(stage)
                results["bare"].append(bare)
            print(f"  round {round_}{' (warm-up)' if not round_ else ''}: stage {stage:7.1f} img/s   bare {bare:7.1f} img/s",
                  flush=True)

    stage, bare = statistics.median(results["stage"]), statistics.median(results["bare"])
    ratio = stage / bare
    print(f"\n{args.architecture} @ {args.image_size}px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{len(y)} training images, data loader workers {loader.num_workers}")
    print(f"train stage (DataLoader + decode + augment): {stage:8.1f} images/s (median of {args.rounds})")
    print(f"bare PyTorch loop (tensors in memory):       {bare:8.1f} images/s (median of {args.rounds})")
    print(f"ratio stage / bare: {ratio:.3f}   (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
