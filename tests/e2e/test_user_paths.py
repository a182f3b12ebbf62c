"""The paths users take, through the real components on free ports, driven only by public interfaces.

One local stack (``localdev.stack``: MLflow, serving, Airflow's API server, scheduler, DAG processor and
triggerer) serves the whole module; every run is created by the scheduler or through the REST API
or the Trigger form in headless Chromium, never by ``airflow dags test``. The tests run in order and
build on each other's state, as a user's session would.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from retrain import rollout
from retrain_contract import artifacts
from retrain_contract.registry import alias_version
from retrain_contract.results import PromoteResult
from tests.e2e.conftest import QUIET_DEPLOYS, REPO, SMALL_RUNS, airflow_page, started_stack

pytestmark = pytest.mark.e2e
RETRAIN, MONITOR = "retrain_embedder", "monitor_drift"
MODEL = "image-embedder"
NEVER = "0 0 1 1 *"  # the schedules stay out of the way: these tests start every run themselves


@pytest.fixture(scope="module")
def running(tmp_path_factory, digits_root):
    home = tmp_path_factory.mktemp("user-paths")
    shutil.copytree(digits_root, home / "data")  # the default data root, $RETRAIN_HOME/data: tests change it
    env = {**SMALL_RUNS, **QUIET_DEPLOYS, "RETRAIN_EPOCHS": "2", "RETRAIN_SCHEDULE": NEVER, "RETRAIN_MONITOR_SCHEDULE": NEVER,
           "RETRAIN_DRIFT_WINDOW_S": "60", "RETRAIN_DRIFT_WINDOWS": "2", "RETRAIN_DRIFT_MIN_SAMPLES": "40",
           "RETRAIN_DRIFT_PERMUTATIONS": "300", "RETRAIN_DRIFT_COOLDOWN_H": "0", "RETRAIN_TASK_RETRIES": "1",
           "RETRAIN_RETRY_DELAY_S": "1", "RETRAIN_DEPLOY_TIMEOUT_S": "120",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with started_stack(home, env) as stack:
        for dag_id in (RETRAIN, MONITOR):
            stack.api.set_paused(dag_id, False)
        yield stack


def finished(running, dag_id: str, created: dict) -> dict:
    return running.api.wait_for_run(dag_id, created["dag_run_id"])


def states(running, dag_id: str, run: dict) -> dict[str, str | None]:
    return {task: ti["state"] for task, ti in running.api.task_instances(dag_id, run["dag_run_id"]).items()}


def log_events(running, dag_id: str, run: dict, task: str, try_number: int = 1) -> list[tuple[str, str]]:
    """(level, text) of each line of a task's log, as the UI's default view shows them."""
    return [(str(e.get("level")), str(e.get("event"))) for e in running.api.log(dag_id, run["dag_run_id"], task,
                                                                                try_number)]


def alerts(running) -> list[dict]:
    path = Path(running.settings.alert_file)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def model_versions(running) -> list[str]:
    client = MlflowClient(running.settings.tracking_uri)
    return sorted(mv.version for mv in client.search_model_versions(f"name = '{MODEL}'"))


def test_a_run_triggered_through_the_rest_api_trains_promotes_and_serves(running):
    small = {"epochs": 2, "image_size": 32, "batch_size": 32, "architecture": "resnet18"}
    run = finished(running, RETRAIN, running.api.trigger(RETRAIN, small))
    assert (run["state"], run["run_type"], run["triggered_by"]) == ("success", "manual", "rest_api")
    assert set(states(running, RETRAIN, run).values()) == {"success"}
    promotion = running.api.xcom(RETRAIN, run["dag_run_id"], "promote")
    assert (promotion["version"], promotion["promoted"]) == ("1", True)
    assert run["note"] == "Retrained (there is no champion model yet). Promoted: version 1: no champion yet: " \
                          "the first model is promoted Serving: version 1 (switched)."

    meta = requests.get(f"{running.settings.serving_url}/metadata", timeout=10).json()
    assert (meta["model_version"], meta["ready"]) == ("1", True)
    image = running.settings.home / "data" / "test" / "three" / "0143.png"
    body = requests.post(f"{running.settings.serving_url}/embed", files={"file": image.open("rb")}, timeout=30).json()
    assert body["dim"] == len(body["embedding"]) == 512  # resnet18
    assert math.sqrt(sum(x * x for x in body["embedding"])) == pytest.approx(1.0, abs=1e-4)

    # Each task's extra links, resolved from its result: they name what that run made.
    train = running.api.xcom(RETRAIN, run["dag_run_id"], "train")
    links = {task: running.api.extra_links(RETRAIN, run["dag_run_id"], task) for task in ("train", "promote", "deploy")}
    assert links["train"]["MLflow run"] == (f"{running.settings.tracking_uri}/#/experiments/"
                                            f"{train['mlflow_experiment_id']}/runs/{train['mlflow_run_id']}")
    assert links["promote"]["Model version"] == f"{running.settings.tracking_uri}/#/models/{MODEL}/versions/1"
    assert requests.get(links["deploy"]["Serving"], timeout=10).json()["model_version"] == "1"
    rollout_run = links["deploy"]["Rollout record"].rsplit("/", 1)[1]
    assert MlflowClient(running.settings.tracking_uri).get_run(rollout_run).data.tags["serving.model_version"] == "1"

    # What the Model version button opens: the card, made by this Airflow run, linking the report on the training run.
    client = MlflowClient(running.settings.tracking_uri)
    card = client.get_model_version(MODEL, "1").description
    assert card.startswith(f"## {MODEL} version 1: promoted to `@champion`")
    assert f"Made by Airflow run [`{run['dag_run_id']}`]({running.settings.airflow_run_url(RETRAIN, run['dag_run_id'])})" \
        in card
    report = {f.path for f in client.list_artifacts(train["mlflow_run_id"], artifacts.REPORT_DIR)}
    assert {f"{artifacts.REPORT_DIR}/{name}" for name in artifacts.REPORT_FIGURES} | {artifacts.REPORT_PAGE} <= report
    assert running.settings.mlflow_artifact_url(train["mlflow_experiment_id"], train["mlflow_run_id"],
                                                artifacts.REPORT_PAGE) in card

    # Logs that read well: MLflow's registry messages at INFO, no error line in a run that succeeded,
    # no repeated dataset warning.
    promote_log = log_events(running, RETRAIN, run, "promote")
    assert ("info", "Successfully registered model 'image-embedder'.") in promote_log
    for task in ("check_drift", "prepare_data", "train", "evaluate", "promote", "deploy"):
        lines = log_events(running, RETRAIN, run, task)
        assert not [text for level, text in lines if level in ("error", "critical")], task
        assert not [text for _, text in lines if "interpreted in multiple ways" in text], task


def test_a_plain_run_with_a_champion_skips_says_why_and_reads_differently_in_the_runs_list(running):
    run = finished(running, RETRAIN, running.api.trigger(RETRAIN))
    assert run["state"] == "success"
    reason = "champion version 1 is serving and no drift window scored yet for version 1"
    assert run["note"].startswith(f"No retrain: {reason}")
    assert states(running, RETRAIN, run) == {"check_drift": "success", **dict.fromkeys(
        ("prepare_data", "train", "evaluate", "promote", "deploy"), "skipped")}
    # The reason is at INFO in the default view: before the collapsed "Post Execute" group.
    lines = [text for _, text in log_events(running, RETRAIN, run, "check_drift")]
    said = next(i for i, text in enumerate(lines) if text.startswith(f"no retrain, skipping the rest of the run: {reason}"))
    assert said < lines.index("::group::Post Execute")
    notes = {r["dag_run_id"]: r["note"] for r in running.api.runs(RETRAIN)}
    assert notes[run["dag_run_id"]].startswith("No retrain:")
    assert sum(note.startswith("Retrained") for note in notes.values()) == 1


def test_the_trigger_form_submits_its_defaults_and_names_a_refused_value(running, browser, pages):
    api = running.api
    page = airflow_page(browser, running, f"/dags/{RETRAIN}")
    pages.append(page)
    known = {r["dag_run_id"] for r in api.runs(RETRAIN)}
    page.get_by_test_id("trigger-dag-button").click()
    submit = page.get_by_test_id("trigger-dag-submit")
    submit.wait_for()
    assert submit.is_enabled()  # every default is valid, and the optional Param may be empty
    assert page.locator("#element_pretrained_weights").get_attribute("required") is None
    submit.click()
    created = api.wait_for_new_run(RETRAIN, "manual", known, timeout_s=60)
    assert created["triggered_by"] == "ui"
    run = finished(running, RETRAIN, created)
    assert run["state"] == "success" and run["note"].startswith("No retrain:")

    page.goto(f"{running.settings.airflow_url}/dags/{RETRAIN}")  # the submit opened the new run's page
    known = {r["dag_run_id"] for r in api.runs(RETRAIN)}
    page.get_by_test_id("trigger-dag-button").click()
    page.locator('input[name="element_epochs"]').fill("2.5")  # the form lets a fraction through
    page.get_by_test_id("trigger-dag-submit").click()
    alert = page.get_by_test_id("error-alert")
    alert.wait_for()
    assert "Param 'epochs' (Epochs) must be an integer from 1 to 500; got 2.5" in alert.inner_text().splitlines()
    assert {r["dag_run_id"] for r in api.runs(RETRAIN)} == known  # nothing was created


def test_the_mlflow_link_on_train_opens_the_runs_page_in_mlflow(running, browser, pages):
    first = running.api.runs(RETRAIN)[0]
    train = running.api.xcom(RETRAIN, first["dag_run_id"], "train")
    page = airflow_page(browser, running, f"/dags/{RETRAIN}/runs/{quote(first['dag_run_id'])}/tasks/train/details")
    pages.append(page)
    link = page.get_by_role("link", name="MLflow run")
    with page.context.expect_page() as opened:
        link.click()
    mlflow_page = opened.value
    pages.append(mlflow_page)
    mlflow_page.get_by_text(f"train {first['dag_run_id']}").first.wait_for()
    assert train["mlflow_run_id"] in mlflow_page.url
    assert mlflow_page.title() == f"Run {train['mlflow_run_id']} - MLflow"


def readme_blocks(marker: str) -> list[str]:
    """The README's shell blocks that follow ``<!-- tested: marker -->``."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(rf"<!-- tested: {re.escape(marker)} -->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert blocks, f"README has no block marked <!-- tested: {marker} -->"
    return blocks


