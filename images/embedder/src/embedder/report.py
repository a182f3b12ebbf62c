"""The evaluation report: challenger and champion on the same snapshot, as figures and one HTML page.

``evaluate`` computes the numbers (the scores it also logs as metrics, recall@1 per class, the test
embeddings and each test image's nearest others); this module only draws them. Each figure function
takes computed numbers and returns a matplotlib ``Figure`` (drawn with Agg, never through pyplot's
global state), so a test can check what it drew; :func:`write` renders the PNGs, the numbers
(``scores.json``) and the page into a folder that ``evaluate`` logs on the challenger's run under
:data:`~retrain_contract.artifacts.REPORT_DIR`. The page embeds its figures as ``data:`` URIs, so it
reads the same in MLflow's artifact view, downloaded, or mailed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from retrain_contract import artifacts
from retrain_contract.results import Scores

DPI = 100
RIGHT, WRONG = "#1a9850", "#d73027"  # a neighbour of the query's class, and of another class
CHALLENGER_COLOUR, CHAMPION_COLOUR = "#4575b4", "#bdbdbd"
SCORE_METRICS = (("recall_at_1", "recall@1"), ("recall_at_5", "recall@5"), ("top1_accuracy", "top-1 accuracy"))
MAX_CLASS_BARS = 40  # more classes than this: the per-class figure shows the largest changes only
MAX_PROJECTED = 3000  # test embeddings drawn in the projection (a seeded sample of larger splits)


@dataclass(frozen=True)
class ModelView:
    """What the report shows of one model: its scores, recall@1 per class, and its test-split geometry."""

    name: str  # "challenger" or "champion (version 3)"
    scores: Scores
    class_recall: dict[str, float]
    embeddings: np.ndarray  # (n, d) unit rows, one per test image
    neighbours: np.ndarray  # (n, k) indices of each test image's nearest others, nearest first


@dataclass(frozen=True)
class ReportInputs:
    dataset_version: str
    classes: list[str]
    labels: np.ndarray  # (n,) index into ``classes`` of each test image
    items: list[str]  # each test image's path under the data root
    challenger: ModelView
    champion: ModelView | None
    queries: list[int]  # the test images the neighbour grid shows (see :func:`pick_queries`)
    thumbnails: Mapping[int, np.ndarray]  # RGB uint8 image of every query and of its challenger neighbours


@dataclass(frozen=True)
class ClassChange:
    name: str
    champion: float | None
    challenger: float

    @property
    def delta(self) -> float | None:
        return None if self.champion is None else self.challenger - self.champion


def class_changes(challenger: Mapping[str, float], champion: Mapping[str, float] | None) -> list[ClassChange]:
    """Each class's recall@1 under both models, the largest drop first and the largest gain last.

    Without a champion (or for a class the champion's snapshot had no queries of) the change is None;
    those come after the compared classes, by name.
    """
    rows = [ClassChange(name, (champion or {}).get(name), value) for name, value in challenger.items()]
    compared = sorted((r for r in rows if r.delta is not None), key=lambda r: (r.delta, r.name))
    return compared + sorted((r for r in rows if r.delta is None), key=lambda r: r.name)


def pick_queries(neighbours: np.ndarray, labels: np.ndarray, count: int = 8, seed: int = 0) -> list[int]:
    """Test images for the neighbour grid: a seeded draw, half of them (when there are) misses at rank 1.

    Only images whose class has another test image are candidates (the others are no retrieval query).
    Hits come first, then misses, each in test-split order.
    """
    if neighbours.shape[1] == 0:  # a test split of one image has no neighbours to show
        return []
    valid = np.bincount(labels)[labels] > 1
    hit = labels[neighbours[:, 0]] == labels
    rng = np.random.default_rng(seed)
    misses = np.flatnonzero(valid & ~hit)
    hits = np.flatnonzero(valid & hit)
    wrong = rng.choice(misses, size=min(len(misses), count // 2), replace=False)
    right = rng.choice(hits, size=min(len(hits), count - len(wrong)), replace=False)
    return [int(i) for i in np.sort(right)] + [int(i) for i in np.sort(wrong)]


def projection(embeddings: np.ndarray) -> np.ndarray:
    """The rows' coordinates on their first two principal components (PCA through an SVD), shape (n, 2)."""
    x = np.asarray(embeddings, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    # Fix each component's sign (SVD may flip it) so the same embeddings always give the same picture.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    points = centred @ (components * signs[:, None]).T
    return points if points.shape[1] == 2 else np.pad(points, ((0, 0), (0, 2 - points.shape[1])))


def class_colours(count: int) -> list[tuple[float, float, float, float]]:
    import matplotlib

    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(i / max(count - 1, 1)) for i in range(count)]


def scores_figure(challenger: Scores, champion: Scores | None, champion_name: str = "champion") -> Figure:
    """Recall@1, recall@5 and top-1 accuracy, challenger beside champion, each bar labelled with its value."""
    fig = Figure(figsize=(7.5, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(SCORE_METRICS))
    models = [(champion_name, champion, CHAMPION_COLOUR)] if champion else []
    models.append(("challenger", challenger, CHALLENGER_COLOUR))
    width = 0.8 / len(models)
    for i, (name, scores, colour) in enumerate(models):
        values = [getattr(scores, key) for key, _ in SCORE_METRICS]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=name, color=colour)
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in values], padding=2, fontsize=9)
    ax.set_xticks(x, [label for _, label in SCORE_METRICS])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.set_title(f"Test split: {challenger.num_queries} retrieval queries", fontsize=11)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def class_recall_figure(changes: list[ClassChange], champion_name: str = "champion") -> Figure:
    """Recall@1 per class, one row per class; the challenger's bar is green where it gained and red where it lost.

    With more than :data:`MAX_CLASS_BARS` classes, the classes with the largest drops and gains are shown.
    """
    shown = changes
    title = "Recall@1 per class (largest drop at the top)"
    if len(changes) > MAX_CLASS_BARS:
        half = MAX_CLASS_BARS // 2
        shown = changes[:half] + changes[-half:]
        title = f"Recall@1 of the {half} classes that lost most and the {half} that gained most (of {len(changes)})"
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(shown)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(shown))[::-1]
    compared = any(c.delta is not None for c in shown)
    if compared:
        ax.barh(y + 0.2, [c.champion or 0.0 for c in shown], 0.4, color=CHAMPION_COLOUR, label=champion_name)
    colours = [CHALLENGER_COLOUR if c.delta is None or c.delta == 0 else RIGHT if c.delta > 0 else WRONG
               for c in shown]
    bars = ax.barh(y - 0.2 if compared else y, [c.challenger for c in shown], 0.4 if compared else 0.6, color=colours,
                   label="challenger")
    ax.bar_label(bars, labels=[f"{c.challenger:.2f}" + ("" if c.delta is None else f" ({c.delta:+.2f})")
                               for c in shown], padding=3, fontsize=8)
    ax.set_yticks(y, [c.name for c in shown], fontsize=9)
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("recall@1")
    ax.set_title(title, fontsize=11)
    if compared:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=CHAMPION_COLOUR, label=champion_name),
                            Patch(color=RIGHT, label="challenger: better"), Patch(color=WRONG, label="challenger: worse"),
                            Patch(color=CHALLENGER_COLOUR, label="challenger: unchanged")],
                   loc="outside right upper", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def projection_figure(views: list[tuple[str, np.ndarray]], labels: np.ndarray, classes: list[str],
                      seed: int = 0) -> Figure:
    """One panel per model: its test embeddings projected to 2-D (:func:`projection`), coloured by class."""
    keep = np.arange(len(labels))
    if len(keep) > MAX_PROJECTED:
        keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_PROJECTED, replace=False))
    colours = class_colours(len(classes))
    fig = Figure(figsize=(4.2 * len(views) + (1.4 if len(classes) <= 20 else 0), 4.2), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(views)))
    for ax, (name, embeddings) in zip(axes, views, strict=True):
        points = projection(embeddings[keep])
        for index, name_of_class in enumerate(classes):
            mine = labels[keep] == index
            if mine.any():
                ax.scatter(points[mine, 0], points[mine, 1], s=12, color=colours[index], label=name_of_class,
                           alpha=0.8, linewidths=0)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center", fontsize=9, markerscale=1.5, frameon=False)
    return fig


