"""The evaluation report's pieces: per-class recall, what each figure marks, and the page that embeds them."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from embedder import evaluate, report
from retrain_contract import artifacts
from retrain_contract.results import Scores
from tests.helpers import check_figure

CLASSES = ["cat", "dog", "fox"]


def split(seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """30 unit embeddings in three clusters (10 per class); a larger ``spread`` mixes the classes more."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(10)
    centres = torch.eye(3, 8) * 3
    emb = centres[labels] + spread * torch.randn(30, 8, generator=generator)
    return torch.nn.functional.normalize(emb, dim=1), labels


def view(name: str, emb: torch.Tensor, labels: torch.Tensor) -> report.ModelView:
    neighbours = evaluate.nearest(emb, evaluate.NEIGHBOURS)
    recalls, queries = evaluate.recall_from_neighbours(neighbours, labels)
    scores = Scores(model_uri=f"models:/m/{name}", run_id=f"run-{name}", recall_at_1=recalls[1], recall_at_5=recalls[5],
                    top1_accuracy=0.5, num_queries=queries, version="1" if name == "champion" else None)
    return report.ModelView(name, scores, evaluate.class_recall(neighbours, labels, CLASSES), emb.numpy(),
                            neighbours.numpy())


@pytest.fixture(scope="module")
def inputs() -> report.ReportInputs:
    challenger_emb, labels = split(0, 1.2)
    champion_emb, _ = split(1, 1.2)
    challenger = view("challenger", challenger_emb, labels)
    champion = view("champion", champion_emb, labels)
    labels = labels.numpy()
    queries = report.pick_queries(challenger.neighbours, labels, count=4)
    shown = {*queries, *challenger.neighbours[queries].ravel().tolist()}
    rng = np.random.default_rng(0)
    thumbnails = {i: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for i in shown}
    return report.ReportInputs(dataset_version="d1", classes=CLASSES, labels=labels,
                               items=[f"test/{CLASSES[c]}/{i}.png" for i, c in enumerate(labels)], challenger=challenger,
                               champion=champion, queries=queries, thumbnails=thumbnails)


def test_class_recall_weighted_by_queries_is_the_recall_at_1():
    emb, labels = split(2, 1.2)
    labels[0] = 3  # a class with one test image: no query, and no per-class recall
    neighbours = evaluate.nearest(emb, 5)
    per_class = evaluate.class_recall(neighbours, labels, [*CLASSES, "owl"])
    recalls, queries = evaluate.recall_from_neighbours(neighbours, labels)
    sizes = {name: int((labels == i).sum()) for i, name in enumerate(CLASSES)}
    assert per_class.keys() == set(CLASSES)
    assert sum(per_class[c] * sizes[c] for c in CLASSES) / queries == pytest.approx(recalls[1])
    assert 0 < recalls[1] < 1  # the classes are mixed: some per-class recalls are below one


def test_class_recall_on_known_neighbours():
    # The angles of test_recall_at_k_on_known_neighbours: A=0.0, B=0.1, C=3.0, D=3.2, E=1.6; E's nearest is C.
    angles = torch.tensor([0.0, 0.1, 3.0, 3.2, 1.6])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    recall = evaluate.class_recall(evaluate.nearest(emb, 2), torch.tensor([0, 0, 1, 1, 0]), ["a", "b"])
    assert recall == {"a": pytest.approx(2 / 3), "b": 1.0}


def test_class_changes_put_the_largest_drop_first_and_the_largest_gain_last():
    changes = report.class_changes({"a": 0.5, "b": 0.9, "c": 0.7, "new": 0.4}, {"a": 0.8, "b": 0.6, "c": 0.7})
    assert [(c.name, c.delta) for c in changes] == [("a", pytest.approx(-0.3)), ("c", 0.0), ("b", pytest.approx(0.3)),
                                                    ("new", None)]