SEPARATOR = "--- next README command ---"


def run_readme_block(running, block: str, extra_env: dict[str, str] | None = None) -> list[str]:
    """Run a README block in one shell, as its reader would, pointed at this test's stack; each command's output."""
    s = running.settings
    script = (block.replace("http://127.0.0.1:8080", s.serving_url).replace("http://127.0.0.1:8081", s.airflow_url)
              .replace("http://127.0.0.1:5000", s.tracking_uri).replace(".retrain/demo/", f"{s.home}/"))
    commands = [c.split("  # ")[0].strip() for c in re.split(r"(?<!\\)\n", script.strip())]
    commands = [c for c in commands if c and not c.startswith("#")]
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", f"\necho '{SEPARATOR}'\n".join(commands)],
                          capture_output=True, text=True, timeout=120, env={**running.env, **(extra_env or {})}, cwd=REPO)
    assert proc.returncode == 0, f"a README command failed:\n{script}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.split(f"{SEPARATOR}\n")


def test_the_readme_serving_examples_work_as_written(running):
    embed, batch, similar, metadata, metrics = run_readme_block(running, readme_blocks("serving examples")[0])
    served = json.loads(metadata)
    assert len(json.loads(embed)["embedding"]) == served["embedding_dim"]
    assert len(json.loads(batch)["embeddings"]) == 2
    assert len(json.loads(similar)["results"][0]["neighbors"]) == 5
    assert "embedder_http_requests_total" in metrics


