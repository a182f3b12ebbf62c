"""Checkpoints, resume and preemption of the train stage.

The stage runs as the real ``python -m embedder.train`` process and is killed for real (SIGKILL,
SIGTERM). Reproducibility is checked bit for bit: with ``--deterministic`` on the CPU, a run that
was interrupted and resumed ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from embedder import checkpoint
from embedder.checkpoint import CheckpointStore
from retrain.waiting import poll
from retrain_contract import storage

EXIT_PREEMPTED = 75
# resnet18 at 32 px, 4 epochs of 35 batches of 8 (280 training images), on one thread.
TRAIN_ARGS = ["--experiment", "ckpt", "--architecture", "resnet18", "--image-size", "32", "--epochs", "4",
              "--batch-size", "8", "--deterministic", "--threads", "1", "--num-workers", "0",
              "--log-every-steps", "5", "--airflow-dag-id", "retrain_embedder"]


# -- the store on its own (fast) ---------------------------------------------------------------


def small_state(step: int, version: str = "v1") -> dict:
    return {"dataset_version": version, "model": {"w": torch.full((64, 64), float(step))}, "step": step}


def saved_store(uri: str, steps=(10, 20), version: str = "v1") -> CheckpointStore:
    store = CheckpointStore(uri, keep_last=2)
    store.begin(version, "cfg", "run-1")
    for step in steps:
        store.save(small_state(step, version), global_step=step, epoch=0, batch=step)
    return store


def flip_one_bit(uri: str) -> None:
    data = bytearray(storage.read_bytes(uri))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(uri, bytes(data))


def test_run_location_is_keyed_by_dag_and_run_and_portable(tmp_path):
    uri = checkpoint.run_location(tmp_path.as_uri(), "retrain_embedder", "scheduled__2026-11-22T02:00:00+00:00")
    assert uri == (tmp_path / "retrain_embedder" / "scheduled__2026-11-22T02_00_00_00_00").as_uri()
    assert checkpoint.run_location("s3://b/ckpt", "d", "manual__x") == "s3://b/ckpt/d/manual__x"


def test_manifest_keeps_the_last_k_and_the_best(tmp_path):
    store = CheckpointStore(tmp_path.as_uri(), keep_last=2)
    store.begin("v1", "cfg", "run-1")
    for step, metric in ((10, 0.5), (20, 0.9), (30, None), (40, 0.7), (50, None)):
        store.save(small_state(step), global_step=step, epoch=step // 10, batch=0, metric=metric)
    manifest = store.read_manifest()
    assert [r.name for r in manifest.checkpoints] == ["ckpt-000000050.pt", "ckpt-000000040.pt", "ckpt-000000020.pt"]
    assert manifest.best == "ckpt-000000020.pt"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == sorted(r.name for r in manifest.checkpoints)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_bit_flipped_latest_checkpoint_is_detected_and_the_previous_one_used(where, tmp_path, request, caplog):
    if where == "s3":
        direct, _ = request.getfixturevalue("s3")
        direct.create_bucket(Bucket="ckpt")
        uri = "s3://ckpt/retrain_embedder/run-1"
    else:
        uri = tmp_path.as_uri()
    store = saved_store(uri)
    flip_one_bit(storage.join(uri, "ckpt-000000020.pt"))

    restored = CheckpointStore(uri).restore("v1", "cfg")
    assert restored.record.name == "ckpt-000000010.pt"
    assert torch.equal(restored.state["model"]["w"], torch.full((64, 64), 10.0))
    assert "ckpt-000000020.pt skipped: sha256 mismatch" in restored.skipped[0]
    assert "the file is corrupt" in caplog.text
    assert store.manifest.mlflow_run_id == "run-1"


def files(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except storage.StorageError:  # S3: nothing left under the prefix
        return []


def test_a_finished_run_records_when_it_completed(tmp_path):
    store = saved_store(tmp_path.as_uri())
    before = datetime.now(UTC).replace(microsecond=0)
    store.complete({"model_uri": "models:/m-1"})
    manifest = CheckpointStore(tmp_path.as_uri()).read_manifest()
    assert manifest.completed == {"model_uri": "models:/m-1"}
    assert before <= datetime.fromisoformat(manifest.completed_at) <= datetime.now(UTC)
    assert manifest.completed_time() == datetime.fromisoformat(manifest.completed_at)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_retention_deletes_only_the_checkpoints_of_runs_finished_more_than_n_days_ago(where, tmp_path, request):
    if where == "s3":
        direct, _ = request.getfixturevalue("s3")
        direct.create_bucket(Bucket="ckpt")
        root = "s3://ckpt/checkpoints"
    else:
        root = (tmp_path / "checkpoints").as_uri()
    now = datetime.now(UTC)
    runs = {name: checkpoint.run_location(root, "retrain_embedder", name)
            for name in ("old", "recent", "unfinished", "legacy")}
    for uri in runs.values():
        saved_store(uri)
    CheckpointStore(runs["old"]).complete({"model_uri": "models:/m-old"}, at=now - timedelta(days=10))
    CheckpointStore(runs["recent"]).complete({"model_uri": "models:/m-recent"}, at=now - timedelta(days=2))
    # Finished before completion times were recorded: its newest checkpoint's time stands in for it.
    legacy = CheckpointStore(runs["legacy"]).read_manifest()
    legacy.completed = {"model_uri": "models:/m-legacy"}
    legacy.checkpoints = [r.__class__(**{**vars(r), "saved_at": (now - timedelta(days=9)).isoformat()})
                          for r in legacy.checkpoints]
    storage.write_bytes(storage.join(runs["legacy"], "latest.json"), legacy.to_json().encode())
    storage.write_bytes(storage.join(runs["legacy"], "ckpt-000000005.pt"), b"an orphan no manifest names")
    other_dag = checkpoint.run_location(root, "other_dag", "old")
    saved_store(other_dag).complete({"model_uri": "models:/m-other"}, at=now - timedelta(days=30))

    cleaned = checkpoint.delete_expired_checkpoints(checkpoint.dag_location(root, "retrain_embedder"),
                                                    older_than=timedelta(days=7))

    assert sorted(cleaned) == sorted([runs["old"], runs["legacy"]])
    for name in ("old", "legacy"):
        assert files(runs[name]) == ["latest.json"], name
        manifest = CheckpointStore(runs[name]).read_manifest()
        assert manifest.completed == {"model_uri": f"models:/m-{name}"}  # a retry still returns the result
        assert (manifest.checkpoints, manifest.best) == ([], None)
    for uri in (runs["recent"], runs["unfinished"], other_dag):
        assert files(uri) == ["ckpt-000000010.pt", "ckpt-000000020.pt", "latest.json"], uri
    assert CheckpointStore(runs["unfinished"]).restore("v1", "cfg").record.name == "ckpt-000000020.pt"
    # Nothing is ever deleted from a run that has not finished, even with no retention at all.
    assert checkpoint.delete_expired_checkpoints(checkpoint.dag_location(root, "retrain_embedder"),
                                                 older_than=timedelta(0)) == [runs["recent"]]
    assert files(runs["unfinished"]) == ["ckpt-000000010.pt", "ckpt-000000020.pt", "latest.json"]
    with pytest.raises(checkpoint.CheckpointError, match="has not finished"):
        CheckpointStore(runs["unfinished"]).delete_checkpoints()


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path, caplog):
    saved_store(tmp_path.as_uri())
    assert CheckpointStore(tmp_path.as_uri()).restore("v2", "cfg") is None
    assert "dataset version v1, this run trains on v2" in caplog.text
    assert CheckpointStore(tmp_path.as_uri()).restore("v1", "other-cfg") is None


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from embedder import checkpoint
    from retrain_contract import storage
    from embedder.checkpoint import CheckpointStore

    uri, moment = sys.argv[1], sys.argv[2]
    store = CheckpointStore(uri, keep_last=2)
    store.begin("v1", "cfg", "run-1")
    store.save({"dataset_version": "v1", "model": {"w": torch.full((64, 64), 10.0)}}, global_step=10, epoch=0, batch=10)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if moment == "object":  # the new object is complete on disk but not yet renamed into place
        os.replace = die
    else:  # the new object is in place; its manifest entry is not written yet
        store._write_manifest = die
    big = {"dataset_version": "v1", "model": {"w": torch.randn(2048, 2048)}}
    store.save(big, global_step=20, epoch=0, batch=20)
    print("not killed")
""")


