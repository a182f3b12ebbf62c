"""The train stage on two processes in local mode: the local runner (``LocalStageOperator`` with two processes
per node, as ``RETRAIN_TRAIN_PROCS=2`` sets it) runs the real ``python -m embedder.torchrun ... -m embedder.train``
command, whose two ranks train with DDP over gloo on the CPU and log to a real MLflow server. The ranks are
killed for real (SIGKILL to one rank, SIGTERM to the launcher); the tests wait on the stage's progress lines.

Each run writes which images every step trained on (``--trace-samples``), so the sample order is checked on
what the ranks consumed, not on what the sampler would give.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from airflow.sdk.exceptions import AirflowException, AirflowRescheduleException
from mlflow import MlflowClient

from embedder import checkpoint
from embedder.checkpoint import CheckpointStore
from embedder.torchrun import children
from retrain.runners.common import STAGES
from retrain.runners.local import LocalStageOperator
from retrain.waiting import poll

# Two training processes, a rank killed mid-epoch and the rerun: a scenario run (make test-scenarios).
pytestmark = pytest.mark.scenario

# resnet18 at 32 px, 2 epochs over 280 training images: 17 steps of 16 images (8 per rank), one thread per rank.
EPOCHS, PER_RANK_BATCH, RANKS = 2, 8, 2
STEPS = 280 // (PER_RANK_BATCH * RANKS)
LOG_EVERY = 4
TRAIN_ARGS = ["--experiment", "ddp", "--architecture", "resnet18", "--image-size", "32", "--epochs", str(EPOCHS),
              "--threads", "1", "--num-workers", "0", "--log-every-steps", str(LOG_EVERY), "--progress-every-steps", "1",
              "--airflow-dag-id", "retrain_embedder"]


@dataclass
class Workspace:
    home: Path
    env: dict[str, str]
    manifest_uri: str
    tracking_uri: str


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_root, mlflow_server) -> Workspace:
    home = tmp_path_factory.mktemp("ddp")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    result = home / "prepare.json"
    subprocess.run([sys.executable, "-m", "embedder.prepare_data", "--data-uri", digits_root.as_uri(),
                    "--storage-uri", (home / "storage").as_uri(), "--experiment", "ddp", "--result-path", str(result)],
                   env={**os.environ, **env}, cwd=home, check=True, capture_output=True, timeout=300)
    return Workspace(home, env, json.loads(result.read_text())["manifest_uri"], mlflow_server)


class Stage:
    """The train task of one run, executing on a thread as a worker runs it; its task log is kept."""

    def __init__(self, ws: Workspace, run_id: str, processes: int, batch_size: int, *extra: str):
        self.ws, self.run_id = ws, run_id
        arguments = ["--manifest-uri", ws.manifest_uri, *TRAIN_ARGS, "--batch-size", str(batch_size),
                     "--checkpoint-root", (ws.home / "checkpoints").as_uri(), "--airflow-run-id", run_id,
                     "--trace-samples", str(self.trace_dir), *extra]
        self.op = LocalStageOperator(task_id="train", stage=STAGES["train"], arguments=arguments, python=sys.executable,
                                     env=ws.env, nproc_per_node=processes, preemption_delay_s=0)
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._capture = structlog.testing.capture_logs()
        self.log = self._capture.__enter__()
        self.thread = threading.Thread(target=self._execute)
        self.thread.start()

    @property
    def trace_dir(self) -> Path:
        return self.ws.home / "traces" / self.run_id

    def _execute(self) -> None:
        try:
            self.result = self.op.execute({})
        except BaseException as exc:
            self.error = exc

    def lines(self, level: str | None = None) -> list[str]:
        return [e["event"] for e in list(self.log) if level is None or e["log_level"] == level]

    def wait_for_line(self, text: str, timeout: float = 300) -> None:
        def seen():
            assert self.thread.is_alive(), f"the stage ended before {text!r}: {self.error}\n" + "\n".join(self.lines()[-40:])
            return any(text in line for line in self.lines())

        poll(seen, timeout_s=timeout, interval_s=0.02, what=repr(text))

    def rank_pid(self, rank: int) -> int:
        """The process id of rank ``rank`` (a child of the launcher)."""
        for pid in children(self.op._proc.pid):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        raise AssertionError(f"no rank {rank} under the launcher {self.op._proc.pid}")

    def finish(self, timeout: float = 300) -> dict | BaseException:
        self.thread.join(timeout)
        self._capture.__exit__(None, None, None)
        assert not self.thread.is_alive(), "the stage did not end"
        return self.result if self.error is None else self.error


def steps_trained(trace_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(epoch, global step) -> the images the ranks trained on, all ranks together; a step run again after a
    resume counts as the resumed run ran it (its last record), a line cut by SIGKILL not at all."""
    per_rank: dict[int, dict[tuple[int, int], list[int]]] = {}
    for path in sorted(trace_dir.glob("rank-*.jsonl")):
        records = per_rank.setdefault(int(path.stem.split("-")[1]), {})
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[(record["epoch"], record["step"])] = record["indices"]
    steps = set().union(*per_rank.values())
    return {step: [i for rank in sorted(per_rank) for i in per_rank[rank].get(step, [])] for step in sorted(steps)}


