"""MLflow helpers shared by the stages: experiment, run tags, the data set as a run input."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

import embedder


def code_version() -> str:
    """The code version: ``EMBEDDER_CODE_VERSION`` (set at image build), else the git commit, else the package version."""
    env = os.environ.get("EMBEDDER_CODE_VERSION")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return f"embedder-{embedder.__version__}"


def image_ref() -> str:
    """The container image the stage runs in (``EMBEDDER_IMAGE``, set by the runner), or ``local``."""
    return os.environ.get("EMBEDDER_IMAGE", "local")


def use_experiment(name: str) -> None:
    mlflow.set_experiment(name)


def dataset_input(manifest_uri: str, dataset_version: str) -> MetaDataset:
    """The data snapshot as an MLflow dataset: the manifest as its source, the version as its digest."""
    with warnings.catch_warnings():
        # MLflow registers an artifact dataset source per artifact scheme, and "file" and "" both map to
        # LocalArtifactDatasetSource, so resolving a file:// URI warns that it matches two sources; they are
        # the same class, so either is right.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(manifest_uri)
    return MetaDataset(source=source, name=f"images-{dataset_version}", digest=dataset_version)
