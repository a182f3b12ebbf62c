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
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from embedder import data, gallery, images, model, stage, tracking
from retrain_contract import artifacts
from retrain_contract.registry import CHAMPION, alias_model_version
from retrain_contract.results import EvaluateResult, Scores

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = stage.new_parser("embedder.evaluate", __doc__)
    parser.add_argument("--manifest-uri", required=True, help="manifest written by prepare_data")
    parser.add_argument("--challenger-uri", required=True, help="model URI returned by train")
    parser.add_argument("--challenger-run-id", required=True, help="MLflow run that trained the challenger")
    parser.add_argument("--model-name", required=True, help="registered model whose @champion is compared")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reference-size", type=int, default=500,
                        help="test-split embeddings stored with the model as the drift monitor's reference")
    parser.add_argument("--gallery-size", type=int, default=200_000,
                        help="training images embedded into the /similar gallery logged with the model "
                             "(a seeded sample when the split is larger; 0: no gallery)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    return parser


def metrics(scores: Scores, prefix: str) -> dict[str, float]:
    return {f"{prefix}recall_at_1": scores.recall_at_1, f"{prefix}recall_at_5": scores.recall_at_5,
            f"{prefix}top1_accuracy": scores.top1_accuracy}


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


def score(loaded: model.LoadedModel, manifest: data.Manifest, batch_size: int, model_uri: str, run_id: str,
          version: str | None = None, keep: list[torch.Tensor] | None = None) -> Scores:
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
    return Scores(model_uri=model_uri, run_id=run_id, recall_at_1=recalls[1], recall_at_5=recalls[5],
                  top1_accuracy=(predicted == lab).float().mean().item(), num_queries=queries, version=version)


def log_reference(client: MlflowClient, run_id: str, embeddings: torch.Tensor, size: int, seed: int = 0) -> str:
    """Store a sample of the model's embeddings of held-out data with its run: the drift monitor's reference.

    Saved as :data:`~retrain_contract.artifacts.REFERENCE_ARTIFACT` (float32, one row per image) on the
    training run, so every registered model version carries the reference its traffic is compared with.
    """
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(embeddings), generator=generator)[:size].sort().values
    sample = embeddings[idx].numpy().astype(np.float32)
    folder, name = artifacts.REFERENCE_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        path = Path(tmp) / name
        np.save(path, sample)
        client.log_artifact(run_id, str(path), folder)
    log.info("drift reference: %d embeddings of the test split logged to run %s", len(sample), run_id)
    return f"runs:/{run_id}/{artifacts.REFERENCE_ARTIFACT}"


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


def main(args: argparse.Namespace) -> EvaluateResult:
    torch.set_num_threads(args.threads or model.cpu_budget())
    manifest = data.read_manifest(args.manifest_uri)
    version = manifest.dataset_version
    dataset = tracking.dataset_input(args.manifest_uri, version)
    client = MlflowClient()

    kept: list[torch.Tensor] = []
    loaded = model.load(args.challenger_uri)
    challenger = score(loaded, manifest, args.batch_size, args.challenger_uri, args.challenger_run_id, keep=kept)
    log_reference(client, args.challenger_run_id, kept[0], args.reference_size)
    if args.gallery_size > 0:
        built = build_gallery(loaded, manifest, args.batch_size, args.gallery_size)
        gallery.log(client, args.challenger_run_id, built)
        log.info("gallery: %d training images (%d-d) logged to run %s", len(built), built.dim, args.challenger_run_id)
    log.info("challenger %s on dataset %s: %s", args.challenger_uri, version, challenger)
    champion = None
    found = alias_model_version(client, args.model_name, CHAMPION)
    if found is not None:
        champion_uri = f"models:/{args.model_name}/{found.version}"
        champion = score(model.load(champion_uri), manifest, args.batch_size, champion_uri, found.run_id,
                         version=str(found.version))
        log.info("champion %s on dataset %s: %s", champion_uri, version, champion)
    else:
        log.info("no @%s for %s yet: the challenger is the only candidate", CHAMPION, args.model_name)

    client.log_batch(args.challenger_run_id, metrics=[
        mlflow.entities.Metric(k, v, mlflow.utils.time.get_current_time_millis(), 0)
        for k, v in metrics(challenger, "test_").items()
    ])
    tracking.use_experiment(args.experiment)
    tags = {**stage.airflow_tags(args), "stage": "evaluate", "dataset_version": version,
            "challenger_run_id": args.challenger_run_id, "champion_version": champion.version if champion else "none"}
    with mlflow.start_run(run_name=f"evaluate {args.airflow_run_id or version}", tags=tags) as run:
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_metrics(metrics(challenger, "challenger_") | (metrics(champion, "champion_") if champion else {}))
    return EvaluateResult(dataset_version=version, manifest_uri=args.manifest_uri, challenger=challenger,
                          champion=champion, mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id)


if __name__ == "__main__":
    sys.exit(stage.run_stage(get_args_parser(), main))
