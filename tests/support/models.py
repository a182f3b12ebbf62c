"""Small real embedders, logged and registered the way ``embedder.train`` does it, for the serving tests.

Each is a ``torch.nn.Module`` exported in MLflow's ``pt2`` format with the metadata, the head file and
(optionally) the ``/similar`` gallery that a trained version carries, so the real serving process loads it
like any other version. They train nothing; they behave in ways a real challenger can:

- :class:`Tiny`: a small convolutional embedder (32 px), seeded;
- :func:`perturbed`: a copy of one with a little noise on its weights (its neighbours mostly agree);
- :class:`Collapsed`: every image to the same unit vector (a collapsed embedding space: it passes a smoke test);
- :class:`BrightNaN`: fine on the smoke test's grey gradient, NaN on the digits' white background;
- :class:`Slow`: a :class:`Tiny`'s answers at 224 px, behind a heavy convolution: tens of times slower.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from embedder import gallery as gallery_mod
from embedder import images as image_mod
from embedder.model import HEAD_FILE
from embedder.train import signature

DIM = 32


class Tiny(nn.Module):
    image_size = 32

    def __init__(self, seed: int = 0, dim: int = DIM):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return F.normalize(self.fc(x), dim=1)


def perturbed(base: Tiny, noise: float = 0.02, seed: int = 1) -> Tiny:
    out = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return out


class Collapsed(nn.Module):
    image_size = 32

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.direction = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.direction + 0 * x.mean(dim=(1, 2, 3), keepdim=False)[:, None], dim=1)


class BrightNaN(Tiny):
    """A :class:`Tiny` whose output is scaled by sqrt(1 - mean brightness): NaN where the image is mostly bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(1.0 - x.mean(dim=(1, 2, 3)))[:, None]
        return F.normalize(super().forward(x) * scale, dim=1)


class Slow(nn.Module):
    """``base`` on 224 px images scaled down to its 32 px (so its answers agree with it), and a heavy convolution
    stack at 224 px whose result is added times zero: the same embeddings, tens of times the work."""

    image_size = 224

    def __init__(self, base: Tiny):
        super().__init__()
        self.base = copy.deepcopy(base)
        self.heavy = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), *[nn.Conv2d(48, 48, 3, padding=1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = self.heavy(x).mean(dim=(1, 2, 3))[:, None]
        return self.base(F.interpolate(x, size=(Tiny.image_size, Tiny.image_size), mode="bilinear")) + 0 * work


def embed_files(module: nn.Module, files: list[Path]) -> torch.Tensor:
    transform = image_mod.eval_transform(module.image_size)
    batch = torch.stack([transform(image_mod.decode_rgb(f.read_bytes())) for f in files])
    with torch.inference_mode():
        return module.eval()(batch)


def register(client: MlflowClient, name: str, module: nn.Module, gallery_files: list[Path] | None = None,
             dataset_version: str = "test-data") -> str:
    """Log ``module`` as ``embedder.train`` logs a model (pt2, metadata, head) with its gallery; returns the version."""
    module.eval()
    classes = sorted({f.parent.name for f in gallery_files}) if gallery_files else ["a", "b"]
    size, dim = module.image_size, int(module(torch.zeros(1, 3, module.image_size, module.image_size)).shape[1])
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    with tempfile.TemporaryDirectory(prefix="test-model-") as tmp:
        head = Path(tmp) / HEAD_FILE
        torch.save({"weight": F.normalize(torch.randn(len(classes), dim), dim=1), "scale": torch.tensor(16.0),
                    "classes": json.dumps(classes)}, head)
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.set_tag("dataset_version", dataset_version)
            info = mlflow.pytorch.log_model(module, name="model", serialization_format="pt2",
                                            input_example=torch.zeros(2, 3, size, size), extra_files=[str(head)],
                                            signature=signature(size, dim),
                                            metadata={"architecture": type(module).__name__.lower(), "image_size": size,
                                                      "embedding_dim": dim, "classes": classes,
                                                      "dataset_version": dataset_version})
            if gallery_files:
                found = gallery_mod.Gallery(embed_files(module, gallery_files), [f.parent.name for f in gallery_files],
                                            [f.name for f in gallery_files], dataset_version)
                gallery_mod.log(client, run.info.run_id, found)
    mv = mlflow.register_model(info.model_uri, name, tags={"dataset_version": dataset_version})
    return str(mv.version)


def register_unloadable(client: MlflowClient, name: str, home: Path) -> str:
    """A registered version whose artifact is not a model: every pod that pins it fails to load it, never ready."""
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id)
    (home / "broken").mkdir(exist_ok=True)
    (home / "broken" / "README").write_text("not a model")
    client.log_artifacts(run.info.run_id, str(home / "broken"), "broken")
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version(name, source=f"{run.info.artifact_uri}/broken", run_id=run.info.run_id).version)


class _Trap:
    """Unpickling it runs code: it writes ``marker`` (what a hostile artifact would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran while loading a model')",)


def register_pickled(client: MlflowClient, name: str, module: nn.Module, marker: Path, home: Path) -> str:
    """A version that looks like ``embedder.train``'s (MLmodel, metadata, head) but whose model is a pickle
    (``model.pth``, MLflow's pickle format) that writes ``marker`` when it is unpickled; returns the version."""
    import pickle
    import shutil

    from mlflow.artifacts import download_artifacts

    good = register(client, name, module)
    src = Path(download_artifacts(artifact_uri=f"models:/{name}/{good}", dst_path=str(home / f"pickled-src-{good}")))
    dst = home / f"pickled-{good}"
    shutil.copytree(src, dst)
    data = dst / "data"
    for old in data.iterdir():
        old.unlink() if old.is_file() else shutil.rmtree(old)
    (data / "model.pth").write_bytes(pickle.dumps(_Trap(marker)))
    (data / "pickle_module_info.txt").write_text("pickle")
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(dst), "model")
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version)