def test_the_readme_rest_api_example_triggers_a_run(running):
    known = {r["dag_run_id"] for r in running.api.runs(RETRAIN)}
    _, out = run_readme_block(running, readme_blocks("airflow rest examples")[0],
                              {"AIRFLOW_PASSWORD": running.stack.admin_password})
    created = json.loads(out)
    assert created["dag_run_id"] not in known and created["conf"]["force_retrain"] is True
    assert finished(running, RETRAIN, created)["state"] == "success"


def embed_all(running, paths: list[Path]) -> np.ndarray:
    rows = []
    for path in paths:
        with path.open("rb") as fh:
            rows.append(requests.post(f"{running.settings.serving_url}/embed", files={"file": (path.name, fh, "image/png")},
                                      timeout=30).json()["embedding"])
    return np.asarray(rows, dtype=np.float32)


def test_confirmed_drift_makes_the_scheduler_start_a_retrain_that_promotes(running, tmp_path):
    """monitor_drift, run by the scheduler on embeddings the serving process returned for shifted images,
    updates the drift Asset; the scheduler itself then creates the retrain_embedder run (asset-triggered)."""
    from embedder import demo_data
    from retrain_contract import storage

    api, settings = running.api, running.settings
    champion = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()["model_version"]
    data = settings.home / "data"
    test_images = sorted((data / "test").rglob("*.png"))[:60]
    shifted = []
    for path in test_images:
        target = tmp_path / f"shifted-{path.parent.name}-{path.name}"
        target.write_bytes(demo_data.shifted_png(path.read_bytes()))
        shifted.append(target)
    same, moved = embed_all(running, test_images), embed_all(running, shifted)
    start = int(time.time()) // 60 * 60 - 600
    for i, rows in enumerate([same, moved, moved]):  # three closed windows, as the serving sampler writes them
        buffer = io.BytesIO()
        np.save(buffer, rows)
        storage.write_bytes(storage.join(settings.drift.sample_uri, MODEL, f"v{champion}", f"window={start + 60 * i}",
                                         "serving-1.npy"), buffer.getvalue())
    demo_data.add_shifted(data.as_uri())  # the labelled data of the new look arrives too
    alerts_before = len(alerts(running))
    known = {r["dag_run_id"] for r in api.runs(RETRAIN)}

    monitor = finished(running, MONITOR, api.trigger(MONITOR))
    assert monitor["state"] == "success"
    report = api.xcom(MONITOR, monitor["dag_run_id"], "score_windows")
    assert (report["state"], report["confirmed"], report["champion"]) == ("drift", True, champion)
    assert states(running, MONITOR, monitor)["emit_drift_event"] == "success"
    [alert] = alerts(running)[alerts_before:]
    assert alert["kind"] == "drift" and alert["fields"]["model_version"] == champion
    timeline = MlflowClient(settings.tracking_uri).list_artifacts(report["monitoring_run_id"], "drift")
    assert artifacts.DRIFT_TIMELINE in {f.path for f in timeline}
    assert alert["fields"]["drift_timeline"].endswith(f"/runs/{report['monitoring_run_id']}/artifacts/{artifacts.DRIFT_TIMELINE}")

    created = api.wait_for_new_run(RETRAIN, "asset_triggered", known, timeout_s=120)
    assert created["triggered_by"] == "asset"
    run = finished(running, RETRAIN, created)
    assert run["state"] == "success"
    decision = api.xcom(RETRAIN, run["dag_run_id"], "check_drift")
    assert decision["reason"].startswith(f"drift confirmed for champion version {champion}: p < 0.01 in each of the "
                                         "last 2 windows")
    promotion = api.xcom(RETRAIN, run["dag_run_id"], "promote")
    assert promotion["promoted"] is True and promotion["previous_champion"] == champion
    assert requests.get(f"{settings.serving_url}/metadata", timeout=10).json()["model_version"] == promotion["version"]


