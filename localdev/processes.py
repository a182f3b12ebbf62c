"""The processes of a local stack: started detached, found again, stopped whole.

- **Started** in a new session (they outlive the command that started them, as a cluster's services
  would), with the pid and its start time in a pid file, so a recycled pid is never mistaken for them.
- **Found again** by session: each component leads its own session, so everything it forks (executor
  workers, task processes) stays in it even after the component died. Airflow renames its processes,
  which overwrites what ``/proc`` shows of their environment; stage processes start their own session
  but keep their environment, which carries :data:`MARKER`.
- **Stopped** with SIGTERM, then SIGKILL after a grace period; a zombie its parent has not reaped yet
  counts as exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psutil

from retrain.waiting import poll

MARKER = "RETRAIN_LOCALDEV_STACK"  # in the environment of every process of a stack: its RETRAIN_HOME


class PidFile:
    """Where a started process is recorded: ``<pid> <start time>``."""

    def __init__(self, path: Path):
        self.path = path

    def recorded(self) -> tuple[int, float] | None:
        try:
            pid, created = self.path.read_text().split()
            return int(pid), float(created)
        except (FileNotFoundError, ValueError):
            return None

    def alive(self) -> int | None:
        """The recorded pid, when that very process (same start time) is still running."""
        recorded = self.recorded()
        if recorded is None:
            return None
        try:
            proc = psutil.Process(recorded[0])
            if proc.create_time() == recorded[1] and not gone(proc):
                return proc.pid
        except psutil.Error:
            pass
        return None


def spawn(argv: list[str], env: dict[str, str], log_file: Path, pid_file: PidFile, cwd: Path) -> int:
    """Start ``argv`` detached, in a new session, its output appended to ``log_file``; record it in ``pid_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.path.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)
    pid_file.path.write_text(f"{proc.pid} {psutil.Process(proc.pid).create_time()}")
    return proc.pid


def gone(proc: psutil.Process) -> bool:
    """Exited: no such process, or a zombie its parent has not reaped yet (a test's own child, say)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def tree(pid: int | None) -> list[psutil.Process]:
    """The process and everything below it (stage processes in their own sessions included)."""
    if pid is None:
        return []
    root = psutil.Process(pid)
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def members(sessions: set[int], marker: str) -> list[psutil.Process]:
    """Every live process in one of ``sessions``, or whose environment has ``MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid() or gone(proc):
            continue
        try:
            in_session = os.getsid(proc.pid) in sessions
            marked = not in_session and proc.environ().get(MARKER) == marker
        except (OSError, psutil.Error):
            continue
        if in_session or marked:
            found.append(proc)
    return found


def kill(procs: list[psutil.Process], timeout_s: float = 30.0) -> None:
    """SIGKILL ``procs`` at once (a crash); return once all of them have exited."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    poll(lambda: all(gone(p) for p in procs), timeout_s=timeout_s, interval_s=0.05, what="killed processes exit")


def terminate(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``procs``; SIGKILL what still runs after ``grace_s``; return once all have exited."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    try:
        poll(lambda: all(gone(p) for p in procs), timeout_s=grace_s, interval_s=0.1, what="stopped processes exit")
    except TimeoutError:
        kill([p for p in procs if not gone(p)], timeout_s=10.0)
