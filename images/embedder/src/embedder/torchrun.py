"""torchrun with the stage protocol's exit codes: ``python -m embedder.torchrun <torchrun's flags> -m embedder.train ...``.

torchrun (``torch.distributed.run``) exits 1 whenever a rank fails, whatever the rank's exit code,
and when it is sent SIGTERM itself it stops the ranks and exits 1 too. The runners speak the stage
protocol (:mod:`retrain_contract.stages`): 75 is "preempted after saving: reschedule", 2 is "bad
input: do not retry". This launcher runs torchrun's own agent, with torchrun's own flags, and turns
its outcome into those codes:

- SIGTERM to the launcher (a task stopped, a pod terminated) is forwarded to every rank at once
  instead of starting torchrun's shutdown: the ranks agree on a step, rank 0 saves the checkpoint
  once, every rank exits 75, and so does the launcher. A SIGTERM before any rank started exits 75 too.
- When every rank that failed exited 75 or was ended by SIGTERM (by this launcher, or by torchrun
  once another rank had exited 75; a rank stopped before it could save leaves the previous
  checkpoint, which the retry resumes from), and one of them exited 75 or the launcher got SIGTERM: 75.
- When the first rank to fail exited 2: 2, and that rank's error line.
- Otherwise 1, and one ERROR line naming the rank whose failure is the cause (rank, local rank,
  host, pid) and why: the signal that killed it, or what it wrote to its torchrun error file (an
  exception, through torch's ``@record``, or an input error), and the other ranks that failed. A
  rank killed by a signal is taken as the cause before one that raised (a peer's death makes the
  others' next collective raise), and the earliest before later ones.

``--nproc-per-node auto`` is one process per visible GPU, or one without GPUs (torchrun's own
``auto`` would start one per CPU there). Unless set, ``OMP_NUM_THREADS`` is each process's share of
the CPU budget (torchrun would set 1 and warn).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import get_args_parser, run

from embedder import model, stage
from embedder.distributed import LAUNCHER_PID_ENV
from retrain_contract.stages import EXIT_BAD_INPUT, EXIT_PREEMPTED

log = logging.getLogger("embedder.torchrun")
# torchrun handles these itself (stopping the ranks at once); SIGTERM is this launcher's to forward.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s child processes (Linux ``/proc``): the ranks of a launcher."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # "pid (comm) state ppid ..."
            found.append(int(entry.name))
    return found


class ForwardSigterm:
    """The launcher's SIGTERM handler: send SIGTERM to every rank (each saves its part and exits 75)."""

    def __init__(self):
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        ranks = children(os.getpid())
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGTERM)
        if not ranks:  # not started yet: stop torchrun as its own handler would
            raise SignalException("SIGTERM before the training processes started", sigval=signal.Signals.SIGTERM)


def reason(failure: ProcessFailure) -> str:
    """Why one rank failed, in one line."""
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    if not os.path.isfile(failure.error_file):
        return f"exited with code {failure.exitcode} without recording an error (its output above says why)"
    message = failure.message
    if isinstance(message, dict):  # torch's @record: the exception as "Type: message"
        message = message.get("message", message)
    return f"failed with exit code {failure.exitcode}: {message}"


def _suspicion(failure: ProcessFailure) -> int:
    """How likely a failure is the cause rather than a consequence: 0 killed by a signal (SIGKILL: the
    OOM killer, a lost node; SIGSEGV), 1 an error or exit code (a rank whose peer died fails in its next
    collective, usually after it), 2 SIGTERM (what torchrun sends the others once one has failed)."""
    if failure.exitcode == -signal.SIGTERM:
        return 2
    return 0 if failure.exitcode < 0 else 1


def outcome(failures: Mapping[int, ProcessFailure], got_sigterm: bool, host: str | None = None) -> int:
    """The launcher's exit code for the ranks' ``failures`` (see the module docstring); logs why."""
    codes = {f.exitcode for f in failures.values()}
    # A rank ended by SIGTERM was stopped by this launcher, or by torchrun once another rank had exited 75.
    if codes <= {EXIT_PREEMPTED, -signal.SIGTERM} and (EXIT_PREEMPTED in codes or got_sigterm):
        log.warning("preempted: rank(s) %s stopped on SIGTERM (exit codes %s); the retry resumes from the last "
                    "checkpoint", ", ".join(map(str, sorted(failures))), ", ".join(map(str, sorted(codes))))
        return EXIT_PREEMPTED
    rank, first = min(failures.items(), key=lambda item: (_suspicion(item[1]), item[1].timestamp, item[0]))
    if first.exitcode == EXIT_BAD_INPUT and os.path.isfile(first.error_file):
        log.error("%s", first.message)
        return EXIT_BAD_INPUT
    others = [f"rank {r} ({'killed by ' + f.signal_name() if f.exitcode < 0 else f'exit code {f.exitcode}'})"
              for r, f in sorted(failures.items()) if r != rank]
    log.error("rank %d (local rank %d on %s, pid %d) %s%s", rank, first.local_rank, host or socket.gethostname(),
              first.pid, reason(first), f"; also failed: {', '.join(others)}" if others else "")
    return EXIT_BAD_INPUT if first.exitcode == EXIT_BAD_INPUT else 1


def main(argv: Sequence[str] | None = None) -> int:
    stage.configure_logging()
    args = get_args_parser().parse_args(argv)
    if args.nproc_per_node == "auto":
        args.nproc_per_node = str(torch.cuda.device_count() or 1)
    if hasattr(args, "signals_to_handle"):  # torchrun's flag (newer versions), else its variable
        args.signals_to_handle = TORCHRUN_SIGNALS
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    if args.nproc_per_node.isdigit():  # torchrun's "gpu", "cpu", ... count devices themselves
        os.environ.setdefault("OMP_NUM_THREADS", str(model.cpu_share(int(args.nproc_per_node))))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    forward = ForwardSigterm()
    signal.signal(signal.SIGTERM, forward)
    try:
        run(args)
    except ChildFailedError as exc:
        return outcome(exc.failures, forward.received)
    except SignalException as exc:
        if exc.sigval == signal.SIGTERM:
            log.warning("preempted: SIGTERM before the training processes started")
            return EXIT_PREEMPTED
        log.error("stopped by %s", exc.sigval.name)
        return 128 + exc.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
