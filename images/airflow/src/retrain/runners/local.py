"""The local runner: a stage as a subprocess of the task, its output relayed to the task log at each line's level."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from retrain import links
from retrain.runners.common import StageSpec, reschedule_after_preemption
from retrain_contract import stages
from retrain_contract.stages import EXIT_BAD_INPUT, EXIT_PREEMPTED, RESULT_PATH_ENV


class LocalStageOperator(BaseOperator):
    """Run a stage as a local subprocess, stream its output to the task log, return its JSON result.

    With ``nproc_per_node`` other than 1 the stage runs under torchrun (:func:`retrain_contract.stages.command`),
    one process per GPU: rank 0 logs the stage's progress and the other ranks only their warnings and
    errors, all relayed like a single process's lines; the launcher exits with the stage's codes and
    names the rank that failed.
    """

    template_fields: Sequence[str] = ("arguments",)
    operator_extra_links = (links.MLFLOW_RUN,)
    ui_color = "#e8f4ea"

    def __init__(self, *, stage: StageSpec, arguments: list[str], python: str, env: dict[str, str],
                 preemption_delay_s: float = 30.0, kill_grace_s: float = 30.0, nproc_per_node: int | str = 1,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.stage = stage
        self.nproc_per_node = nproc_per_node
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
            cmd = [*stages.command(self.stage.name, self.python, nproc_per_node=self.nproc_per_node),
                   *map(str, self.arguments)]
            env = {**os.environ, **self.env, RESULT_PATH_ENV: str(result_path)}
            self.log.info("running stage %s: %s", self.stage.name, shlex.join(cmd))
            self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True, preexec_fn=_die_with_parent)
            tail = StageLog(self.stage.name, self.log).follow(self._proc)
            code = self._proc.wait()
            if code == EXIT_BAD_INPUT:
                raise AirflowFailException(f"stage {self.stage.name} rejected its input: {tail.error()}")
            if code == EXIT_PREEMPTED and not self._killed:
                self.log.warning("stage %s was stopped by SIGTERM and saved its progress; rescheduling it in %.0f s "
                                 "(same try: preemptions do not use up retries)", self.stage.name, self.preemption_delay_s)
                raise reschedule_after_preemption(self.preemption_delay_s)
            if code < 0:
                raise AirflowException(f"stage {self.stage.name} was killed by {signal.Signals(-code).name}; "
                                       f"its last lines:\n{tail.last()}")
            if code != 0:
                raise AirflowException(f"stage {self.stage.name} failed with exit code {code}: {tail.error()}")
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
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.kill_grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")  # the stages' own log format


class StageLog:
    """Relays a stage's stdout and stderr to the task log, each line at the level it carries.

    The stages log ``<date> <time> <LEVEL> <logger>: <message>``; such a line is logged at its level
    without the stage's own timestamp. A line without a level is INFO on stdout; on stderr it is
    WARNING (Python's warnings), or ERROR inside a traceback. The last lines are kept for the
    failure message.
    """

    def __init__(self, stage: str, logger: logging.Logger, keep: int = 30):
        self.stage, self.logger = stage, logger
        self.tail: deque[tuple[int, str]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def line(self, text: str, stderr: bool, in_traceback: bool = False) -> int:
        """Log one line; returns the level it was logged at."""
        text = text.rstrip()
        match = _LEVEL.match(text)
        if match:
            level, text = logging.getLevelName(match.group(1)), match.group(2)
        elif not stderr:
            level = logging.INFO
        else:
            level = logging.ERROR if in_traceback else logging.WARNING
        with self._lock:
            self.logger.log(level, "[%s] %s", self.stage, text)
            self.tail.append((level, text))
        return level

    def _read(self, stream: IO[str], stderr: bool) -> None:
        in_traceback = False
        for raw in stream:
            if stderr and raw.startswith("Traceback (most recent call last)"):
                in_traceback = True
            self.line(raw, stderr, in_traceback)
            if in_traceback and raw[:1] not in (" ", "\t") and not raw.startswith("Traceback"):
                in_traceback = False  # the exception line ends the traceback

    def follow(self, proc: subprocess.Popen[str]) -> StageLog:
        """Relay both streams until the process closes them."""
        readers = [threading.Thread(target=self._read, args=(stream, stream is proc.stderr), daemon=True)
                   for stream in (proc.stdout, proc.stderr) if stream is not None]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        return self

    def error(self) -> str:
        """The most telling line: the last one at ERROR or above, else the last line."""
        for level, text in reversed(self.tail):
            if level >= logging.ERROR:
                return text.strip()
        return self.tail[-1][1] if self.tail else "(no output)"

    def last(self, n: int = 10) -> str:
        return "\n".join(text for _, text in list(self.tail)[-n:]) or "(no output)"


def _die_with_parent() -> None:
    """In the stage's process, before exec: get SIGTERM when the task process that started it dies (Linux).

    A task process killed outright (its worker lost, the scheduler's tree killed) then still stops its
    stage, which saves a checkpoint and exits, instead of training on as an orphan next to the retry.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
