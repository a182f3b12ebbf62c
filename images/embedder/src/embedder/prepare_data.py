"""Stage ``prepare_data``: snapshot the data root into a manifest and log it to MLflow.

Lists every file under ``--data-uri``, decodes each image, hashes it, and writes the manifest
(file, label, split, sha256) to ``<storage-uri>/datasets/<dataset_version>/manifest.json``. The
dataset version is the manifest's content hash; the same images always give the same version.
Files that are not usable images are reported with their reason and left out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import mlflow

from embedder import contract, data, storage, tracking

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.prepare_data", description=__doc__.splitlines()[0])
    parser.add_argument("--data-uri", required=True, help="ImageFolder-style root: <split>/<class>/<image>")
    parser.add_argument("--storage-uri", required=True, help="where manifests (and checkpoints) are kept")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--workers", type=int, default=16, help="parallel reads while scanning")
    return contract.add_common_arguments(parser)


def main(args: argparse.Namespace) -> dict[str, Any]:
    manifest = data.scan(args.data_uri, workers=args.workers)
    version = manifest.dataset_version
    manifest_uri = storage.join(args.storage_uri, "datasets", version, "manifest.json")
    if not storage.exists(manifest_uri):
        storage.write_bytes(manifest_uri, manifest.to_json().encode())
    counts = manifest.counts()
    log.info("dataset %s: %d images in %d classes, %d problem files; manifest %s",
             version, len(manifest.entries), len(manifest.classes), len(manifest.problems), manifest_uri)

    tracking.use_experiment(args.experiment)
    with mlflow.start_run(run_name=f"prepare_data {version}", tags={**contract.airflow_tags(args), "stage": "prepare_data",
                                                                     "dataset_version": version}) as run:
        mlflow.log_input(tracking.dataset_input(manifest_uri, version), context="snapshot")
        mlflow.log_params({"data_uri": args.data_uri, "manifest_uri": manifest_uri})
        mlflow.log_metrics({
            "num_classes": len(manifest.classes),
            "problem_files": len(manifest.problems),
            **{f"{split}_images": sum(c.values()) for split, c in counts.items()},
        })
        mlflow.log_dict({"counts": counts, "problems": [vars(p) for p in manifest.problems]}, "data_report.json")

    return {
        "dataset_version": version,
        "manifest_uri": manifest_uri,
        "classes": manifest.classes,
        "counts": {split: sum(c.values()) for split, c in counts.items()},
        "problem_files": [vars(p) for p in manifest.problems],
        "mlflow_run_id": run.info.run_id,
    }


if __name__ == "__main__":
    sys.exit(contract.run_stage(get_args_parser(), main))
