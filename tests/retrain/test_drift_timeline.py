"""The drift timeline: what it marks is what the monitor decided, for the demo's second act and by construction."""

from __future__ import annotations

import io
import json
import math
import random
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.dates import date2num
from mlflow import MlflowClient
from PIL import Image

from localdev.demo import DEMO_SETTINGS, TRAFFIC_PER_WINDOW
from retrain import drift_timeline, monitor
from retrain.drift_timeline import Band, WindowScores
from retrain.rollout.history import record_serving
from retrain.settings import Settings
from retrain_contract import artifacts
from tests.helpers import check_figure
from tests.support.samples import MODEL, serve, write_window


def pixels(png: bytes) -> np.ndarray:
    """A stand-in for the served model's embedding: the image's 8x8 grey levels as a unit vector."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((8, 8)), dtype=np.float64).ravel()
    return grey / np.linalg.norm(grey)


@pytest.fixture
def second_act(digits_root, mlflow_sqlite, tmp_path):
    """The demo's deployment (its drift settings), a champion whose reference is the test split, serving since now."""
    from embedder import demo_data

    settings = Settings.from_env({**DEMO_SETTINGS, "RETRAIN_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_sqlite})
    client = MlflowClient()
    test_images = sorted((digits_root / "test").rglob("*.png"))
    reference = np.stack([pixels(p.read_bytes()) for p in test_images])
    mlflow.set_experiment(settings.experiment)
    with mlflow.start_run(tags={"stage": "train"}) as run:
        np.save(tmp_path / "reference.npy", reference)
        mlflow.log_artifact(str(tmp_path / "reference.npy"), artifacts.REFERENCE_ARTIFACT.rsplit("/", 1)[0])
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", "1")
    record_serving(client, settings, model_name=MODEL, version="1", outcome="rolled_out", revision=1,
                   airflow_run_id="manual__1")
    serve(settings, "1")
    # Traffic as the demo sends it: a shuffled draw of the test split, then the same digits in the new look.
    random.Random(0).shuffle(test_images)
    same = np.stack([pixels(p.read_bytes()) for p in test_images[:TRAFFIC_PER_WINDOW]])
    shifted = np.stack([pixels(demo_data.shifted_png(p.read_bytes())) for p in test_images[:TRAFFIC_PER_WINDOW]])
    return settings, client, same, shifted


def test_the_demo_s_second_act_marks_the_windows_the_monitor_found_drifted_and_where_it_confirmed(second_act):
    settings, client, same, shifted = second_act
    window = int(settings.drift.window_s)
    t0 = int(math.ceil(datetime.now(UTC).timestamp() / window) * window)  # after the rollout: inside its band
    done = lambda n: artifacts.window_complete_at(t0 + window * (n - 1), window)  # noqa: E731
    for i, rows in enumerate([same, same]):  # act 2, step 6: in-distribution traffic, two windows
        write_window(settings, t0 + window * i, rows)
    calm = monitor.monitor_once(settings, client, now=done(2))
    for i, rows in enumerate([shifted, shifted], start=2):  # step 7: the traffic shifts to the new look
        write_window(settings, t0 + window * i, rows)
    shift = monitor.monitor_once(settings, client, now=done(4))
    assert (calm["confirmed"], calm["scored"]) == (False, [t0, t0 + window])
    assert (shift["confirmed"], shift["scored"]) == (True, [t0 + 2 * window, t0 + 3 * window])

    run_id = shift["monitoring_run_id"]
    png = Path(client.download_artifacts(run_id, artifacts.DRIFT_TIMELINE, str(settings.home)))
    check_figure(png.read_bytes(), min_size=(600, 300))
    marked = json.loads(Path(client.download_artifacts(run_id, artifacts.DRIFT_TIMELINE_DATA, str(settings.home)))
                        .read_text())
    drifted_by_monitor = [m.step for m in client.get_metric_history(run_id, "drift") if m.value == 1]
    assert marked["windows"] == calm["scored"] + shift["scored"]
    assert marked["drifted"] == drifted_by_monitor == shift["scored"]  # each shifted window, no calm one
    assert marked["confirmed"] == [shift["scored"][-1]]  # where the monitor's run confirmed drift
    assert [b["version"] for b in marked["bands"]] == ["1"] and marked["bands"][0]["end"] == t0 + 4.5 * window
    assert (marked["alpha"], marked["windows_required"]) == (settings.drift.alpha, settings.drift.windows)

    run = client.get_run(run_id)
    [alert] = [json.loads(line) for line in Path(settings.alert_file).read_text().splitlines()]
    assert alert["title"] == f"drift confirmed for {MODEL} version 1"
    assert alert["fields"]["drift_timeline"] == settings.mlflow_artifact_url(run.info.experiment_id, run_id,
                                                                              artifacts.DRIFT_TIMELINE)


def test_the_drawing_marks_drifted_windows_confirmations_and_clipped_serving_bands():
    start, w = 1_800_000_000, 60
    windows = [WindowScores(start, 0.4, 0.001, False, False, False),
               WindowScores(start + w, None, None, False, True, False),
               WindowScores(start + 2 * w, 0.003, 0.05, True, False, False),
               WindowScores(start + 3 * w, 0.003, 0.06, True, False, True),
               WindowScores(start + 4 * w, 0.2, 0.0, False, False, False)]
    bands = [Band("1", start - 10_000, start - 5_000),  # over before the first window: not drawn
             Band("2", start - 100, start + 2.5 * w), Band("3", start + 2.5 * w, None)]
    fig, drawn = drift_timeline.draw(windows, bands, model_name="m", version="2", alpha=0.01, windows_required=2,
                                     window_s=w)
    assert drawn.drifted == [start + 2 * w, start + 3 * w]
    assert drawn.confirmed == [start + 3 * w]
    assert drawn.insufficient == [start + w]
    assert drawn.bands == [Band("2", start - w / 2, start + 2.5 * w), Band("3", start + 2.5 * w, start + 5.5 * w)]

    p_ax = fig.axes[0]
    red = [p for p in p_ax.patches if to_hex(p.get_facecolor(), keep_alpha=False) == drift_timeline.DRIFTED]
    assert sorted(round(p.get_x(), 6) for p in red) == [round(date2num(datetime.fromtimestamp(s, UTC)), 6)
                                                        for s in drawn.drifted]
    dashed = [line for line in p_ax.lines if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in dashed] == [datetime.fromtimestamp(start + 4 * w, UTC)]
    assert p_ax.get_yscale() == "log"
    assert [line.get_ydata()[0] for line in p_ax.lines if line.get_linestyle() == "-" and len(line.get_ydata()) == 2
            and line.get_ydata()[0] == line.get_ydata()[1]] == [0.01]  # the threshold
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    check_figure(buffer.getvalue(), min_size=(600, 300))


def test_nothing_to_draw_is_refused():
    with pytest.raises(ValueError, match="needs at least one scored window"):
        drift_timeline.draw([], [], model_name="m", version="1", alpha=0.01, windows_required=2, window_s=60)
