"""GPU benchmark of the train stage: the stage's images/s beside its compute bound and its input pipeline, in one run.

    make bench-gpu        (on a GPU machine: ResNet-50, 224 px, batch 256, from JPEG files it writes itself)

Three sides, measured in rounds (stage, bare, pipeline, stage, ...) after a warm-up round that is not
counted (it includes ``torch.compile``), medians compared:

- **train stage**: the stage's own DataLoader over a manifest of JPEG files (workers from the CPU
  budget decode and augment each image, seeded per image; pinned memory, persistent workers,
  prefetch) feeding its own loop (:func:`embedder.loop.fit`: :class:`embedder.loop.Trainer` with the
  stage's GPU defaults, bf16 autocast, ``channels_last``, ``torch.compile``, fused AdamW), one epoch
  a round, as the stage reports it (its ``images_per_sec``);
- **bare loop**: the same model, precision, memory format, compilation and optimizer in a plain
  PyTorch loop on one batch already on the GPU: the compute bound;
- **input pipeline alone**: the same DataLoader, each batch copied to the GPU (and decoded there with
  ``--decode-on device``), nothing trained.

It prints their images/s, each over the compute bound, and the model FLOP utilisation: images/s x
the model's training FLOPs per image (3 x the forward pass's, counted by
``torch.utils.flop_counter``) over the GPU's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, by device
name; ``--peak-tflops`` for another GPU). A GPU machine may have PyTorch but no MLflow and no
network: this module and what it imports need PyTorch, torchvision, Pillow and NumPy only, so it
runs from a checkout with ``PYTHONPATH=images/embedder/src:images/contract/src``.

On the CPU (``--device cpu``) it runs the same code at whatever small sizes it is given: the test
suite checks its table that way.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from embedder import data, device_decode, loaders, loop, model

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from NVIDIA's data sheets, by
# torch.cuda.get_device_name(); the first pattern that matches wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100|H200", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3"), H200, GH200
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)
TARGET_IMAGES_PER_SEC = 3000.0  # end to end, ResNet-50 at 224 px on one H100
TARGET_RATIO = 0.9  # of the compute bound


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name``; None for a device not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def training_flops_per_image(architecture: str, image_size: int, num_classes: int) -> float:
    """The model FLOPs of one training image: 3 x its forward pass (forward + backward), counted on the meta device."""
    with torch.device("meta"):
        net = model.build(architecture, num_classes)
        images = torch.empty(2, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        net(images)
    return 3 * counter.get_total_flops() / 2


# -- the data set: JPEG files like a photo collection's ------------------------------------------


def _write_jpeg(job: tuple[str, int, int, int]) -> None:
    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    # Smooth colour fields with fine noise: JPEG sizes and decode costs like photographs', unlike flat colour.
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def write_jpegs(root: Path, images: int, classes: int, width: int, height: int) -> None:
    """``images`` training JPEGs of ``width`` x ``height`` in ``classes`` classes under ``root`` (ImageFolder
    layout, one test image a class as the manifest requires); kept when ``root`` already holds them."""
    jobs = []
    for split, count in (("train", images), ("test", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:07d}.jpg"
            if not path.exists():
                jobs.append((str(path), width, height, i if split == "train" else images + i))
    with ProcessPoolExecutor(max_workers=model.cpu_budget()) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))


# -- the three sides -----------------------------------------------------------------------------


def stage_args(args: argparse.Namespace, epochs: int) -> argparse.Namespace:
    """The train stage's settings that its loader and loop read (the stage's defaults where they matter)."""
    return argparse.Namespace(
        image_size=args.image_size, augment="crop", batch_size=args.batch_size, seed=0, num_workers=args.num_workers,
        decode_on=args.decode_on,
        epochs=epochs, learning_rate=1e-3, weight_decay=1e-4, amp="auto", channels_last="auto", compile=args.compile,
        log_every_steps=10**9, checkpoint_every_steps=0, progress_every_steps=10**9, progress_every_s=float("inf"))


def stage_epoch(trainer: loop.Trainer, settings: argparse.Namespace, loader, epoch: int) -> float:
    """One epoch of the stage's own loop; its images/s as the stage reports it."""
    settings.epochs = epoch + 1
    with loop.StopSignal() as stop:
        return loop.fit(trainer, loop.Progress(epoch=epoch), settings, loader, None, None, None, stop, {})["images_per_sec"]


