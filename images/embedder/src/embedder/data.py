"""Data sets as ``ImageFolder``-style trees, snapshotted by a manifest.

Layout under the data root (``file://`` or ``s3://``)::

    train/<class>/<any/depth/>image.(png|jpg|...)
    val/<class>/...        (optional: per-epoch validation accuracy)
    test/<class>/...       (evaluation: retrieval recall@k and top-1 accuracy)

The manifest lists every usable file with its split, label, size and sha256. The dataset version
is the hash of those entries, so the same images give the same version wherever they are stored.
Files that cannot be used are quarantined: listed under ``quarantined`` with the reason (empty,
truncated, not an image, over the pixel limit), never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from embedder.images import DEFAULT_MAX_PIXELS, ImageRejected, decode, decode_rgb
from embedder.stage import StageInputError
from retrain_contract import manifests, storage

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
MANIFEST_FORMAT = manifests.FORMAT


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the data root, "/"-separated
    split: str
    label: str
    sha256: str
    bytes: int
    mode: str = "RGB"  # the file's own mode; every image is converted to RGB when read


@dataclass(frozen=True)
class Quarantined:
    """A file left out of the snapshot, and why."""

    path: str
    reason: str


@dataclass
class Manifest:
    data_uri: str
    entries: list[Entry]
    quarantined: list[Quarantined] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({e.label for e in self.entries})

    @property
    def dataset_version(self) -> str:
        return dataset_version(self.entries)

    def split(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (split, label), n in sorted(Counter((e.split, e.label) for e in self.entries).items()):
            out.setdefault(split, {})[label] = n
        return out

    def modes(self) -> dict[str, int]:
        """How many files of each image mode (converted to RGB on read)."""
        return dict(sorted(Counter(e.mode for e in self.entries).items()))

    def quarantined_share(self) -> float:
        total = len(self.entries) + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "dataset_version": self.dataset_version,
            "data_uri": self.data_uri,
            "classes": self.classes,
            "counts": self.counts(),
            "entries": [asdict(e) for e in self.entries],
            "quarantined": [asdict(q) for q in self.quarantined],
            "modes": self.modes(),
        }
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            doc = json.loads(text)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT}")
            manifest = cls(
                data_uri=doc["data_uri"],
                entries=[Entry(**e) for e in doc["entries"]],
                quarantined=[Quarantined(**q) for q in doc.get("quarantined", [])],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StageInputError(f"{source}: not a valid manifest ({exc}); re-run prepare_data") from exc
        if manifest.dataset_version != doc["dataset_version"]:
            raise StageInputError(f"{source}: entries do not hash to the recorded dataset version; the file was edited")
        return manifest


def dataset_version(entries: list[Entry]) -> str:
    """Content hash of the entries (path, split, label, sha256): 16 hex characters."""
    canonical = json.dumps(
        sorted([e.path, e.split, e.label, e.sha256] for e in entries), separators=(",", ":")
    ).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _check_file(data_uri: str, rel: str, max_pixels: int) -> Entry | Quarantined:
    parts = rel.split("/")
    split, label = parts[0], parts[1] if len(parts) > 2 else ""
    if not label:
        return Quarantined(rel, f"not inside a class folder (expected {split}/<class>/<image>)")
    try:
        data = storage.read_bytes(storage.join(data_uri, rel))
    except storage.StorageError as exc:
        return Quarantined(rel, f"unreadable: {exc}")
    try:
        mode = decode(data, max_pixels)[1]  # a full decode: truncated or corrupt files fail here
    except ImageRejected as exc:
        return Quarantined(rel, str(exc))
    return Entry(rel, split, label, hashlib.sha256(data).hexdigest(), len(data), mode)


def scan(data_uri: str, workers: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> Manifest:
    """List and check every file under ``data_uri``; bad files are quarantined with their reason.

    Raises StageInputError for a layout that cannot be trained on (missing root or split, empty class).
    """
    try:
        files = storage.list_files(data_uri)
    except storage.StorageError as exc:
        raise StageInputError(f"data root {exc}") from None
    candidates = [f for f in files if f.split("/")[0] in SPLITS and not Path(f).name.startswith(".")]
    ignored = sorted({f.split("/")[0] for f in files} - set(SPLITS))
    if ignored:
        log.warning("ignoring top-level entries of %s that are not splits: %s", data_uri, ", ".join(ignored))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(pool.map(lambda rel: _check_file(data_uri, rel, max_pixels), candidates))
    entries = [c for c in checked if isinstance(c, Entry)]
    quarantined = [c for c in checked if isinstance(c, Quarantined)]
    for q in quarantined:
        log.warning("quarantined %s: %s", storage.join(data_uri, q.path), q.reason)
    manifest = Manifest(data_uri=data_uri, entries=entries, quarantined=quarantined)
    _check_layout(manifest, files)
    return manifest


def check_policy(manifest: Manifest, max_quarantine_share: float, min_images_per_class: int) -> None:
    """Refuse a snapshot with too many bad files or too few training images in a class."""
    share = manifest.quarantined_share()
    if share > max_quarantine_share:
        total = len(manifest.entries) + len(manifest.quarantined)
        raise StageInputError(
            f"{len(manifest.quarantined)} of {total} files ({share:.1%}) were quarantined, over the limit of "
            f"{max_quarantine_share:.1%} (--max-quarantine-share); the reasons are in the manifest and in MLflow's "
            f"data_report.json. Fix or remove those files, or raise the limit")
    small = {label: n for label, n in manifest.counts()["train"].items() if n < min_images_per_class}
    if small:
        listing = ", ".join(f"{label!r} ({n})" for label, n in sorted(small.items()))
        raise StageInputError(
            f"classes with fewer than {min_images_per_class} training images (--min-images-per-class): {listing}; "
            f"add images to train/<class>/ or remove the class")


def compare_classes(previous: list[str], current: list[str]) -> dict[str, list[str]]:
    return {"added": sorted(set(current) - set(previous)), "removed": sorted(set(previous) - set(current))}


def _check_layout(manifest: Manifest, files: list[str]) -> None:
    root = manifest.data_uri
    for split in REQUIRED_SPLITS:
        if not manifest.split(split):
            raise StageInputError(
                f"data root {root} has no images under {split}/; expected {split}/<class>/<image> "
                f"(build the demo data with `python -m embedder.demo_data --output {root}`)"
            )
    class_folders = {(f.split("/")[0], f.split("/")[1]) for f in files if f.count("/") >= 2 and f.split("/")[0] in SPLITS}
    counts = manifest.counts()
    for split, label in sorted(class_folders):
        if not counts.get(split, {}).get(label):
            raise StageInputError(
                f"class folder {storage.join(root, split, label)} has no usable images; add images or remove the folder"
            )
    train_classes = set(counts["train"])
    if len(train_classes) < 2:
        raise StageInputError(f"data root {root}: train/ has {len(train_classes)} class folder(s); at least 2 are needed")
    unseen = sorted(set(manifest.classes) - train_classes)
    if unseen:
        raise StageInputError(f"data root {root}: classes {unseen} have no train/ images; every class must be trained on")


def read_manifest(uri: str) -> Manifest:
    try:
        return Manifest.from_json(storage.read_bytes(uri).decode(), source=uri)
    except storage.StorageError as exc:
        raise StageInputError(f"manifest {exc} (pass the manifest_uri that prepare_data returned)") from None


class ManifestDataset(Dataset):
    """The images of one split, read from the data root and checked against the manifest size."""

    def __init__(self, manifest: Manifest, split: str, class_to_idx: dict[str, int], transform: Any):
        self.entries = manifest.split(split)
        self.root = manifest.data_uri
        self.local_root = Path(storage.parse(self.root).path) if storage.parse(self.root).scheme == "file" else None
        self.class_to_idx = class_to_idx
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, entry: Entry) -> bytes:
        if self.local_root is not None:
            data = (self.local_root / entry.path).read_bytes()
        else:
            data = storage.read_bytes(storage.join(self.root, entry.path))
        if len(data) != entry.bytes:
            raise StageInputError(
                f"{storage.join(self.root, entry.path)} changed since the manifest was written "
                f"({len(data)} bytes, manifest says {entry.bytes}); re-run prepare_data"
            )
        return data

    def read(self, index: int) -> bytes:
        """The ``index``-th file's bytes, checked against the manifest's size."""
        return self._read(self.entries[index])

    def target(self, index: int) -> int:
        """The ``index``-th image's class index; -1 for a class this dataset's classes do not have."""
        return self.class_to_idx.get(self.entries[index].label, -1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image(index)), self.target(index)

    def image(self, index: int) -> Image.Image:
        """The ``index``-th image as stored (decoded to RGB, untransformed)."""
        return decode_rgb(self.read(index))
