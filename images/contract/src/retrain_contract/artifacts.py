"""Where things are kept: the artifact paths and storage layouts that a writer and a reader share.

- On a data snapshot's ``prepare_data`` run: the data report.
- On a model version's training run (MLflow artifacts): the drift reference, the ``/similar`` gallery,
  the evaluation report (``report/``: one HTML page and its figures, linked from the model card).
- On a model version's monitoring run: the drift timeline (``drift/timeline.png``), linked from drift alerts.
- In storage (``RETRAIN_STORAGE_URI``): dataset manifests and checkpoints.
- In the sample location (``RETRAIN_SAMPLE_URI``): the serving API's sampled embeddings, one file per
  time window, model version and serving process, which the drift monitor reads.
"""

from __future__ import annotations

import re

DATA_REPORT = "data_report.json"  # on the prepare_data run: images per split and class, quarantined files and why
REFERENCE_ARTIFACT = "drift/reference.npy"  # test-split embeddings the drift monitor compares traffic with
GALLERY_DIR = "gallery"  # the /similar gallery: training-split embeddings and their labels
GALLERY_EMBEDDINGS = "embeddings.npy"
GALLERY_INDEX = "index.json"
REPORT_DIR = "report"  # the evaluation report: champion vs challenger on the same snapshot
REPORT_PAGE = f"{REPORT_DIR}/index.html"  # one self-contained page (figures embedded as data: URIs)
REPORT_SCORES = f"{REPORT_DIR}/scores.json"  # the numbers the page draws (per-class recall of both models)
# The report's figures, file name -> caption; the page and the model card show them in this order.
REPORT_FIGURES = {
    "scores.png": "Champion and challenger on the same test split",
    "class_recall.png": "Recall@1 per class: which classes got better or worse",
    "projection.png": "Test embeddings in two dimensions (PCA), coloured by class",
    "neighbours.png": "Queries and their nearest test images (green: same class, red: another class)",
}
DRIFT_TIMELINE = "drift/timeline.png"  # on the monitoring run: p-value and MMD² per window, serving bands
DRIFT_TIMELINE_DATA = "drift/timeline.json"  # what the timeline marked (drifted and confirmed windows)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")
_WINDOW = re.compile(r"^window=(\d+)$")


def manifest_path(dataset_version: str) -> tuple[str, ...]:
    """A dataset's manifest, under the storage root: ``datasets/<version>/manifest.json``."""
    return ("datasets", dataset_version, "manifest.json")


def checkpoint_path(dag_id: str, run_id: str | None = None) -> tuple[str, ...]:
    """A DAG run's checkpoints, under the checkpoint root: ``<dag id>/<run id>`` (without a run: the DAG's
    folder), every character outside ``[A-Za-z0-9._=-]`` replaced by ``_`` (run ids hold ``:`` and ``+``),
    the same on every retry."""
    return tuple(_UNSAFE.sub("_", part) for part in (dag_id, run_id) if part is not None)


def sample_path(model_name: str, version: str, window_start: int, writer: str) -> tuple[str, ...]:
    """One serving process's sample of one window: ``<model>/v<version>/window=<start s>/<writer>.npy``."""
    return (model_name, f"v{version}", f"window={int(window_start)}", f"{writer}.npy")


def sample_version_path(model_name: str, version: str) -> tuple[str, ...]:
    """Where every window of one model version lies (what :func:`sample_windows` lists)."""
    return (model_name, f"v{version}")


def window_complete_at(window_start: float, window_s: float) -> float:
    """When every serving process has written its sample of a window: a grace after the window closes.

    The grace is 10 s, or a quarter window for shorter windows; the serving processes write a closed
    window within it, and the drift monitor reads a window only after it.
    """
    return window_start + window_s + min(10.0, window_s / 4)


def sample_windows(names: list[str]) -> dict[int, list[str]]:
    """Window start -> the sample files in it, from names listed under :func:`sample_version_path`."""
    windows: dict[int, list[str]] = {}
    for name in names:
        folder, _, file = name.partition("/")
        match = _WINDOW.match(folder)
        if match and file.endswith(".npy") and "/" not in file:
            windows.setdefault(int(match.group(1)), []).append(name)
    return windows