def pipeline_epoch(loader, device: torch.device) -> float:
    """One epoch of the stage's DataLoader, each batch copied to ``device``; images/s."""
    loader.batch_sampler.set_epoch(0)
    images = 0
    start = time.perf_counter()
    for inputs, targets, _ in loader:
        if isinstance(inputs, device_decode.EncodedBatch):
            inputs.decode(device)
        else:
            inputs.to(device, non_blocking=True)
        targets.to(device, non_blocking=True)
        images += len(targets)
    _synchronize(device)
    return images / (time.perf_counter() - start)


class BareLoop:
    """The stage's model and step choices (a :class:`loop.Trainer` of its own), stepped in plain PyTorch on one
    batch already on the device: no loader, no host-to-device copy, no metrics."""

    def __init__(self, architecture: str, num_classes: int, settings: argparse.Namespace, device: torch.device):
        self.device = device
        self.trainer = loop.Trainer(model.build(architecture, num_classes), settings, device)
        generator = torch.Generator().manual_seed(0)
        size = settings.image_size
        self.inputs = torch.randn(settings.batch_size, 3, size, size, generator=generator).to(
            device, memory_format=self.trainer.memory_format)
        self.targets = torch.randint(0, num_classes, (settings.batch_size,), generator=generator).to(device)

    def run(self, steps: int) -> float:
        """``steps`` optimizer steps; images/s."""
        t = self.trainer
        t.model.train()
        _synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=t.amp_dtype, enabled=t.amp):
                loss = t.criterion(t.model(self.inputs), self.targets)
            t.optimizer.zero_grad(set_to_none=True)
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        _synchronize(self.device)
        return steps * len(self.targets) / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Report:
    device_name: str
    architecture: str
    image_size: int
    batch_size: int
    setup: str  # precision, memory format, compilation, loader workers
    flops_per_image: float  # training FLOPs of one image
    peak_tflops: float | None  # the device's dense bf16 peak
    stage: float  # images/s, medians
    bare: float
    pipeline: float

    def of_bound(self, images_per_sec: float) -> float:
        return images_per_sec / self.bare

    def mfu(self, images_per_sec: float) -> float | None:
        """Model FLOP utilisation: the model FLOPs done per second over the peak."""
        return images_per_sec * self.flops_per_image / (self.peak_tflops * 1e12) if self.peak_tflops else None

    def table(self) -> str:
        peak = f"{self.peak_tflops:g} TFLOPS bf16 dense" if self.peak_tflops else "unknown peak: pass --peak-tflops"
        rows = [("train stage (JPEG files -> step)", self.stage), ("bare loop (tensors on the device)", self.bare),
                ("input pipeline alone (to the device)", self.pipeline)]
        lines = [f"{self.architecture} @ {self.image_size} px, batch {self.batch_size}, {self.device_name} ({peak}); "
                 f"{self.setup}; {self.flops_per_image / 1e9:.2f} GFLOPs per training image",
                 f"{'':38s} {'images/s':>10s} {'/ bare':>8s} {'MFU':>7s}"]
        for name, value in rows:
            mfu = self.mfu(value)
            mfu_text = f"{100 * mfu:6.1f}%" if mfu is not None and name != rows[2][0] else f"{'-':>7s}"
            lines.append(f"{name:38s} {value:10.1f} {self.of_bound(value):8.3f} {mfu_text}")
        bound = "the input pipeline is the bound" if self.pipeline < self.bare else "the GPU is the bound"
        lines.append(f"stage / bare {self.of_bound(self.stage):.3f} (target >= {TARGET_RATIO}: "
                     f"{'met' if self.of_bound(self.stage) >= TARGET_RATIO else 'NOT met'}); "
                     f"stage {self.stage:.0f} images/s (target on one H100 >= {TARGET_IMAGES_PER_SEC:.0f}: "
                     f"{'met' if self.stage >= TARGET_IMAGES_PER_SEC else 'NOT met'}); "
                     f"input pipeline / bare {self.of_bound(self.pipeline):.2f} ({bound})")
        return "\n".join(lines)


