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
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from embedder import data, gallery, images, model, report, stage, tracking
from retrain_contract import artifacts
from retrain_contract.registry import CHAMPION, alias_model_version
from retrain_contract.results import EvaluateResult, Scores

log = logging.getLogger(__name__)
NEIGHBOURS = 5  # nearest others kept per test image: recall@1 and @5, and the report's neighbour grid


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


def nearest(embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices of each row's ``k`` nearest other rows by cosine similarity (unit rows), nearest first."""
    n = len(embeddings)
    k = min(k, n - 1)
    rows = []
    for start in range(0, n, chunk):
        sim = embeddings[start : start + chunk] @ embeddings.T
        own = torch.arange(start, min(start + chunk, n))
        sim[own - start, own] = float("-inf")
        rows.append(sim.topk(k, dim=1).indices)
    return torch.cat(rows)


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                chunk: int = 1024) -> tuple[dict[int, float], int]:
    """Leave-one-out retrieval recall@k over unit embeddings; queries whose label is unique are skipped."""
    return recall_from_neighbours(nearest(embeddings, max(ks), chunk), labels, ks)


def queries_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which items are retrieval queries: those whose label some other item shares."""
    return (labels[:, None] == labels[None, :]).sum(1) > 1


def recall_from_neighbours(neighbours: torch.Tensor, labels: torch.Tensor,
                           ks: tuple[int, ...] = (1, 5)) -> tuple[dict[int, float], int]:
    """Recall@k from each item's nearest others (see :func:`nearest`); the number of queries."""
    valid = queries_mask(labels)
    match = labels[neighbours] == labels[:, None]
    queries = int(valid.sum())
    hits = {k: int((match[:, :k].any(1) & valid).sum()) for k in ks}
    return {k: hits[k] / queries if queries else float("nan") for k in ks}, queries


def class_recall(neighbours: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """Recall@1 of each class's queries (classes with fewer than two test images have none and are left out)."""
    if neighbours.shape[1] == 0:  # one test image: no queries
        return {}
    valid = queries_mask(labels)
    hit = labels[neighbours[:, 0]] == labels
    out = {}
    for index, name in enumerate(classes):
        mine = valid & (labels == index)
        if mine.any():
            out[name] = hit[mine].float().mean().item()
    return out


@dataclass(frozen=True)
class TestSplit:
    """One model's view of the test split: its embeddings, the labels, and each image's nearest others."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    neighbours: torch.Tensor  # (n, NEIGHBOURS): indices into the split, nearest first


def score(loaded: model.LoadedModel, manifest: data.Manifest, batch_size: int, model_uri: str, run_id: str,
          version: str | None = None) -> tuple[Scores, TestSplit]:
    """The retrieval and accuracy scores of ``loaded`` on the test split, and what they were computed from."""
    classes = manifest.classes
    dataset = data.ManifestDataset(manifest, "test", {c: i for i, c in enumerate(classes)},
                                   images.eval_transform(loaded.image_size))
    embeddings, labels = [], []
    for batch, target in DataLoader(dataset, batch_size=batch_size):
        embeddings.append(loaded.embed(batch))
        labels.append(target)
    emb, lab = torch.cat(embeddings), torch.cat(labels)
    neighbours = nearest(emb, NEIGHBOURS)
    recalls, queries = recall_from_neighbours(neighbours, lab)
    # The model's own class order, mapped onto the manifest's; unknown classes are never predicted right.
    to_manifest = torch.tensor([classes.index(c) if c in classes else -2 for c in loaded.classes])
    predicted = to_manifest[loaded.logits(emb).argmax(1)]
    scores = Scores(model_uri=model_uri, run_id=run_id, recall_at_1=recalls[1], recall_at_5=recalls[5],
                    top1_accuracy=(predicted == lab).float().mean().item(), num_queries=queries, version=version)
    return scores, TestSplit(emb, lab, neighbours)


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


def log_report(client: MlflowClient, run_id: str, manifest: data.Manifest, challenger: tuple[Scores, TestSplit],
               champion: tuple[Scores, TestSplit] | None, queries: int = 8) -> str:
    """Draw the evaluation report (:mod:`embedder.report`) and log it on the challenger's run; returns its page's URI."""
    def view(name: str, scores: Scores, split: TestSplit) -> report.ModelView:
        return report.ModelView(name, scores, class_recall(split.neighbours, split.labels, manifest.classes),
                                split.embeddings.numpy(), split.neighbours.numpy())

    challenger_view = view("challenger", *challenger)
    champion_view = view(f"champion (version {champion[0].version})", *champion) if champion else None
    labels = challenger[1].labels.numpy()
    picked = report.pick_queries(challenger_view.neighbours, labels, queries)
    dataset = data.ManifestDataset(manifest, "test", {}, transform=None)
    shown = sorted({*picked, *(int(n) for q in picked for n in challenger_view.neighbours[q])})
    inputs = report.ReportInputs(
        dataset_version=manifest.dataset_version, classes=manifest.classes, labels=labels,
        items=[e.path for e in dataset.entries], challenger=challenger_view, champion=champion_view, queries=picked,
        thumbnails={i: np.asarray(dataset.image(i)) for i in shown})
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        written = report.write(inputs, Path(tmp))
        client.log_artifacts(run_id, tmp, artifacts.REPORT_DIR)
    log.info("evaluation report: %s logged to run %s", ", ".join(p.name for p in written), run_id)
    return f"runs:/{run_id}/{artifacts.REPORT_PAGE}"


def main(args: argparse.Namespace) -> EvaluateResult:
    torch.set_num_threads(args.threads or model.cpu_budget())
    manifest = data.read_manifest(args.manifest_uri)
    version = manifest.dataset_version
    dataset = tracking.dataset_input(args.manifest_uri, version)
    client = MlflowClient()

    loaded = model.load(args.challenger_uri)
    challenger, challenger_split = score(loaded, manifest, args.batch_size, args.challenger_uri, args.challenger_run_id)
    log_reference(client, args.challenger_run_id, challenger_split.embeddings, args.reference_size)
    if args.gallery_size > 0:
        built = build_gallery(loaded, manifest, args.batch_size, args.gallery_size)
        gallery.log(client, args.challenger_run_id, built)
        log.info("gallery: %d training images (%d-d) logged to run %s", len(built), built.dim, args.challenger_run_id)
    log.info("challenger %s on dataset %s: %s", args.challenger_uri, version, challenger)
    champion, champion_split = None, None
    found = alias_model_version(client, args.model_name, CHAMPION)
    if found is not None:
        champion_uri = f"models:/{args.model_name}/{found.version}"
        champion, champion_split = score(model.load(champion_uri), manifest, args.batch_size, champion_uri,
                                         found.run_id, version=str(found.version))
        log.info("champion %s on dataset %s: %s", champion_uri, version, champion)
    else:
        log.info("no @%s for %s yet: the challenger is the only candidate", CHAMPION, args.model_name)
    log_report(client, args.challenger_run_id, manifest, (challenger, challenger_split),
               (champion, champion_split) if champion else None)

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
