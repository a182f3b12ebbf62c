"""The embedder: a torchvision ResNet trained as a classifier, served without its head.

``Embedder.forward`` returns L2-normalised pooled features (2048-d for ResNet-50): the model's
embedding for similarity search. Training puts a cosine classifier on top of that embedding
(NormFace: logits are scaled cosine similarities to one learned direction per class), so the head
needs nothing but the served embedding: evaluation reports top-1 accuracy from the embedding and
the head's small weight file, while the model that is exported and served has no head at all.

Models are logged in MLflow's ``pt2`` format (``torch.export``): loading runs no pickle.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from retrain_contract import params, storage

# The run Param ``architecture`` offers exactly these (retrain_contract.params.ARCHITECTURES).
ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {name: getattr(models, name) for name in params.ARCHITECTURES}
HEAD_FILE = "head.pt"


class Embedder(nn.Module):
    """A ResNet with its classifier removed; images (N, 3, H, W) to unit embeddings (N, D)."""

    def __init__(self, backbone: models.ResNet):
        super().__init__()
        self.embedding_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


class CosineClassifier(nn.Module):
    """Logits = scale * cos(embedding, class direction); works on the served (normalised) embedding."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.scale = scale

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scale * embeddings @ F.normalize(self.weight, dim=1).T


class Classifier(nn.Module):
    """What is trained: the embedder and its head."""

    def __init__(self, embedder: Embedder, head: CosineClassifier):
        super().__init__()
        self.embedder = embedder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x))


def build(architecture: str, num_classes: int, weights_uri: str | None = None) -> Classifier:
    """A fresh classifier; ``weights_uri`` (file or URI of a torchvision state dict) initialises the backbone."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    backbone = ARCHITECTURES[architecture](weights=None)
    if weights_uri:
        load_backbone_weights(backbone, weights_uri)
    embedder = Embedder(backbone)
    return Classifier(embedder, CosineClassifier(embedder.embedding_dim, num_classes))


@dataclass
class LoadedModel:
    """An embedder loaded from MLflow, with its head and the metadata it was logged with."""

    uri: str
    embedder: Callable[[torch.Tensor], torch.Tensor]
    head_weight: torch.Tensor  # (num_classes, dim), rows unit-normalised
    head_scale: float
    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def embedding_dim(self) -> int:
        return int(self.metadata["embedding_dim"])

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embedder(batch)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head_scale * embeddings @ self.head_weight.T


def head_file(classifier: Classifier, directory: Path, classes: list[str]) -> Path:
    """Write the head (weights only, loadable with ``weights_only=True``) for ``extra_files``."""
    path = directory / HEAD_FILE
    torch.save({"weight": F.normalize(classifier.head.weight.detach(), dim=1).clone(),
                "scale": torch.tensor(classifier.head.scale), "classes": json.dumps(classes)}, path)
    return path


class UnsafeModelFormat(ValueError):
    """A registered model stored in a format whose loading can run code (a pickle): refused, never loaded."""


PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_pickle_env_lock = threading.Lock()


def check_format(model_uri: str, local: Path) -> None:
    """Refuse a downloaded MLflow model that is not a pickle-free ``pt2`` export, naming it and the way out."""
    from mlflow.models import Model

    flavor = (Model.load(local).flavors or {}).get("pytorch")
    if flavor is None:
        raise UnsafeModelFormat(f"{model_uri}: not a PyTorch model (no pytorch flavor in its MLmodel); log it with "
                                "embedder.train or mlflow.pytorch.log_model(..., serialization_format='pt2')")
    data = Path(local, flavor.get("model_data", "data"))
    found = sorted(p.name for p in data.iterdir()) if data.is_dir() else [data.name]
    if (data / "model.pt2").is_file() and not (data / "model.pth").exists():
        return
    kind = "a pickled module (model.pth)" if (data / "model.pth").exists() or data.is_file() else f"{found}"
    raise UnsafeModelFormat(
        f"{model_uri}: refused to load {kind}: loading a pickle runs whatever code it names. Only the pt2 export "
        "(torch.export, what embedder.train logs) is loaded; register a version logged with "
        "mlflow.pytorch.log_model(..., serialization_format='pt2')")


def load(model_uri: str) -> LoadedModel:
    """Load a logged embedder (``models:/name/version``, ``runs:/...``, ``models:/m-...``).

    Only what runs no code is read: the ``pt2`` export, checked pickle-free by MLflow (its
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is held false for the load, whatever the environment says), the
    head with ``weights_only=True``. Anything else is :class:`UnsafeModelFormat`, before any of it is read.
    """
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="embedder-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        check_format(model_uri, Path(local))
        metadata = Model.load(local).metadata or {}
        with _pickle_env_lock:
            before = os.environ.get(PICKLE_ENV)
            os.environ[PICKLE_ENV] = "false"
            try:
                module = mlflow.pytorch.load_model(local, map_location="cpu")
            except mlflow.exceptions.MlflowException as exc:
                if "pickle" not in exc.message:
                    raise
                raise UnsafeModelFormat(f"{model_uri}: refused: {exc.message}") from None
            finally:
                if before is None:
                    os.environ.pop(PICKLE_ENV, None)
                else:
                    os.environ[PICKLE_ENV] = before
        head = torch.load(Path(local, "extra_files", HEAD_FILE), map_location="cpu", weights_only=True)
    if "image_size" not in metadata:
        raise ValueError(f"{model_uri}: no embedder metadata (image_size); was it logged by embedder.train?")
    return LoadedModel(model_uri, module, head["weight"], float(head["scale"]), metadata)


def load_backbone_weights(backbone: models.ResNet, weights_uri: str) -> None:
    """Load a torchvision-layout state dict; the classifier (``fc.*``) is dropped since classes differ."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
    except storage.StorageError as exc:
        raise ValueError(f"pretrained weights {exc}") from None
    except Exception as exc:
        raise ValueError(f"pretrained weights {weights_uri}: not a PyTorch state dict ({exc})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise ValueError(f"pretrained weights {weights_uri} do not fit {type(backbone).__name__}: {first.strip()}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights {weights_uri} do not fit {type(backbone).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def cpu_budget(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a pod's limit), rounded down."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def cpu_share(processes: int) -> int:
    """CPUs for each of ``processes`` processes sharing this node's :func:`cpu_budget` (at least one)."""
    return max(1, cpu_budget() // processes)