def test_a_run_that_fails_before_evaluation_registers_nothing_and_alerts_once(running):
    data = running.settings.home / "data"
    versions, alerts_before = model_versions(running), len(alerts(running))
    data.rename(data.with_name("data-away"))
    try:
        run = finished(running, RETRAIN, running.api.trigger(RETRAIN, {"force_retrain": True}))
    finally:
        data.with_name("data-away").rename(data)
    assert run["state"] == "failed"
    prepare = running.api.task_instances(RETRAIN, run["dag_run_id"])["prepare_data"]
    assert (prepare["state"], prepare["try_number"]) == ("failed", 1)  # bad input: not retried
    lines = [text for _, text in log_events(running, RETRAIN, run, "prepare_data")]
    assert any(f"data root {data.as_uri()}: not a directory" in text for text in lines)
    assert model_versions(running) == versions
    assert [(a["kind"], a["fields"]["task_id"]) for a in alerts(running)[alerts_before:]] == [("task_failed", "prepare_data")]
    assert run["note"] == "Retrained (force_retrain was set on this run). The run failed before promotion."


def test_an_mlflow_outage_trains_nothing_retries_the_decision_and_alerts_once(running):
    alerts_before = len(alerts(running))
    running.stack.stop("mlflow")
    try:
        run = finished(running, RETRAIN, running.api.trigger(RETRAIN))
    finally:
        running.stack.start("mlflow")
    assert run["state"] == "failed"
    tis = running.api.task_instances(RETRAIN, run["dag_run_id"])
    assert (tis["check_drift"]["state"], tis["check_drift"]["try_number"]) == ("failed", 2)  # one retry
    assert tis["prepare_data"]["state"] in ("upstream_failed", None)
    assert [(a["kind"], a["fields"]["task_id"]) for a in alerts(running)[alerts_before:]] == [("task_failed", "check_drift")]


def test_a_version_that_never_gets_ready_is_rejected_at_its_preview_and_alerts_once(running):
    import dataclasses

    from tests.support.models import register_unloadable

    settings = dataclasses.replace(running.settings, deploy_timeout_s=6)
    client = MlflowClient(settings.tracking_uri)
    serving = alias_version(client, MODEL, "champion")
    broken = register_unloadable(client, MODEL, running.settings.home)
    client.set_registered_model_alias(MODEL, "champion", broken)  # as promote would
    alerts_before = len(alerts(running))
    promotion = PromoteResult(model_name=MODEL, version=broken, champion=broken, promoted=True,
                              previous_champion=serving, reason="a version that never serves", recall_at_1=0.5,
                              dataset_version="d").to_json()
    with pytest.raises(rollout.RolloutFailed, match=f"the preview of {MODEL} version {broken} failed: the preview did "
                                                    f"not serve {MODEL} version {broken} within 6s") as failed:
        rollout.roll_out_champion(settings, promotion, "manual__bad", client=client)
    assert failed.value.gate == "preview"
    record = json.loads(Path(settings.serving_state_uri.removeprefix("file://")).read_text())
    assert (record["model_version"], record["preview"]) == (serving, None)  # clients never saw it; preview dropped
    assert alias_version(client, MODEL, "champion") == serving
    assert [a["kind"] for a in alerts(running)[alerts_before:]] == ["analysis"]
    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    assert (meta["model_version"], meta["ready"]) == (serving, True)