def metric_steps(ws: Workspace, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(ws.tracking_uri).get_metric_history(run_id, key)]


def store_of(ws: Workspace, run_id: str) -> CheckpointStore:
    return CheckpointStore(checkpoint.run_location((ws.home / "checkpoints").as_uri(), "retrain_embedder", run_id))


@pytest.fixture(scope="module")
def one_process(workspace) -> dict:
    """The reference: one process, with the two ranks' global batch (16 images a step)."""
    stage = Stage(workspace, "one-process", 1, PER_RANK_BATCH * RANKS)
    result = stage.finish()
    assert isinstance(result, dict), result
    return result


@pytest.fixture(scope="module")
def killed_and_resumed(workspace) -> tuple[BaseException, dict, Stage, Stage, checkpoint.Record]:
    """Two ranks; rank 1 SIGKILLed mid-way through epoch 2 (after a checkpoint within it); the task run again."""
    first = Stage(workspace, "two-ranks", RANKS, PER_RANK_BATCH, "--checkpoint-every-steps", "5")
    first.wait_for_line(f"epoch 2/{EPOCHS} step 9/{STEPS} ")  # global step 26: checkpoints at 17 (epoch end), 20, 25
    os.kill(first.rank_pid(1), signal.SIGKILL)
    failure = first.finish()
    newest = store_of(workspace, "two-ranks").read_manifest().checkpoints[0]
    second = Stage(workspace, "two-ranks", RANKS, PER_RANK_BATCH, "--checkpoint-every-steps", "5")
    result = second.finish()
    assert isinstance(result, dict), result
    return failure, result, first, second, newest


@pytest.mark.training
def test_a_rank_killed_mid_epoch_fails_the_stage_naming_it_and_the_rerun_resumes_in_the_same_run(
        workspace, killed_and_resumed):
    failure, result, first, second, newest = killed_and_resumed
    assert type(failure) is AirflowException
    # Rank 0 may fail too (its next collective finds rank 1 gone): rank 1 is named, as the cause.
    assert re.match(r"stage train failed with exit code 1: embedder\.torchrun: rank 1 \(local rank 1 on \S+, pid \d+\) "
                    r"was killed by SIGKILL(; also failed: rank 0 \(.*\))?$", str(failure)), str(failure)
    assert newest.epoch == 1 and 0 < newest.batch < STEPS  # a checkpoint within epoch 2
    assert any(f"resuming from {store_of(workspace, 'two-ranks').uri_of(newest.name)} (epoch 2, batch {newest.batch}, "
               f"global step {newest.global_step})" in line for line in second.lines("info"))
    assert result["resumed"]
    # One MLflow run for the DAG run, every metric step once.
    client = MlflowClient(workspace.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id],
                              "tags.`airflow.run_id` = 'two-ranks'")
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    assert runs[0].data.params["global_batch_size"] == str(PER_RANK_BATCH * RANKS)
    assert metric_steps(workspace, result["mlflow_run_id"], "train_loss") == list(range(1, EPOCHS + 1))
    assert metric_steps(workspace, result["mlflow_run_id"], "batch_loss") == list(range(LOG_EVERY, EPOCHS * STEPS + 1,
                                                                                        LOG_EVERY))
    # Rank 0 speaks for the job: each epoch's line once; rank 1 only warns and fails.
    def epoch_lines(stage: Stage, epoch: int) -> int:
        return sum(f"[rank 0] epoch {epoch}/{EPOCHS}: train_loss=" in line for line in stage.lines("info"))

    assert (epoch_lines(first, 1), epoch_lines(first, 2), epoch_lines(second, 1), epoch_lines(second, 2)) == (1, 0, 0, 1)
    assert not any("[rank 1]" in line for line in first.lines("info") + second.lines("info"))