@pytest.mark.parametrize("moment", ["object", "manifest"])
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(moment, tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLER, tmp_path.as_uri(), moment], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if moment == "manifest":
        assert leftovers == ["ckpt-000000010.pt", "ckpt-000000020.pt", "latest.json"]
    else:
        assert leftovers[0].startswith(".ckpt-000000020.pt.") and leftovers[0].endswith(".tmp")
        assert leftovers[1:] == ["ckpt-000000010.pt", "latest.json"]
    store = CheckpointStore(tmp_path.as_uri())
    restored = store.restore("v1", "cfg")
    assert restored.record.name == "ckpt-000000010.pt" and restored.skipped == []
    assert torch.equal(restored.state["model"]["w"], torch.full((64, 64), 10.0))
    # What the killed write left (a temporary file, or an object no manifest names) goes at the next save.
    store.save(small_state(30), global_step=30, epoch=1, batch=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000010.pt", "ckpt-000000030.pt", "latest.json"]


# -- the real stage, killed for real (training) ------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_root):
    """A private MLflow store and a prepared data snapshot, shared by the stage tests below."""
    home = tmp_path_factory.mktemp("ckpt")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    result = home / "prepare.json"
    subprocess.run([sys.executable, "-m", "embedder.prepare_data", "--data-uri", digits_root.as_uri(),
                    "--storage-uri", (home / "storage").as_uri(), "--experiment", "ckpt", "--result-path", str(result)],
                   env=env, cwd=home, check=True, capture_output=True, timeout=300)
    return home, env, json.loads(result.read_text())["manifest_uri"]


def train_cmd(workspace, run_id: str, *extra: str) -> tuple[list[str], Path]:
    home, _, manifest_uri = workspace
    result = home / f"{run_id}.json"
    return [sys.executable, "-m", "embedder.train", "--manifest-uri", manifest_uri, *TRAIN_ARGS,
            "--checkpoint-root", (home / "checkpoints").as_uri(), "--airflow-run-id", run_id,
            "--result-path", str(result), *extra], result


def train(workspace, run_id: str, *extra: str, expect: int = 0) -> tuple[dict | None, str]:
    home, env, _ = workspace
    cmd, result = train_cmd(workspace, run_id, *extra)
    proc = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return (json.loads(result.read_text()) if result.exists() else None), proc.stdout + proc.stderr


def store_of(workspace, run_id: str) -> CheckpointStore:
    home = workspace[0]
    return CheckpointStore(checkpoint.run_location((home / "checkpoints").as_uri(), "retrain_embedder", run_id))


def final_weights(workspace, run_id: str) -> dict[str, torch.Tensor]:
    store = store_of(workspace, run_id)
    manifest = store.read_manifest()
    final = max(manifest.checkpoints, key=lambda r: r.global_step)
    assert (final.epoch, final.batch) == (4, 0) and manifest.checkpoints[0] == final
    restored = store.restore(manifest.dataset_version, manifest.config)
    assert restored.record == final
    return restored.state["model"]


class Running:
    """A stage process started in the background; its output goes to a file, so it never blocks on a full pipe."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path, log: Path):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str, timeout: float = 300):
        """``condition()``'s first true value, polled while the process runs; fails naming ``what`` otherwise."""

        def check():
            value = condition()
            assert value or self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}: " \
                                                      f"{self.output()[-4000:]}"
            return value

        return poll(check, timeout_s=timeout, interval_s=0.01, what=what)