def neighbour_grid_figure(queries: list[int], neighbours: np.ndarray, labels: np.ndarray, classes: list[str],
                          thumbnails: Mapping[int, np.ndarray]) -> Figure:
    """One row per query: the query image, then its nearest test images, framed green (same class) or red."""
    k = neighbours.shape[1]
    fig = Figure(figsize=(1.25 * (k + 1) + 0.3, 1.35 * max(len(queries), 1) + 0.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(max(len(queries), 1), k + 1, squeeze=False)
    for row, query in enumerate(queries):
        cells = [(query, "query", "black")] + [
            (int(n), f"{rank + 1}", RIGHT if labels[n] == labels[query] else WRONG)
            for rank, n in enumerate(neighbours[query])]
        for col, (index, rank, colour) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(thumbnails[index], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(colour)
                spine.set_linewidth(1 if col == 0 else 4)
            mark = "" if col == 0 else (" ✓" if colour == RIGHT else " ✗")
            ax.set_title(f"{rank}: {classes[labels[index]]}{mark}", fontsize=8, color=colour)
    fig.suptitle("Challenger's nearest test images per query", fontsize=11)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def figures(inputs: ReportInputs) -> dict[str, Figure]:
    """Every figure of the report, by its file name in :data:`~retrain_contract.artifacts.REPORT_FIGURES`."""
    champion = inputs.champion
    champion_name = champion.name if champion else "champion"
    views = ([(champion.name, champion.embeddings)] if champion else []) + [
        (inputs.challenger.name, inputs.challenger.embeddings)]
    drawn = {
        "scores.png": scores_figure(inputs.challenger.scores, champion.scores if champion else None, champion_name),
        "class_recall.png": class_recall_figure(
            class_changes(inputs.challenger.class_recall, champion.class_recall if champion else None), champion_name),
        "projection.png": projection_figure(views, inputs.labels, inputs.classes),
        "neighbours.png": neighbour_grid_figure(inputs.queries, inputs.challenger.neighbours, inputs.labels,
                                                inputs.classes, inputs.thumbnails),
    }
    return drawn


def numbers(inputs: ReportInputs) -> dict:
    """What the page shows, as data (``scores.json``): both models' scores and recall@1 per class."""
    def view(v: ModelView | None) -> dict | None:
        return None if v is None else {"name": v.name, "scores": v.scores.to_json(), "class_recall": v.class_recall}

    return {"dataset_version": inputs.dataset_version, "test_images": len(inputs.labels), "classes": inputs.classes,
            "challenger": view(inputs.challenger), "champion": view(inputs.champion),
            "neighbour_queries": [inputs.items[q] for q in inputs.queries]}


def page(inputs: ReportInputs, pngs: Mapping[str, bytes]) -> str:
    """The report as one HTML page; each figure is an ``<img>`` with its PNG as a ``data:`` URI."""
    e = html.escape
    challenger, champion = inputs.challenger, inputs.champion
    score_rows = []
    for key, label in SCORE_METRICS:
        new = getattr(challenger.scores, key)
        old = getattr(champion.scores, key) if champion else None
        change = "" if old is None else _change_cell(new - old)
        score_rows.append(f"<tr><th>{e(label)}</th>" + (f"<td>{old:.4f}</td>" if champion else "")
                          + f"<td>{new:.4f}</td>" + (change if champion else "") + "</tr>")
    changes = class_changes(challenger.class_recall, champion.class_recall if champion else None)
    better = [c.name for c in changes if c.delta is not None and c.delta > 0][::-1]
    worse = [c.name for c in changes if c.delta is not None and c.delta < 0]
    class_rows = "".join(
        f"<tr><th>{e(c.name)}</th>" + (f"<td>{c.champion:.4f}</td>" if champion and c.champion is not None
                                        else "<td>&ndash;</td>" if champion else "")
        + f"<td>{c.challenger:.4f}</td>" + (_change_cell(c.delta) if champion and c.delta is not None
                                            else "<td></td>" if champion else "") + "</tr>"
        for c in changes)
    head = (f"<th>{e(champion.name)}</th>" if champion else "") + "<th>challenger</th>" + (
        "<th>change</th>" if champion else "")
    versus = (f"{e(champion.name)} (run <code>{e(champion.scores.run_id)}</code>)" if champion
              else "none: this is the first model, so there is nothing to compare with")
    if champion:
        verdict = (f"<p>Better on {len(better)} classes ({e(', '.join(better)) or 'none'}), worse on {len(worse)} "
                   f"({e(', '.join(worse)) or 'none'}), unchanged on {len(changes) - len(better) - len(worse)}.</p>")
    else:
        verdict = "<p>No champion to compare with: the challenger's own recall@1 per class.</p>"
    figs = {name: _figure(name, caption, pngs[name]) for name, caption in artifacts.REPORT_FIGURES.items()}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Evaluation report: challenger vs {e(champion.name if champion else "no champion")}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1000px;
       color: #222; padding: 0 16px; line-height: 1.45; }}
h1 {{ font-size: 1.5em; margin-bottom: 4px; }} h2 {{ font-size: 1.2em; margin-top: 28px; border-bottom: 1px solid #ddd; }}
.meta {{ color: #555; font-size: 0.92em; }}
table {{ border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }}
th, td {{ padding: 3px 12px; border-bottom: 1px solid #eee; text-align: right; }}
th:first-child {{ text-align: left; }} thead th {{ border-bottom: 2px solid #ccc; }}
td.up {{ color: {RIGHT}; font-weight: 600; }} td.down {{ color: {WRONG}; font-weight: 600; }}
figure {{ margin: 12px 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.88em; }}
.columns {{ display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }}
</style></head>
<body>
<h1>Evaluation report</h1>
<p class="meta">Dataset version <code>{e(inputs.dataset_version)}</code>, test split: {len(inputs.labels)} images in
{len(inputs.classes)} classes, {challenger.scores.num_queries} retrieval queries (each test image queries the others).<br>
Challenger: <code>{e(challenger.scores.model_uri)}</code> (run <code>{e(challenger.scores.run_id)}</code>).
Compared with: {versus}.</p>
<h2>Scores on the same snapshot</h2>
<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(score_rows)}</tbody></table>
{figs["scores.png"]}
<h2>Recall@1 per class</h2>
{verdict}
<div class="columns">
<table><thead><tr><th>class</th>{head}</tr></thead><tbody>{class_rows}</tbody></table>
{figs["class_recall.png"]}
</div>
<h2>Embeddings</h2>
{figs["projection.png"]}
<h2>Nearest neighbours</h2>
{figs["neighbours.png"]}
</body></html>
"""


def _change_cell(delta: float) -> str:
    kind = "up" if delta > 0 else "down" if delta < 0 else ""
    return f'<td class="{kind}">{delta:+.4f}</td>'


def _figure(name: str, caption: str, data: bytes) -> str:
    artifact = f"{artifacts.REPORT_DIR}/{name}"
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}" data-artifact="{artifact}">'
            f"<figcaption>{html.escape(caption)} (<code>{artifact}</code>)</figcaption></figure>")


def write(inputs: ReportInputs, folder: Path) -> list[Path]:
    """The report's files in ``folder``: every figure as PNG, ``scores.json`` and the page; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = {name: png(fig) for name, fig in figures(inputs).items()}
    written = []
    for name, data in pngs.items():
        (folder / name).write_bytes(data)
        written.append(folder / name)
    for artifact, text in ((artifacts.REPORT_SCORES, json.dumps(numbers(inputs), indent=1)),
                           (artifacts.REPORT_PAGE, page(inputs, pngs))):
        path = folder / Path(artifact).relative_to(artifacts.REPORT_DIR)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
