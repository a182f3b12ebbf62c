"""Stage ``prepare_data``: snapshot the data root into a manifest and log it to MLflow.

Lists every file under ``--data-uri``, decodes each image, hashes it, and writes the manifest
(file, label, split, sha256) to ``<storage-uri>/datasets/<dataset_version>/manifest.json``. The
dataset version is the manifest's content hash; the same images always give the same version.
Files that are not usable images (empty, truncated, not an image, over the pixel limit) are
quarantined with their reason in the manifest and in MLflow; the stage fails, naming the count and
the limit, when too many are, or when a class has too few training images. Classes added or
removed since the champion's data are reported.
"""

from __future__ import annotations

import argparse
import logging
import sys

import mlflow

from embedder import data, images, stage, tracking
from retrain_contract import artifacts, storage
from retrain_contract.registry import CHAMPION, alias_model_version
from retrain_contract.results import PrepareResult

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = stage.new_parser("embedder.prepare_data", __doc__)
    parser.add_argument("--data-uri", required=True, help="ImageFolder-style root: <split>/<class>/<image>")
    parser.add_argument("--storage-uri", required=True, help="where manifests (and checkpoints) are kept")
    parser.add_argument("--model-name", default="", help="registered model whose champion's classes are compared")
    parser.add_argument("--max-quarantine-share", type=float, default=0.05,
                        help="fail when more than this share of files is quarantined")
    parser.add_argument("--min-images-per-class", type=int, default=2, help="fail when a class has fewer train images")
    parser.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="larger images are quarantined (decompression bomb guard)")
    parser.add_argument("--workers", type=int, default=16, help="parallel reads while scanning")
    return parser


def champion_classes(model_name: str, storage_uri: str) -> tuple[str | None, list[str] | None]:
    """(dataset version, classes) of the data the current champion was trained on, if known."""
    from mlflow import MlflowClient

    if not model_name:
        return None, None
    version = alias_model_version(MlflowClient(), model_name, CHAMPION)  # an outage raises, as it must
    if version is None:
        return None, None
    dataset = version.tags.get("dataset_version")
    uri = storage.join(storage_uri, *artifacts.manifest_path(dataset or "-"))
    if not dataset or not storage.exists(uri):
        log.warning("champion %s v%s: its manifest %s is not available; class changes not reported",
                    model_name, version.version, uri)
        return dataset, None
    return dataset, data.read_manifest(uri).classes


def main(args: argparse.Namespace) -> PrepareResult:
    if not 0 <= args.max_quarantine_share <= 1:
        raise stage.StageInputError(f"--max-quarantine-share must be between 0 and 1, got {args.max_quarantine_share}")
    manifest = data.scan(args.data_uri, workers=args.workers, max_pixels=args.max_pixels)
    version = manifest.dataset_version
    manifest_uri = storage.join(args.storage_uri, *artifacts.manifest_path(version))
    counts = manifest.counts()
    previous_dataset, previous_classes = champion_classes(args.model_name, args.storage_uri)
    changes = data.compare_classes(previous_classes, manifest.classes) if previous_classes is not None else None
    log.info("dataset %s: %d images in %d classes, %d quarantined; modes %s; class changes vs champion data %s: %s",
             version, len(manifest.entries), len(manifest.classes), len(manifest.quarantined), manifest.modes(),
             previous_dataset, changes)
    report = {"dataset_version": version, "counts": counts, "modes": manifest.modes(),
              "quarantined": [vars(q) for q in manifest.quarantined],
              "champion_dataset_version": previous_dataset, "class_changes": changes}

    tracking.use_experiment(args.experiment)
    with mlflow.start_run(run_name=f"prepare_data {version}", tags={**stage.airflow_tags(args), "stage": "prepare_data",
                                                                     "dataset_version": version}) as run:
        mlflow.log_params({"data_uri": args.data_uri, "manifest_uri": manifest_uri,
                           "max_quarantine_share": args.max_quarantine_share,
                           "min_images_per_class": args.min_images_per_class, "max_pixels": args.max_pixels})
        mlflow.log_metrics({
            "num_classes": len(manifest.classes),
            "quarantined_files": len(manifest.quarantined),
            "quarantined_share": manifest.quarantined_share(),
            **{f"{split}_images": sum(c.values()) for split, c in counts.items()},
        })
        mlflow.log_dict(report, artifacts.DATA_REPORT)
        if changes:
            mlflow.set_tags({"classes_added": ",".join(changes["added"]) or "none",
                             "classes_removed": ",".join(changes["removed"]) or "none"})
        data.check_policy(manifest, args.max_quarantine_share, args.min_images_per_class)
        if not storage.exists(manifest_uri):  # content-addressed: an existing one is identical
            storage.write_bytes(manifest_uri, manifest.to_json().encode())
        mlflow.log_input(tracking.dataset_input(manifest_uri, version), context="snapshot")

    return PrepareResult(dataset_version=version, manifest_uri=manifest_uri, classes=manifest.classes,
                         counts={split: sum(c.values()) for split, c in counts.items()},
                         quarantined=[vars(q) for q in manifest.quarantined], class_changes=changes,
                         mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id)


if __name__ == "__main__":
    sys.exit(stage.run_stage(get_args_parser(), main))
