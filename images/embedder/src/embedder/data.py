"""Data sets as ``ImageFolder``-style trees, snapshotted by a manifest.

Layout under the data root (``file://`` or ``s3://``)::

    train/<class>/<any/depth/>image.(png|jpg|...)
    val/<class>/...        (optional: per-epoch validation accuracy)
    test/<class>/...       (evaluation: retrieval recall@k and top-1 accuracy)

The manifest lists every usable file with its split, label, size and sha256. The dataset version
is the hash of those entries, so the same images give the same version wherever they are stored.
Files that cannot be used are listed under ``problems`` with the reason, not silently dropped.
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
from torch.utils.data import Dataset

from embedder import storage
from embedder.contract import StageInputError
from embedder.images import decode_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the data root, "/"-separated
    split: str
    label: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str


@dataclass
class Manifest:
    data_uri: str
    entries: list[Entry]
    problems: list[Problem] = field(default_factory=list)

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

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "dataset_version": self.dataset_version,
            "data_uri": self.data_uri,
            "classes": self.classes,
            "counts": self.counts(),
            "entries": [asdict(e) for e in self.entries],
            "problems": [asdict(p) for p in self.problems],
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
                problems=[Problem(**p) for p in doc.get("problems", [])],
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


def _check_file(data_uri: str, rel: str) -> Entry | Problem:
    parts = rel.split("/")
    split, label = parts[0], parts[1] if len(parts) > 2 else ""
    if not label:
        return Problem(rel, f"not inside a class folder (expected {split}/<class>/<image>)")
    try:
        data = storage.read_bytes(storage.join(data_uri, rel))
    except storage.StorageError as exc:
        return Problem(rel, f"unreadable: {exc}")
    if not data:
        return Problem(rel, "empty file (0 bytes)")
    try:
        decode_rgb(data)
    except Exception as exc:  # PIL raises many types for undecodable data
        return Problem(rel, f"not a decodable image: {type(exc).__name__}: {exc}")
    return Entry(rel, split, label, hashlib.sha256(data).hexdigest(), len(data))


def scan(data_uri: str, workers: int = 16) -> Manifest:
    """List and check every file under ``data_uri``; raise StageInputError for an unusable layout."""
    try:
        files = storage.list_files(data_uri)
    except storage.StorageError as exc:
        raise StageInputError(f"data root {exc}") from None
    candidates = [f for f in files if f.split("/")[0] in SPLITS and not Path(f).name.startswith(".")]
    ignored = sorted({f.split("/")[0] for f in files} - set(SPLITS))
    if ignored:
        log.warning("ignoring top-level entries of %s that are not splits: %s", data_uri, ", ".join(ignored))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(pool.map(lambda rel: _check_file(data_uri, rel), candidates))
    entries = [c for c in checked if isinstance(c, Entry)]
    problems = [c for c in checked if isinstance(c, Problem)]
    for p in problems:
        log.warning("skipping %s: %s", storage.join(data_uri, p.path), p.reason)
    manifest = Manifest(data_uri=data_uri, entries=entries, problems=problems)
    _check_layout(manifest, files)
    return manifest


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        return self.transform(decode_rgb(self._read(entry))), self.class_to_idx.get(entry.label, -1)
