"""Benchmarks of the train stage, each measured side by side in one run.

1. Throughput: the stage's images/s against a bare PyTorch loop (target: ratio >= 0.9).
2. Checkpoints: the stage's training loop with checkpoints against the same loop without, giving
   the cost of one checkpoint and its share of training time at the default interval (target: at
   most 2%), and the time from a resume's start to its first training step.

The stage side is the stage's own code path: its DataLoader over the manifest (reading and
decoding every file, augmenting) and its training loop, ``loop.fit``. The bare side trains the same
architecture with the same optimizer and batch size on tensors decoded once up front, which is
as fast as that model can go on this machine. Epochs alternate (stage, bare, stage, ...) after
a warm-up so both see the same machine state; the medians are compared.

The checkpoint side runs the stage's own ``fit`` loop (sampler, per-sample seeded augmentation,
on-device sums) for the same epochs with and without a checkpoint writer, alternating, and saves
at a short interval so that a run holds several checkpoints. The cost of one checkpoint is the
wall-clock difference divided by the number saved (it includes the writer thread competing for
the CPU, not only the time the loop blocks); the share at the default interval is that cost over
``--checkpoint-every-steps`` (default) steps of training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

from embedder import checkpoint, checkpoint_writer, data, demo_data, images, loaders, loop, model, train


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


def throughput(args: argparse.Namespace, tmp: str, manifest: data.Manifest) -> float:
    classes = manifest.classes
    class_to_idx = {c: i for i, c in enumerate(classes)}
    stage_args = train.get_args_parser().parse_args([
        "--manifest-uri", "unused", "--experiment", "unused", "--architecture", args.architecture,
        "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device", "cpu", "--amp", "off"])
    loader, _ = loaders.make_loaders(manifest, class_to_idx, stage_args)
    transform = images.train_transform(args.image_size, stage_args.augment)
    dataset = data.ManifestDataset(manifest, "train", class_to_idx, transform)
    samples = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([s[0] for s in samples])
    y = torch.tensor([s[1] for s in samples])

    criterion = nn.CrossEntropyLoss()
    trainer = loop.Trainer(model.build(args.architecture, len(classes)), stage_args, torch.device("cpu"))
    bare_net = model.build(args.architecture, len(classes))
    bare_opt = torch.optim.AdamW(bare_net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    results: dict[str, list[float]] = {"stage": [], "bare": []}
    for round_ in range(args.rounds + 1):  # round 0 warms both up and is not counted
        # One epoch of the stage's own loop (sampler, seeded augmentation, AMP-aware step), no checkpoints.
        stage_args.epochs = round_ + 1
        with loop.StopSignal() as stop:
            stage = loop.fit(trainer, loop.Progress(epoch=round_), stage_args, loader, None, None, None, stop,
                              {})["images_per_sec"]
        bare = bare_epoch(bare_net, bare_opt, criterion, x, y, args.batch_size, gen)
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
    return ratio


def checkpoints(args: argparse.Namespace, tmp: str, manifest: data.Manifest) -> float:
    classes = manifest.classes
    class_to_idx = {c: i for i, c in enumerate(classes)}
    default_interval = train.get_args_parser().get_default("checkpoint_every_steps")
    stage_args = train.get_args_parser().parse_args([
        "--manifest-uri", "unused", "--experiment", "unused", "--architecture", args.architecture,
        "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--checkpoint-every-steps", str(args.checkpoint_interval), "--device", "cpu", "--amp", "off"])
    loader, _ = loaders.make_loaders(manifest, class_to_idx, stage_args)
    cpu = torch.device("cpu")
    base_state = {"format": checkpoint.FORMAT, "dataset_version": manifest.dataset_version, "config": "bench"}

    def run(with_checkpoints: bool, round_: int) -> tuple[float, int, checkpoint_writer.AsyncCheckpointer | None]:
        trainer = loop.Trainer(model.build(args.architecture, len(classes)), stage_args, cpu)
        saver = None
        if with_checkpoints:
            store = checkpoint.CheckpointStore(os.path.join(tmp, f"ckpt-{round_}"), keep_last=2)
            store.begin(manifest.dataset_version, "bench", "bench")
            saver = checkpoint_writer.AsyncCheckpointer(store)
        progress = loop.Progress()
        with loop.StopSignal() as stop:
            start = time.perf_counter()
            loop.fit(trainer, progress, stage_args, loader, None, None, saver, stop, base_state)
            if saver:
                saver.flush()
            seconds = time.perf_counter() - start
        return seconds, progress.global_step, saver

    timings: dict[bool, list[float]] = {False: [], True: []}
    saved, blocking, last_saver = [], [], None
    for round_ in range(args.checkpoint_rounds):
        for side in (False, True):
            seconds, steps, saver = run(side, round_)
            timings[side].append(seconds)
            if saver:
                saved.append(len(saver.saved))
                blocking.append(saver.blocking_seconds)
                last_saver = saver
            print(f"  round {round_}: {'with' if side else 'without'} checkpoints: {seconds:6.2f} s for {steps} steps"
                  + (f", {len(saver.saved)} checkpoints, loop blocked {saver.blocking_seconds:.2f} s" if saver else ""),
                  flush=True)
    without, with_ = statistics.median(timings[False]), statistics.median(timings[True])
    n = statistics.median(saved)
    step_s = without / steps
    per_ckpt = max(with_ - without, 0.0) / n
    per_ckpt_blocking = statistics.median(blocking) / n
    share = per_ckpt / (default_interval * step_s + per_ckpt)
    size = last_saver.saved[-1].bytes / 1e6

    # Resume: read, verify and load the newest checkpoint, restore the state, take one step.
    store = last_saver.store
    start = time.perf_counter()
    restored = checkpoint.CheckpointStore(store.uri).restore(manifest.dataset_version, "bench")
    loaded = time.perf_counter()
    trainer = loop.Trainer(model.build(args.architecture, len(classes)), stage_args, cpu)
    trainer.load_state_dict(restored.state)
    checkpoint_writer.set_rng_state(restored.state["rng"])
    progress = loop.Progress(**restored.state["progress"])
    loader.batch_sampler.set_epoch(progress.epoch % args.epochs, progress.samples)
    inputs, targets, _ = next(iter(loader))
    trainer.step(inputs, targets)
    first_step = time.perf_counter()

    print(f"\ncheckpoints: {args.architecture} @ {args.image_size}px, batch {args.batch_size}, {size:.0f} MB each, "
          f"local disk, medians of {args.checkpoint_rounds}")
    print(f"training step (no checkpoints):      {step_s * 1000:8.1f} ms")
    print(f"one checkpoint, wall-clock cost:     {per_ckpt * 1000:8.1f} ms   (loop blocked {per_ckpt_blocking * 1000:.1f} ms"
          f" of it; {n:.0f} per run at every {args.checkpoint_interval} steps + epoch ends)")
    print(f"measured overhead at this interval:  {(with_ / without - 1) * 100:8.2f} %")
    print(f"share at the default interval ({default_interval} steps): {share * 100:.2f} %   "
          f"(target <= 2%: {'met' if share <= 0.02 else 'NOT met'})")
    print(f"resume to first step:                {(first_step - start):8.2f} s   "
          f"(read + sha256 + load {loaded - start:.2f} s, restore + first step {first_step - loaded:.2f} s)")
    return share


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet50", choices=sorted(model.ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured epochs per side (throughput)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per side and round (checkpoints)")
    parser.add_argument("--checkpoint-interval", type=int, default=10, help="steps between checkpoints while measuring")
    parser.add_argument("--checkpoint-rounds", type=int, default=2)
    parser.add_argument("--only", choices=("throughput", "checkpoints"), default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(model.cpu_budget())

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        demo_data.build(os.path.join(tmp, "data"))
        manifest = data.scan(os.path.join(tmp, "data"))
        if args.only in (None, "throughput"):
            throughput(args, tmp, manifest)
        if args.only in (None, "checkpoints"):
            checkpoints(args, tmp, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
