"""The local stage runner: exit codes become the right Airflow outcome, and on_kill stops the stage politely."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowRescheduleException

from retrain.runners.common import StageSpec
from retrain.runners.local import LocalStageOperator
from retrain.waiting import poll


def fake_stage(tmp_path, body: str) -> str:
    """An executable standing in for ``python``: ``<it> -m embedder.x ...`` runs ``body`` (a shell script)."""
    script = tmp_path / "stage.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def operator(tmp_path, body: str, **kwargs) -> LocalStageOperator:
    return LocalStageOperator(task_id="train", stage=StageSpec("train"), arguments=[], env={},
                              python=fake_stage(tmp_path, body), **kwargs)


def start(op: LocalStageOperator) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``op`` on a thread, as a worker would; what it raises lands in the returned list."""
    errors: list[BaseException] = []

    def run():
        try:
            op.execute({})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.parametrize(("body", "outcome", "message"), [
    ('echo "python -m embedder.train: error: --epochs must be at least 1" >&2; exit 2', AirflowFailException,
     "rejected its input: python -m embedder.train: error: --epochs must be at least 1"),
    ("echo boom; exit 1", AirflowException, "failed with exit code 1: boom"),
    ("exit 0", AirflowException, "exited 0 but wrote no result"),
])
def test_exit_codes_become_airflow_outcomes(tmp_path, body, outcome, message):
    with pytest.raises(outcome, match=message) as info:
        operator(tmp_path, body).execute({})
    assert type(info.value) is outcome


def test_a_preempted_stage_is_rescheduled_not_retried(tmp_path):
    before = datetime.now(UTC)
    with pytest.raises(AirflowRescheduleException) as info:
        operator(tmp_path, 'echo "preempted: SIGTERM at epoch 2"; exit 75', preemption_delay_s=30).execute({})
    assert 29 <= (info.value.reschedule_date - before).total_seconds() <= 60


def armed(op: LocalStageOperator, ready: Path) -> None:
    """Until the stage process runs and its signal trap is installed (it touches ``ready`` right after)."""
    poll(lambda: op._proc is not None and op._proc.poll() is None and ready.exists(), timeout_s=30, interval_s=0.02,
         what="the stage's trap installed")


def test_on_kill_sends_sigterm_first_and_a_killed_task_is_not_rescheduled(tmp_path):
    marker, ready = tmp_path / "got-sigterm", tmp_path / "ready"
    # Saves "a checkpoint" on SIGTERM and exits 75, as the train stage does.
    op = operator(tmp_path, f'trap "touch {marker}; exit 75" TERM; touch {ready}; while :; do sleep 0.1; done',
                  kill_grace_s=10)
    thread, errors = start(op)
    armed(op, ready)
    started = time.monotonic()
    op.on_kill()
    thread.join(30)
    assert marker.exists()  # the stage got SIGTERM and had time to act on it
    assert time.monotonic() - started < 5  # and did not wait for the grace period to end
    assert len(errors) == 1 and type(errors[0]) is AirflowException  # failed, not rescheduled
    assert "exit code 75" in str(errors[0])


def test_on_kill_escalates_to_sigkill_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    op = operator(tmp_path, f'trap "" TERM; touch {ready}; while :; do sleep 0.1; done', kill_grace_s=1)
    thread, errors = start(op)
    armed(op, ready)
    op.on_kill()
    thread.join(30)
    assert op._proc.returncode == -signal.SIGKILL
    assert "was killed by SIGKILL" in str(errors[0])



def test_each_stage_line_is_logged_at_the_level_it_carries(tmp_path, caplog):
    """The stage's own format carries a level; Python's warnings (stderr) are warnings; a traceback is an error."""
    import logging
    import subprocess

    from retrain.runners.local import StageLog

    script = fake_stage(tmp_path, "\n".join([
        'echo "2026-11-23 10:00:00,000 INFO embedder.train: epoch 1/2 step 5/10"',
        'echo "2026/11/23 10:00:01 WARNING mlflow.tracking: slow server" >&2',
        'echo "2026-11-23 10:00:02,000 INFO mlflow.store: Created version 1" >&2',
        'echo "/x.py:3: UserWarning: careful" >&2',
        'echo "Traceback (most recent call last):" >&2',
        "echo '  File \"x.py\", line 1, in <module>' >&2",
        'echo "ValueError: the data root is empty" >&2',
        'echo "plain line"',
    ]))
    proc = subprocess.Popen([script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with caplog.at_level(logging.DEBUG, logger="stage-log-test"):
        log = StageLog("train", logging.getLogger("stage-log-test")).follow(proc)
    proc.wait()
    logged = {(r.levelname, r.getMessage()) for r in caplog.records}
    assert logged == {
        ("INFO", "[train] embedder.train: epoch 1/2 step 5/10"),
        ("WARNING", "[train] mlflow.tracking: slow server"),
        ("INFO", "[train] mlflow.store: Created version 1"),
        ("WARNING", "[train] /x.py:3: UserWarning: careful"),
        ("ERROR", "[train] Traceback (most recent call last):"),
        ("ERROR", '[train]   File "x.py", line 1, in <module>'),
        ("ERROR", "[train] ValueError: the data root is empty"),
        ("INFO", "[train] plain line"),
    }
    assert log.error() == "ValueError: the data root is empty"


def test_a_stage_killed_by_a_signal_names_the_signal_and_shows_its_last_lines(tmp_path):
    op = operator(tmp_path, 'echo "epoch 1/3 step 4/9"; echo "loading shard 7" >&2; kill -9 $$')
    with pytest.raises(AirflowException) as info:
        op.execute({})
    message = str(info.value)
    assert message.startswith("stage train was killed by SIGKILL; its last lines:")
    assert "epoch 1/3 step 4/9" in message and "loading shard 7" in message