def test_the_neighbour_grid_queries_show_hits_and_misses(inputs):
    neighbours, labels = inputs.challenger.neighbours, inputs.labels
    hits = [labels[neighbours[q, 0]] == labels[q] for q in inputs.queries]
    assert len(inputs.queries) == 4 and hits == [True, True, False, False]


def test_the_projection_keeps_the_direction_of_largest_spread():
    rng = np.random.default_rng(0)
    along = rng.normal(0, 5, 200)
    points = np.stack([along, rng.normal(0, 0.1, 200), rng.normal(0, 0.1, 200)], axis=1) @ np.linalg.qr(
        rng.normal(size=(3, 3)))[0]
    projected = report.projection(points)
    assert projected.shape == (200, 2)
    assert abs(np.corrcoef(projected[:, 0], along)[0, 1]) > 0.999
    assert np.array_equal(projected, report.projection(points))  # the same picture every time


def test_each_neighbour_is_framed_green_when_it_is_of_the_query_s_class_and_red_when_not(inputs):
    fig = report.neighbour_grid_figure(inputs.queries, inputs.challenger.neighbours, inputs.labels, CLASSES,
                                       inputs.thumbnails)
    axes = np.array(fig.axes).reshape(len(inputs.queries), evaluate.NEIGHBOURS + 1)
    for row, query in enumerate(inputs.queries):
        for rank, neighbour in enumerate(inputs.challenger.neighbours[query]):
            ax = axes[row, rank + 1]
            same = inputs.labels[neighbour] == inputs.labels[query]
            assert to_hex(ax.spines["left"].get_edgecolor()) == (report.RIGHT if same else report.WRONG)
            assert ax.get_title().endswith("✓" if same else "✗")
            assert CLASSES[inputs.labels[neighbour]] in ax.get_title()


def test_the_class_figure_colours_gains_green_and_losses_red(inputs):
    changes = report.class_changes(inputs.challenger.class_recall, inputs.champion.class_recall)
    fig = report.class_recall_figure(changes)
    challenger_bars = fig.axes[0].containers[1]
    for change, bar in zip(changes, challenger_bars, strict=True):
        expected = report.RIGHT if change.delta > 0 else report.WRONG if change.delta < 0 else report.CHALLENGER_COLOUR
        assert to_hex(bar.get_facecolor()) == expected
        assert bar.get_width() == pytest.approx(change.challenger)


def test_the_page_embeds_every_figure_the_report_writes(inputs, tmp_path):
    written = {p.name: p for p in report.write(inputs, tmp_path)}
    assert written.keys() == {*artifacts.REPORT_FIGURES, "scores.json", "index.html"}
    page = written["index.html"].read_text()
    embedded = {name: data for data, name in re.findall(
        r'<img src="data:image/png;base64,([^"]+)" alt="[^"]*" data-artifact="report/([^"]+)"', page)}
    assert embedded.keys() == artifacts.REPORT_FIGURES.keys()
    for name in artifacts.REPORT_FIGURES:
        data = written[name].read_bytes()
        check_figure(data)
        assert base64.b64decode(embedded[name]) == data
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: the page stands alone
    numbers = json.loads(written["scores.json"].read_text())
    assert numbers["challenger"]["class_recall"] == inputs.challenger.class_recall
    assert f"<td>{inputs.challenger.scores.recall_at_1:.4f}</td>" in page
    assert f"<td>{inputs.champion.scores.recall_at_1:.4f}</td>" in page


def test_without_a_champion_the_report_shows_the_challenger_alone(inputs, tmp_path):
    alone = report.ReportInputs(**{**inputs.__dict__, "champion": None})
    figures = report.figures(alone)
    assert [len(c) for c in figures["scores.png"].axes[0].containers] == [3]  # one bar per score, no champion's
    assert len(figures["projection.png"].axes) == 1
    page = report.page(alone, {name: report.png(fig) for name, fig in figures.items()})
    assert "nothing to compare with" in page and "<th>change</th>" not in page
