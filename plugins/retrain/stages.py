"""Stages and the one stage runner.

A stage is ``python -m embedder.<name> <arguments>``: the same command and arguments whether it
runs as a local subprocess (``RETRAIN_RUNNER=local``) or in a pod. The arguments are Airflow
templates, rendered by the operator, so XCom and Params flow into both runners the same way. The
stage writes one JSON document to its result path; the runner returns it as the task's XCom.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowRescheduleException

from retrain.settings import Settings

# embedder.contract.EXIT_BAD_INPUT: the stage rejected its input; retrying cannot help.
EXIT_BAD_INPUT = 2
# embedder.contract.EXIT_PREEMPTED: stopped by SIGTERM after saving progress; run it again to resume.
EXIT_PREEMPTED = 75
RESULT_PATH_ENV = "EMBEDDER_RESULT_PATH"


@dataclass(frozen=True)
class StageSpec:
    name: str
    gpu: bool = False

    @property
    def module(self) -> str:
        return f"embedder.{self.name}"

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module]


STAGES: dict[str, StageSpec] = {
    "prepare_data": StageSpec("prepare_data"),
    "train": StageSpec("train", gpu=True),
    "evaluate": StageSpec("evaluate"),
}


class LocalStageOperator(BaseOperator):
    """Run a stage as a local subprocess, stream its output to the task log, return its JSON result."""

    template_fields: Sequence[str] = ("arguments",)
    ui_color = "#e8f4ea"

    def __init__(self, *, stage: StageSpec, arguments: list[str], python: str, env: dict[str, str],
                 preemption_delay_s: float = 30.0, kill_grace_s: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.stage = stage
        self.arguments = arguments
        self.python = python
        self.env = env
        self.preemption_delay_s = preemption_delay_s
        self.kill_grace_s = kill_grace_s
        self._proc: subprocess.Popen[str] | None = None
        self._killed = False

    def execute(self, context: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"{self.stage.name}-") as tmp:
            result_path = Path(tmp) / "return.json"
            cmd = [*self.stage.command(self.python), *map(str, self.arguments)]
            env = {**os.environ, **self.env, RESULT_PATH_ENV: str(result_path)}
            self.log.info("running stage %s: %s", self.stage.name, shlex.join(cmd))
            tail: deque[str] = deque(maxlen=30)
            self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True)
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                self.log.info("[%s] %s", self.stage.name, line.rstrip())
                tail.append(line.rstrip())
            code = self._proc.wait()
            if code == EXIT_BAD_INPUT:
                raise AirflowFailException(f"stage {self.stage.name} rejected its input: {_last_error(tail)}")
            if code == EXIT_PREEMPTED and not self._killed:
                self.log.warning("stage %s was stopped by SIGTERM and saved its progress; rescheduling it in %.0f s "
                                 "(same try: preemptions do not use up retries)", self.stage.name, self.preemption_delay_s)
                raise reschedule_after_preemption(self.preemption_delay_s)
            if code != 0:
                raise AirflowException(f"stage {self.stage.name} failed with exit code {code}: {_last_error(tail)}")
            if not result_path.exists():
                raise AirflowException(f"stage {self.stage.name} exited 0 but wrote no result to {result_path}")
            return json.loads(result_path.read_text())

    def on_kill(self) -> None:
        """SIGTERM the stage (it saves a checkpoint and exits); SIGKILL its process group after the grace period."""
        self._killed = True
        proc = self._proc
        if not proc or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def reschedule_after_preemption(delay_s: float) -> AirflowRescheduleException:
    """The exception that runs a preempted stage again, in the same try, after ``delay_s``.

    A reschedule keeps the task's try number, so a preempted node does not use up a retry; the
    stage resumes from the checkpoint it saved. The stage caps how often one run may be preempted
    (``--max-preemptions``); past that it fails like any other error and retries count again.
    """
    return AirflowRescheduleException(datetime.now(UTC) + timedelta(seconds=delay_s))


def _last_error(tail: deque[str]) -> str:
    for line in reversed(tail):
        if "error" in line.lower() or line.startswith(("Traceback", "raise")):
            return line.strip()
    return tail[-1] if tail else "(no output)"


def stage_operator(name: str, arguments: list[str], settings: Settings, **kwargs: Any) -> BaseOperator:
    """The operator that runs stage ``name`` with the configured runner."""
    spec = STAGES[name]
    if settings.runner == "local":
        return LocalStageOperator(task_id=name, stage=spec, arguments=arguments, python=settings.local_python,
                                  env=settings.stage_env(), preemption_delay_s=settings.preemption_delay_s, **kwargs)
    from retrain.pods import stage_pod_operator

    return stage_pod_operator(name, spec.command(), arguments, spec.gpu, settings, **kwargs)
