"""The timetable and a scheduler crash, through the real scheduler: runs the cron starts, one at a time,
and a scheduler killed mid-training that comes back and finishes the run from its checkpoint.

The cron is set to every minute through its setting (``RETRAIN_SCHEDULE``), and the deployment's
defaults make the scheduled run train long enough to span several ticks (and a kill). Train runs as two
processes (``RETRAIN_TRAIN_PROCS=2``: torchrun, DDP over gloo), as a machine with two GPUs would run it, so
the kill takes a launcher and its ranks, and the resumed run is a distributed one.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from retrain.waiting import poll
from tests.e2e.conftest import QUIET_DEPLOYS, SMALL_RUNS, started_stack

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]
RETRAIN = "retrain_embedder"


@pytest.fixture(scope="module")
def running(tmp_path_factory, digits_root):
    env = {**SMALL_RUNS, **QUIET_DEPLOYS, "RETRAIN_SCHEDULE": "* * * * *", "RETRAIN_MONITOR_SCHEDULE": "0 0 1 1 *",
           "RETRAIN_EPOCHS": "24", "RETRAIN_IMAGE_SIZE": "64", "RETRAIN_CHECKPOINT_EVERY_STEPS": "0",
           "RETRAIN_TRAIN_PROCS": "2",
           "RETRAIN_DATA_URI": digits_root.as_uri()}
    with started_stack(tmp_path_factory.mktemp("schedule"), env) as stack:
        yield stack


def at(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def scheduled(running) -> list[dict]:
    return running.api.runs(RETRAIN, "scheduled")


def test_the_scheduler_creates_a_scheduled_run_within_a_minute_of_unpausing(running):
    assert scheduled(running) == []  # parsed but paused: nothing runs, and unpausing starts no missed slot
    unpaused = time.time()
    running.api.set_paused(RETRAIN, False)
    run = running.api.wait_for_new_run(RETRAIN, "scheduled", set(), timeout_s=90)
    assert at(run["queued_at"]) - unpaused <= 75  # the next minute's tick, plus the scheduler's loop
    assert run["triggered_by"] == "timetable"


def test_a_scheduler_killed_mid_training_comes_back_and_the_run_resumes_from_its_checkpoint(running):
    """SIGKILL to the scheduler's whole process tree (executor workers, the task, the stage) while train runs."""
    from embedder import checkpoint

    api, settings = running.api, running.settings
    [run] = scheduled(running)
    manifest = Path(checkpoint.run_location(settings.checkpoint_root, RETRAIN, run["dag_run_id"])
                    .removeprefix("file://")) / "latest.json"

    def checkpointed() -> bool:  # the manifest is written when training begins; a checkpoint is listed in it
        return manifest.exists() and bool(json.loads(manifest.read_text())["checkpoints"])

    poll(lambda: api.task_instances(RETRAIN, run["dag_run_id"])["train"]["state"] == "running" and checkpointed(),
         timeout_s=240, what="train running with a checkpoint saved")
    killed = running.stack.kill("scheduler")
    assert len(killed) >= 4  # the scheduler, its executor workers, the task's process, the stage
    running.stack.start("scheduler")

    final = api.wait_for_run(RETRAIN, run["dag_run_id"], timeout_s=600)
    assert final["state"] == "success"
    train = api.task_instances(RETRAIN, run["dag_run_id"])["train"]
    assert train["try_number"] >= 2  # the orphaned try was reset and run again
    result = api.xcom(RETRAIN, run["dag_run_id"], "train")
    assert result["resumed"] is True
    client = MlflowClient(settings.tracking_uri)
    training = client.get_run(result["mlflow_run_id"])
    assert int(training.data.tags["resume.count"]) >= 1 and int(training.data.tags["resume.from_step"]) > 0
    assert training.data.params["world_size"] == "2"  # both ranks trained, before and after the kill
    for key in ("batch_loss", "train_loss", "val_accuracy", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(training.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), f"{key} logged a step twice: {steps}"
    assert len(client.get_metric_history(training.info.run_id, "train_loss")) == 24  # every epoch, once


def test_no_second_scheduled_run_starts_while_the_first_runs(running):
    api = running.api
    first = scheduled(running)[0]
    assert at(first["end_date"]) - at(first["start_date"]) > 60  # the cron ticked while it ran
    second = api.wait_for_new_run(RETRAIN, "scheduled", {first["dag_run_id"]}, timeout_s=90)
    second = api.wait_for_run(RETRAIN, second["dag_run_id"], timeout_s=120)
    api.set_paused(RETRAIN, True)  # (a paused DAG's runs stop being scheduled: pause only once it is done)
    assert at(second["start_date"]) >= at(first["end_date"])  # max_active_runs=1: it waited for the first
    assert second["state"] == "success" and second["note"].startswith("No retrain:")
    runs = sorted(scheduled(running), key=lambda r: at(r["start_date"]))
    for earlier, later in itertools.pairwise(runs):
        assert at(later["start_date"]) >= at(earlier["end_date"]), (earlier, later)
