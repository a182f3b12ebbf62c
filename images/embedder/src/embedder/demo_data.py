"""Build the demo data set: scikit-learn's bundled handwritten digits as an ImageFolder tree.

``load_digits`` ships 1,797 real 8x8 scans inside scikit-learn, so nothing is downloaded. Each is
written as an RGB PNG (dark ink on white, upscaled) under ``<split>/<class>/`` with a stratified,
seeded train/val/test split::

    python -m embedder.demo_data --output file:///tmp/digits
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from retrain_contract import storage

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="data root to create (file:// or s3://)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the written PNGs in pixels")
    parser.add_argument("--per-class", type=int, default=0, help="keep at most this many images per class (0: all)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write even if the output already holds files")
    parser.add_argument("--if-empty", action="store_true",
                        help="do nothing (exit 0) when the output already holds files (for an init job)")
    return parser


def digit_png(pixels: np.ndarray, image_size: int) -> bytes:
    """An 8x8 array of ink intensities 0..16 as an RGB PNG of ``image_size`` pixels, dark ink on white."""
    gray = (255 - np.clip(pixels, 0, 16) * 255 / 16).astype(np.uint8)
    img = Image.fromarray(gray, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def shifted_png(png: bytes) -> bytes:
    """The same digit in a new look, the demo's drift: light ink on a dark background."""
    img = ImageOps.invert(Image.open(io.BytesIO(png)).convert("RGB"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add_shifted(root: str, prefix: str = "shifted-") -> dict[str, int]:
    """New labelled data arriving: a shifted copy of every image, next to it, named ``<prefix><name>``."""
    counts: dict[str, int] = {}
    for rel in storage.list_files(root):
        split = rel.partition("/")[0]
        if not rel.endswith(".png") or rel.rsplit("/", 1)[-1].startswith(prefix):
            continue
        folder, file = rel.rsplit("/", 1)
        storage.write_bytes(storage.join(root, folder, prefix + file), shifted_png(storage.read_bytes(storage.join(root, rel))))
        counts[split] = counts.get(split, 0) + 1
    return counts


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, per_class: int, seed: int):
    """Stratified split: ``{split: [index, ...]}``, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        if per_class:
            idx = idx[:per_class]
        n_test = max(1, round(len(idx) * test_fraction))
        n_val = round(len(idx) * val_fraction)
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test : n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val :].tolist()
    return out


def build(output: str, image_size: int = 32, per_class: int = 0, val_fraction: float = 0.15,
          test_fraction: float = 0.15, seed: int = 0) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[str, int] = {}
    for split, indices in split_indices(digits.target, val_fraction, test_fraction, per_class, seed).items():
        for i in indices:
            name = CLASS_NAMES[digits.target[i]]
            storage.write_bytes(storage.join(output, split, name, f"{i:04d}.png"), digit_png(digits.images[i], image_size))
        counts[split] = len(indices)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        existing = storage.list_files(args.output)
    except storage.StorageError:
        existing = []
    if existing and args.if_empty and not args.overwrite:
        print(f"{args.output} already holds {len(existing)} files; left as it is")
        return 0
    if existing and not args.overwrite:
        print(f"{args.output} already holds {len(existing)} files; pass --overwrite to write anyway", file=sys.stderr)
        return 2
    counts = build(args.output, args.image_size, args.per_class, args.val_fraction, args.test_fraction, args.seed)
    print(f"wrote {sum(counts.values())} images to {args.output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
