"""The drift timeline: one picture of a model version's monitored windows, logged on its monitoring run.

Top panel: each window's permutation p-value (log scale) against the threshold; bottom panel: its
MMD². Windows the monitor scored as drifted (its ``drift`` metric: ``p < alpha``) are shaded red;
where it confirmed drift (its ``confirmed`` metric: K drifted windows in a row, logged at the last
window a monitor run scored) a dashed line is drawn; insufficient windows are grey crosses. The model
versions serving at the time are bands along the top (the rollout records of ``<experiment>-serving``).

:func:`draw` is pure: from the windows and bands to a figure and the :class:`Timeline` it marked, so a
test can compare what is marked with what the monitor decided. :func:`log_timeline` reads the
monitoring run, draws, and logs :data:`~retrain_contract.artifacts.DRIFT_TIMELINE` (and what it marked,
as JSON) on the run; the drift alert links to it. matplotlib is imported when drawing, never when the
monitor's DAG is parsed.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient

from retrain.settings import Settings
from retrain_contract import artifacts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DRIFTED, CONFIRMED, OK_COLOUR, INSUFFICIENT_COLOUR = "#d73027", "#7f0000", "#4575b4", "#969696"
BAND_COLOURS = ("#e0ecf4", "#fee8c8", "#e5f5e0", "#efedf5")


@dataclass(frozen=True)
class WindowScores:
    """One monitored window as the monitor logged it (metric steps are window starts, epoch seconds)."""

    start: int
    p_value: float | None
    mmd2: float | None
    drift: bool
    insufficient: bool
    confirmed: bool  # a monitor run that scored up to this window found drift confirmed


@dataclass(frozen=True)
class Band:
    """A model version serving from ``start`` to ``end`` (epoch seconds; None: still serving)."""

    version: str
    start: float
    end: float | None


@dataclass(frozen=True)
class Timeline:
    """What the timeline drew and marked."""

    model_name: str
    version: str
    alpha: float
    windows_required: int
    window_s: float
    windows: list[int]
    drifted: list[int]
    confirmed: list[int]
    insufficient: list[int]
    bands: list[Band]  # the serving bands inside the drawn span, clipped to it


def read_windows(client: MlflowClient, run_id: str) -> list[WindowScores]:
    """Every window the monitoring run holds, oldest first."""
    series = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
              for key in ("p_value", "mmd2", "drift", "insufficient", "confirmed")}
    starts = sorted(series["insufficient"].keys() | series["p_value"].keys())
    return [WindowScores(start=s, p_value=series["p_value"].get(s), mmd2=series["mmd2"].get(s),
                         drift=series["drift"].get(s) == 1, insufficient=series["insufficient"].get(s) == 1,
                         confirmed=series["confirmed"].get(s) == 1) for s in starts]


def serving_bands(client: MlflowClient, settings: Settings, model_name: str) -> list[Band]:
    """What served when, from the rollout records; each rollout serves until the next one."""
    from retrain.rollout.history import serving_periods

    return [Band(version, start_ms / 1000, None if end_ms is None else end_ms / 1000)
            for version, start_ms, end_ms in serving_periods(client, settings, model_name)]


def draw(windows: list[WindowScores], bands: list[Band], *, model_name: str, version: str, alpha: float,
         windows_required: int, window_s: float) -> tuple[Figure, Timeline]:
    """The timeline of ``windows`` (at least one) with the serving ``bands``, and what it marked."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not windows:
        raise ValueError("no window to draw: the timeline needs at least one scored window")

    def when(seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, tz=UTC)

    span = (windows[0].start - window_s / 2, windows[-1].start + 1.5 * window_s)
    shown = [Band(b.version, max(b.start, span[0]), span[1] if b.end is None else min(b.end, span[1]))
             for b in bands if b.start < span[1] and (b.end is None or b.end > span[0])]
    scored = [w for w in windows if not w.insufficient and w.p_value is not None]
    drifted = [w for w in scored if w.drift]
    confirmed = [w for w in windows if w.confirmed]
    insufficient = [w for w in windows if w.insufficient]

    fig = Figure(figsize=(10, 5.6), dpi=100, layout="constrained")
    p_ax, mmd_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for ax in (p_ax, mmd_ax):
        for i, band in enumerate(shown):
            ax.axvspan(when(band.start), when(band.end), color=BAND_COLOURS[i % len(BAND_COLOURS)], zorder=0)
        for w in drifted:
            ax.axvspan(when(w.start), when(w.start + window_s), color=DRIFTED, alpha=0.15, zorder=1, linewidth=0)
        for w in confirmed:
            ax.axvline(when(w.start + window_s), color=CONFIRMED, linestyle="--", linewidth=1.5, zorder=3)
    for band in shown:
        p_ax.annotate(f"v{band.version} serving", (when(band.start), 1), xycoords=("data", "axes fraction"),
                      xytext=(4, -4), textcoords="offset points", va="top", fontsize=9, color="#333")

    centres = {w.start: when(w.start + window_s / 2) for w in windows}
    p_values = [w.p_value for w in scored]
    low = min([*p_values, alpha]) / 3
    p_ax.set_yscale("log")
    p_ax.set_ylim(low, 3)
    p_ax.axhline(alpha, color=CONFIRMED, linewidth=1)
    p_ax.annotate(f"threshold alpha = {alpha:g}", (0, alpha), xycoords=("axes fraction", "data"), xytext=(4, 3),
                  textcoords="offset points", fontsize=8, color=CONFIRMED)
    p_ax.plot([centres[w.start] for w in scored], p_values, color="#555", linewidth=1, zorder=2)
    p_ax.scatter([centres[w.start] for w in scored], p_values, zorder=4, s=36,
                 color=[DRIFTED if w.drift else OK_COLOUR for w in scored])
    p_ax.scatter([centres[w.start] for w in insufficient], [low * 1.5] * len(insufficient), marker="x",
                 color=INSUFFICIENT_COLOUR, zorder=4)
    for w in confirmed:
        p_ax.annotate("drift confirmed", (when(w.start + window_s), low * 1.5), xytext=(-4, 0),
                      textcoords="offset points", ha="right", fontsize=9, color=CONFIRMED, fontweight="bold")
    p_ax.set_ylabel("p-value (log)")
    fig.suptitle(f"Drift of {model_name} version {version}: {len(windows)} windows of {window_s:g} s; "
                 f"confirmed after {windows_required} drifted windows in a row", fontsize=11)

    mmd_ax.bar([centres[w.start] for w in scored], [w.mmd2 or 0.0 for w in scored], width=window_s * 0.6 / 86400,
               color=[DRIFTED if w.drift else OK_COLOUR for w in scored], zorder=2)
    mmd_ax.axhline(0, color="#999", linewidth=0.8)
    mmd_ax.set_ylabel("MMD²")
    locator = mdates.AutoDateLocator()
    mmd_ax.xaxis.set_major_locator(locator)
    mmd_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    mmd_ax.set_xlim(when(span[0]), when(span[1]))
    mmd_ax.set_xlabel("window (UTC)")
    for ax in (p_ax, mmd_ax):
        ax.spines[["top", "right"]].set_visible(False)
    fig.legend(handles=[
        Line2D([], [], marker="o", linestyle="", color=OK_COLOUR, label=f"no drift (p ≥ {alpha:g})"),
        Line2D([], [], marker="o", linestyle="", color=DRIFTED, label=f"drifted window (p < {alpha:g})"),
        Line2D([], [], color=CONFIRMED, linestyle="--", label="drift confirmed"),
        Line2D([], [], marker="x", linestyle="", color=INSUFFICIENT_COLOUR, label="too few samples"),
        *[Patch(color=BAND_COLOURS[i % len(BAND_COLOURS)], label=f"v{b.version} serving") for i, b in enumerate(shown)],
    ], loc="outside right center", fontsize=8, frameon=False)
    timeline = Timeline(model_name=model_name, version=version, alpha=alpha, windows_required=windows_required,
                        window_s=window_s, windows=[w.start for w in windows], drifted=[w.start for w in drifted],
                        confirmed=[w.start for w in confirmed], insufficient=[w.start for w in insufficient],
                        bands=shown)
    return fig, timeline


def log_timeline(client: MlflowClient, settings: Settings, run) -> Timeline:
    """Draw the monitoring ``run``'s windows and log the PNG and what it marked on the run."""
    tags = run.data.tags
    name, version = tags["drift.model_name"], tags["drift.model_version"]
    fig, timeline = draw(read_windows(client, run.info.run_id), serving_bands(client, settings, name),
                         model_name=name, version=version, alpha=settings.drift.alpha,
                         windows_required=settings.drift.windows, window_s=settings.drift.window_s)
    png = io.BytesIO()
    fig.savefig(png, format="png", facecolor="white")
    with tempfile.TemporaryDirectory(prefix="timeline-") as tmp:
        for artifact, data in ((artifacts.DRIFT_TIMELINE, png.getvalue()),
                               (artifacts.DRIFT_TIMELINE_DATA, json.dumps(asdict(timeline), indent=1).encode())):
            folder, file = artifact.rsplit("/", 1)
            (Path(tmp) / file).write_bytes(data)
            client.log_artifact(run.info.run_id, str(Path(tmp) / file), folder)
    return timeline