def start(workspace, run_id: str, *extra: str) -> Running:
    home, env, _ = workspace
    cmd, _ = train_cmd(workspace, run_id, *extra)
    return Running(cmd, env, home, home / f"{run_id}-{len(list(home.glob(f'{run_id}-*.log')))}.log")


def wait_for_checkpoint(store: CheckpointStore, stage: Running, epoch: int, timeout: float = 300):
    def saved():
        manifest = store.read_manifest()
        return manifest if manifest and any(r.epoch == epoch and r.batch == 0 for r in manifest.checkpoints) else None

    return stage.wait_until(saved, f"the end-of-epoch-{epoch} checkpoint", timeout)


def metric_steps(run_id: str, key: str, tracking_uri: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def reference(workspace):
    """An uninterrupted run: its result and final weights."""
    result, _ = train(workspace, "reference")
    return result, final_weights(workspace, "reference")


@pytest.mark.training
@pytest.mark.scenario
def test_sigkill_after_epoch_2_of_4_resumes_to_the_uninterrupted_weights(workspace, reference):
    _, env, _ = workspace
    stage = start(workspace, "killed", "--checkpoint-every-steps", "0")
    manifest = wait_for_checkpoint(store_of(workspace, "killed"), stage, epoch=2)
    stage.proc.send_signal(signal.SIGKILL)
    stage.proc.wait(30)
    run_id = manifest.mlflow_run_id
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status == "RUNNING"  # died without a word

    result, out = train(workspace, "killed", "--checkpoint-every-steps", "0")
    assert result["resumed"] and result["mlflow_run_id"] == run_id
    assert "resuming from" in out and "epoch 3, batch 0, global step 70" in out
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["resume.count"], run.data.tags["resume.from_step"]) == ("1", "70")
    # Every step once: the epochs killed mid-way are recomputed but not logged again.
    assert metric_steps(run_id, "train_loss", env["MLFLOW_TRACKING_URI"]) == [1, 2, 3, 4]
    assert metric_steps(run_id, "batch_loss", env["MLFLOW_TRACKING_URI"]) == list(range(5, 141, 5))
    # Bit for bit the weights of the run that was never interrupted.
    expected = reference[1]
    weights = final_weights(workspace, "killed")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert result["final_train_loss"] == pytest.approx(reference[0]["final_train_loss"], abs=0)


