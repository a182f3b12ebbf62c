"""Stage ``evaluate``: score the challenger and the current champion on the same data snapshot.

Both models embed the manifest's ``test`` split (each with its own preprocessing). Retrieval
recall@k: every test image queries the other test images; a hit is a same-label image among the
k nearest by cosine similarity. Top-1 accuracy uses each model's head on its embedding; test
images of classes a model was not trained on count as misses. Metrics are logged on the
challenger's run and on an evaluation run that holds both models' scores side by side.

The challenger's run also gets what serving needs with the model: the drift monitor's reference
(test-split embeddings) and the ``/similar`` gallery (training-split embeddings with labels).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader

from embedder import contract, data, gallery, images, model, tracking

log = logging.getLogger(__name__)
CHAMPION_ALIAS = "champion"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest-uri", required=True, help="manifest written by prepare_data")
    parser.add_argument("--challenger-uri", required=True, help="model URI returned by train")
    parser.add_argument("--challenger-run-id", required=True, help="MLflow run that trained the challenger")
    parser.add_argument("--model-name", required=True, help="registered model whose @champion is compared")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reference-size", type=int, default=500,
                        help="test-split embeddings stored with the model as the drift monitor's reference")
    parser.add_argument("--gallery-size", type=int, default=200_000,
                        help="training images embedded into the /similar gallery logged with the model "
                             "(a seeded sample when the split is larger; 0: no gallery)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    return contract.add_common_arguments(parser)


@dataclass
class Scores:
    recall_at_1: float
    recall_at_5: float
    top1_accuracy: float
    num_queries: int

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}recall_at_1": self.recall_at_1, f"{prefix}recall_at_5": self.recall_at_5,
                f"{prefix}top1_accuracy": self.top1_accuracy}


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                chunk: int = 1024) -> tuple[dict[int, float], int]:
    """Leave-one-out retrieval recall@k over unit embeddings; queries whose label is unique are skipped."""
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    valid = same.sum(1) > 1  # some other item shares the label
    kmax = min(max(ks), n - 1)
    hits = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sim = embeddings[start : start + chunk] @ embeddings.T
        rows = torch.arange(start, min(start + chunk, n))
        sim[rows - start, rows] = float("-inf")
        nearest = sim.topk(kmax, dim=1).indices
        match = labels[nearest] == labels[rows, None]
        for k in ks:
            hits[k] += (match[:, :k].any(1) & valid[rows]).sum().item()
    queries = int(valid.sum())
    return {k: hits[k] / queries if queries else float("nan") for k in ks}, queries


def score(loaded: model.LoadedModel, manifest: data.Manifest, batch_size: int,
          keep: list[torch.Tensor] | None = None) -> Scores:
    """The retrieval and accuracy scores of ``loaded`` on the test split; its embeddings go into ``keep``."""
    classes = manifest.classes
    dataset = data.ManifestDataset(manifest, "test", {c: i for i, c in enumerate(classes)},
                                   images.eval_transform(loaded.image_size))
    embeddings, labels = [], []
    for batch, target in DataLoader(dataset, batch_size=batch_size):
        embeddings.append(loaded.embed(batch))
        labels.append(target)
    emb, lab = torch.cat(embeddings), torch.cat(labels)
    if keep is not None:
        keep.append(emb)
    recalls, queries = recall_at_k(emb, lab)
    # The model's own class order, mapped onto the manifest's; unknown classes are never predicted right.
    to_manifest = torch.tensor([classes.index(c) if c in classes else -2 for c in loaded.classes])
    predicted = to_manifest[loaded.logits(emb).argmax(1)]
    return Scores(recalls[1], recalls[5], (predicted == lab).float().mean().item(), queries)


def log_reference(client: MlflowClient, run_id: str, embeddings: torch.Tensor, size: int, seed: int = 0) -> str:
    """Store a sample of the model's embeddings of held-out data with its run: the drift monitor's reference.

    Saved as ``drift/reference.npy`` (float32, one row per image) on the training run, so every
    registered model version carries the reference its production traffic is compared with.
    """
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(embeddings), generator=generator)[:size].sort().values
    sample = embeddings[idx].numpy().astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        path = Path(tmp) / "reference.npy"
        np.save(path, sample)
        client.log_artifact(run_id, str(path), "drift")
    log.info("drift reference: %d embeddings of the test split logged to run %s", len(sample), run_id)
    return f"runs:/{run_id}/drift/reference.npy"


def build_gallery(loaded: model.LoadedModel, manifest: data.Manifest, batch_size: int, size: int,
                  seed: int = 0) -> gallery.Gallery:
    """The challenger's embeddings of (a seeded sample of at most ``size``) training images, with labels."""
    dataset = data.ManifestDataset(manifest, "train", {c: i for i, c in enumerate(manifest.classes)},
                                   images.eval_transform(loaded.image_size))
    if len(dataset) > size:
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size].sort().values
        dataset.entries = [dataset.entries[i] for i in keep.tolist()]
    rows = [loaded.embed(batch) for batch, _ in DataLoader(dataset, batch_size=batch_size)]
    return gallery.Gallery(torch.cat(rows), [e.label for e in dataset.entries], [e.path for e in dataset.entries],
                           manifest.dataset_version)


