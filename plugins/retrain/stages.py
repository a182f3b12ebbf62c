"""Stages and the one stage runner.

A stage is ``python -m embedder.<name> <arguments>``: the same command and arguments whether it
runs as a local subprocess (``RETRAIN_RUNNER=local``) or in a pod. The arguments are Airflow
templates, rendered by the operator, so XCom and Params flow into both runners the same way. The
stage writes one JSON document to its result path; the runner returns it as the task's XCom.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from retrain.settings import Settings

# embedder.contract.EXIT_BAD_INPUT: the stage rejected its input; retrying cannot help.
EXIT_BAD_INPUT = 2
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

    def __init__(self, *, stage: StageSpec, arguments: list[str], python: str, env: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.stage = stage
        self.arguments = arguments
        self.python = python
        self.env = env
        self._proc: subprocess.Popen[str] | None = None

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
            if code != 0:
                raise AirflowException(f"stage {self.stage.name} failed with exit code {code}: {_last_error(tail)}")
            if not result_path.exists():
                raise AirflowException(f"stage {self.stage.name} exited 0 but wrote no result to {result_path}")
            return json.loads(result_path.read_text())

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)


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
                                  env=settings.stage_env(), **kwargs)
    from retrain.pods import stage_pod_operator

    return stage_pod_operator(name, spec.command(), arguments, spec.gpu, settings, **kwargs)