@pytest.mark.training
@pytest.mark.scenario
def test_sigterm_mid_epoch_saves_a_checkpoint_and_the_next_start_resumes_from_it(workspace, reference):
    _, env, _ = workspace
    stage = start(workspace, "preempted", "--checkpoint-every-steps", "0", "--progress-every-steps", "1")
    store = store_of(workspace, "preempted")
    wait_for_checkpoint(store, stage, epoch=1)
    # Mid-way through the second epoch: its second step is done (a progress line every step says so).
    stage.wait_until(lambda: "epoch 2/4 step 2/35 " in stage.output(), "step 2 of epoch 2")
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.proc.wait(120) == EXIT_PREEMPTED, stage.output()[-4000:]
    out = stage.output()
    assert "SIGTERM received: saving a checkpoint and stopping" in out
    manifest = store.read_manifest()
    newest = manifest.checkpoints[0]
    assert newest.epoch == 1 and 0 < newest.batch < 35, newest  # mid-way through the second epoch
    assert manifest.preemptions == 1
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(manifest.mlflow_run_id).info.status == "KILLED"

    result, out = train(workspace, "preempted", "--checkpoint-every-steps", "0")
    assert result["resumed"] and f"global step {newest.global_step}" in out
    assert client.get_run(result["mlflow_run_id"]).data.tags["resume.from_checkpoint"] == newest.name
    assert metric_steps(result["mlflow_run_id"], "train_loss", env["MLFLOW_TRACKING_URI"]) == [1, 2, 3, 4]
    steps = metric_steps(result["mlflow_run_id"], "batch_loss", env["MLFLOW_TRACKING_URI"])
    assert steps == sorted(set(steps)) == list(range(5, 141, 5))
    expected = reference[1]
    weights = final_weights(workspace, "preempted")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    # A finished run's retry returns its result without training again.
    again, out = train(workspace, "preempted", "--checkpoint-every-steps", "0")
    assert again == result and "already finished" in out


@pytest.mark.training
def test_too_many_preemptions_fail_like_an_ordinary_error(workspace):
    stage = start(workspace, "flapping", "--max-preemptions", "0")
    wait_for_checkpoint(store_of(workspace, "flapping"), stage, epoch=1)
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.proc.wait(120) == EXIT_PREEMPTED, stage.output()[-4000:]
    _, out = train(workspace, "flapping", "--max-preemptions", "0", expect=1)
    assert "preempted 1 times (limit --max-preemptions 0)" in out


@pytest.mark.training
def test_zero_retention_days_deletes_the_runs_checkpoints_and_its_retry_still_returns_the_result(workspace):
    root = (workspace[0] / "checkpoints").as_uri()
    dag = "retention_zero"  # a DAG of its own: the other tests' runs are not touched
    finished = checkpoint.run_location(root, dag, "finished-earlier")
    saved_store(finished).complete({"model_uri": "models:/m-0"})
    unfinished = checkpoint.run_location(root, dag, "unfinished")
    saved_store(unfinished)
    own = checkpoint.run_location(root, dag, "zero")
    flags = ("--airflow-dag-id", dag, "--epochs", "1", "--checkpoint-retention-days", "0")

    result, out = train(workspace, "zero", *flags)

    assert files(own) == ["latest.json"]
    manifest = CheckpointStore(own).read_manifest()
    assert manifest.completed == result and manifest.completed_at and manifest.checkpoints == []
    assert "checkpoint retention (0 days)" in out
    assert files(finished) == ["latest.json"]  # finished at least 0 days ago too
    assert files(unfinished) == ["ckpt-000000010.pt", "ckpt-000000020.pt", "latest.json"]
    again, out = train(workspace, "zero", *flags)
    assert again == result and "already finished" in out