def champion_version(client: MlflowClient, model_name: str):
    """The registered version behind ``@champion``, or None when there is no champion yet."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or model.cpu_budget())
    manifest = data.read_manifest(args.manifest_uri)
    version = manifest.dataset_version
    dataset = tracking.dataset_input(args.manifest_uri, version)
    client = MlflowClient()

    kept: list[torch.Tensor] = []
    loaded = model.load(args.challenger_uri)
    challenger = score(loaded, manifest, args.batch_size, keep=kept)
    log_reference(client, args.challenger_run_id, kept[0], args.reference_size)
    if args.gallery_size > 0:
        built = build_gallery(loaded, manifest, args.batch_size, args.gallery_size)
        gallery.log(client, args.challenger_run_id, built)
        log.info("gallery: %d training images (%d-d) logged to run %s", len(built), built.dim, args.challenger_run_id)
    log.info("challenger %s on dataset %s: %s", args.challenger_uri, version, challenger)
    result: dict[str, Any] = {
        "dataset_version": version,
        "manifest_uri": args.manifest_uri,
        "challenger": {"model_uri": args.challenger_uri, "run_id": args.challenger_run_id, **asdict(challenger)},
        "champion": None,
    }
    champ = champion_version(client, args.model_name)
    if champ is not None:
        champ_uri = f"models:/{args.model_name}/{champ.version}"
        champion = score(model.load(champ_uri), manifest, args.batch_size)
        log.info("champion %s on dataset %s: %s", champ_uri, version, champion)
        result["champion"] = {"version": str(champ.version), "model_uri": champ_uri, "run_id": champ.run_id,
                              **asdict(champion)}
    else:
        log.info("no @%s for %s yet: the challenger is the only candidate", CHAMPION_ALIAS, args.model_name)

    client.log_batch(args.challenger_run_id, metrics=[
        mlflow.entities.Metric(k, v, mlflow.utils.time.get_current_time_millis(), 0)
        for k, v in challenger.metrics("test_").items()
    ])
    tracking.use_experiment(args.experiment)
    tags = {**contract.airflow_tags(args), "stage": "evaluate", "dataset_version": version,
            "challenger_run_id": args.challenger_run_id,
            "champion_version": result["champion"]["version"] if result["champion"] else "none"}
    with mlflow.start_run(run_name=f"evaluate {args.airflow_run_id or version}", tags=tags) as run:
        mlflow.log_input(dataset, context="evaluation")
        metrics = challenger.metrics("challenger_")
        if result["champion"]:
            metrics.update(champion.metrics("champion_"))
        mlflow.log_metrics(metrics)
    result["mlflow_run_id"] = run.info.run_id  # the evaluation run: both models' scores side by side
    result["mlflow_experiment_id"] = run.info.experiment_id
    return result


if __name__ == "__main__":
    sys.exit(contract.run_stage(get_args_parser(), main))
