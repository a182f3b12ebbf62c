"""The similarity-search gallery: a model's embeddings of the training images, with their labels.

``evaluate`` builds it from the manifest's ``train`` split with the challenger and logs it on the
challenger's MLflow run (``gallery/embeddings.npy``, float32 unit rows, and ``gallery/index.json``,
labels and item paths in the same order). Each model version so carries the gallery made with its
own embedding space, and the server loads it with the version: ``POST /similar`` is exact cosine
top-k over it (a matrix product: fine to a few hundred thousand items per replica; past that, put
an approximate index behind the same contract).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARTIFACT_DIR = "gallery"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.json"
FORMAT = 1


@dataclass
class Gallery:
    embeddings: torch.Tensor  # (N, D), unit rows
    labels: list[str]
    items: list[str]
    dataset_version: str

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or not n or len(self.labels) != n or len(self.items) != n:
            raise ValueError(f"gallery: {tuple(self.embeddings.shape)} embeddings for {len(self.labels)} labels "
                             f"and {len(self.items)} items; expected one non-empty row per item")

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices of the ``k`` nearest items of each unit query row."""
        return (queries @ self.embeddings.T).topk(min(k, len(self)), dim=1)

    def vote(self, scores: torch.Tensor, indices: torch.Tensor) -> list[str]:
        """Per query, the label with the largest summed similarity among its neighbours."""
        out = []
        for row_scores, row_idx in zip(scores.tolist(), indices.tolist(), strict=True):
            totals: dict[str, float] = {}
            for s, i in zip(row_scores, row_idx, strict=True):
                totals[self.labels[i]] = totals.get(self.labels[i], 0.0) + s
            out.append(max(totals, key=totals.__getitem__))
        return out

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / EMBEDDINGS_FILE, self.embeddings.numpy().astype(np.float32))
        (directory / INDEX_FILE).write_text(json.dumps({
            "format": FORMAT, "dataset_version": self.dataset_version, "labels": self.labels, "items": self.items}))
        return directory

    @classmethod
    def load(cls, directory: Path) -> Gallery:
        index = json.loads((directory / INDEX_FILE).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{directory / INDEX_FILE}: gallery format {index.get('format')!r}, expected {FORMAT}")
        embeddings = torch.from_numpy(np.load(directory / EMBEDDINGS_FILE, allow_pickle=False))
        return cls(embeddings, list(index["labels"]), list(index["items"]), str(index["dataset_version"]))


def log(client, run_id: str, gallery: Gallery) -> None:
    """Log ``gallery`` on the MLflow run ``run_id`` under ``gallery/``."""
    with tempfile.TemporaryDirectory(prefix="gallery-") as tmp:
        client.log_artifacts(run_id, str(gallery.save(Path(tmp))), ARTIFACT_DIR)


def download(client, run_id: str) -> Gallery | None:
    """The gallery logged on ``run_id``, or None when the run has none (a model from before galleries)."""
    names = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if not {EMBEDDINGS_FILE, INDEX_FILE} <= names:
        return None
    with tempfile.TemporaryDirectory(prefix="gallery-") as tmp:
        local = client.download_artifacts(run_id, ARTIFACT_DIR, tmp)
        return Gallery.load(Path(local))