def measure(args: argparse.Namespace, root: Path) -> Report:
    device = torch.device(args.device)
    write_jpegs(root, args.images, args.classes, *args.jpeg_size)
    manifest = data.scan(str(root))
    classes = manifest.classes
    settings = stage_args(args, epochs=1)
    train_loader, _ = loaders.make_loaders(manifest, {c: i for i, c in enumerate(classes)}, settings,
                                           cuda=device.type == "cuda")
    trainer = loop.Trainer(model.build(args.architecture, len(classes)), settings, device)
    bare = BareLoop(args.architecture, len(classes), settings, device)
    steps = train_loader.batch_sampler.batches_per_epoch
    sides: dict[str, list[float]] = {"stage": [], "bare": [], "pipeline": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up (compiles) and is not counted
        measured = {"stage": stage_epoch(trainer, settings, train_loader, round_), "bare": bare.run(steps),
                    "pipeline": pipeline_epoch(train_loader, device)}
        print(f"  round {round_}{' (warm-up)' if not round_ else ''}: "
              + "   ".join(f"{k} {v:9.1f} images/s" for k, v in measured.items()), flush=True)
        if round_:
            for key, value in measured.items():
                sides[key].append(value)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = f"{trainer.precision} autocast" if trainer.precision else "float32"
    setup = (f"{precision}, channels_last {'on' if trainer.channels_last else 'off'}, torch.compile "
             f"{'on' if trainer.compiled else 'off'}, JPEGs decoded on the {args.decode_on}, "
             f"{train_loader.num_workers} loader workers of "
             f"{model.cpu_budget()} CPUs, {len(train_loader.dataset)} JPEGs of {args.jpeg_size[0]}x{args.jpeg_size[1]}, "
             f"medians of {args.rounds}")
    return Report(name, args.architecture, args.image_size, args.batch_size, setup,
                  training_flops_per_image(args.architecture, args.image_size, len(classes)),
                  args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None),
                  *(statistics.median(sides[k]) for k in ("stage", "bare", "pipeline")))


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    return width, height


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a small smoke run")
    parser.add_argument("--architecture", default="resnet50", choices=sorted(model.ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=10240, help="training JPEGs (an epoch of images / batch steps)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--jpeg-size", type=_size, default=(500, 375), help="WIDTHxHEIGHT of the JPEGs (ImageNet-like)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (one epoch of each side each)")
    parser.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers (-1: the stage's, from the CPU budget)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="as the stage's --compile")
    parser.add_argument("--decode-on", default="cpu", choices=device_decode.DECODE_ON,
                        help="as the stage's --decode-on: device decodes the JPEGs on the GPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for a GPU not in the table (or to override it)")
    parser.add_argument("--data", default="", help="keep the JPEGs here (reused by the next run) instead of a temporary folder")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    args = get_args_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m embedder.bench_gpu: error: no CUDA device is visible; this benchmark is for GPUs "
                 "(--device cpu with small sizes runs it as a smoke test)")
    torch.manual_seed(0)
    loop.configure_backends(torch.device(args.device))  # as the train stage sets them
    torch.set_num_threads(args.threads or model.cpu_budget())
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        report = measure(args, Path(args.data or os.path.join(tmp, "jpegs")))
    print()
    print(report.table())
    return report


if __name__ == "__main__":
    main()