@pytest.mark.training
def test_two_ranks_train_each_step_on_exactly_the_images_of_one_process_and_reach_its_accuracy(
        workspace, one_process, killed_and_resumed):
    """The same images at every step of every epoch, the killed and resumed run included, none twice a step."""
    _, result, first, _, _ = killed_and_resumed
    reference = steps_trained(workspace.home / "traces" / "one-process")
    two = steps_trained(first.trace_dir)
    assert list(reference) == [(e, s) for e in range(1, EPOCHS + 1) for s in range((e - 1) * STEPS + 1, e * STEPS + 1)]
    assert list(two) == list(reference)
    for step, images in reference.items():
        assert len(two[step]) == len(set(two[step])) == len(images) and set(two[step]) == set(images), step
    # Not the same numbers (batch norm sees 8 images per rank, not 16), the same band.
    assert one_process["final_val_accuracy"] >= 0.6 and result["final_val_accuracy"] >= 0.6
    assert abs(one_process["final_val_accuracy"] - result["final_val_accuracy"]) <= 0.2
    # The progress lines' loss (rank 0's share of each batch) is on the scale of the logged batch loss (all ranks').
    logged = dict(zip(metric_steps(workspace, result["mlflow_run_id"], "batch_loss"),
                      [m.value for m in MlflowClient(workspace.tracking_uri).get_metric_history(result["mlflow_run_id"],
                                                                                                  "batch_loss")],
                      strict=True))
    shown = {(int(m[1]) - 1) * STEPS + int(m[2]): float(m[3]) for line in first.lines()
             if (m := re.search(r"epoch (\d+)/\d+ step (\d+)/\d+ .*, loss ([\d.]+),", line))}
    common = sorted(logged.keys() & shown.keys())
    assert len(common) >= 4, (sorted(logged), sorted(shown))
    assert 0.7 <= sum(shown[k] for k in common) / sum(logged[k] for k in common) <= 1.4


@pytest.mark.training
def test_sigterm_stops_both_ranks_at_one_step_saves_one_checkpoint_and_the_stage_exits_75(workspace):
    stage = Stage(workspace, "preempted", RANKS, PER_RANK_BATCH, "--checkpoint-every-steps", "0")
    stage.wait_for_line(f"epoch 1/{EPOCHS} step 3/{STEPS} ")
    os.kill(stage.op._proc.pid, signal.SIGTERM)  # a preempted node: SIGTERM to the stage's process
    outcome = stage.finish()
    assert isinstance(outcome, AirflowRescheduleException), outcome  # rescheduled: the launcher exited 75
    assert stage.op._proc.returncode == 75
    manifest = store_of(workspace, "preempted").read_manifest()
    (saved,) = manifest.checkpoints  # the one written on SIGTERM, by rank 0 alone
    assert saved.epoch == 0 and 3 < saved.batch < STEPS and manifest.preemptions == 1
    assert sum("checkpoint ckpt-" in line and " saved " in line for line in stage.lines()) == 1
    stopped = [line for line in stage.lines("warning") if "preempted: SIGTERM at epoch 1, step" in line]
    assert len(stopped) == RANKS and all(f"step {saved.global_step};" in line for line in stopped)  # the same step
    assert MlflowClient(workspace.tracking_uri).get_run(manifest.mlflow_run_id).info.status == "KILLED"


@pytest.mark.training
def test_a_launcher_killed_outright_takes_its_ranks_with_it_and_the_task_names_the_signal(workspace):
    """What the runner's escalation (SIGKILL to the stage's process group) does: torchrun starts each rank in a
    session of its own, so the ranks die with their launcher (PR_SET_PDEATHSIG), not the group kill."""
    stage = Stage(workspace, "launcher-killed", RANKS, PER_RANK_BATCH, "--checkpoint-every-steps", "0")
    stage.wait_for_line(f"epoch 1/{EPOCHS} step 2/{STEPS} ")
    ranks = [stage.rank_pid(rank) for rank in range(RANKS)]
    os.killpg(stage.op._proc.pid, signal.SIGKILL)
    outcome = stage.finish(timeout=60)  # the ranks held the task's pipes: it ends only once they are gone
    assert type(outcome) is AirflowException
    assert str(outcome).startswith("stage train was killed by SIGKILL; its last lines:")
    assert f"[rank 0] epoch 1/{EPOCHS} step " in str(outcome)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped
        except FileNotFoundError:
            return True

    poll(lambda: all(gone(pid) for pid in ranks), timeout_s=30, interval_s=0.05, what="the ranks gone")
