"""What every ``python -m embedder.<stage>`` command does around its work (the protocol is
:mod:`retrain_contract.stages`).

A stage parses its flags, does its work, writes one JSON object to the result path (which the
runner turns into the task's XCom) and exits 0. Bad input raises :class:`StageInputError`; the
stage then exits with ``EXIT_BAD_INPUT`` and a one-line message that names the culprit, so the
runner can fail the task without retrying a run that cannot succeed. A stage that was asked to
stop (SIGTERM: a preempted node, a drained pod) and saved its progress raises :class:`StagePreempted`
and exits with ``EXIT_PREEMPTED``; the runner reschedules the task without using up a retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retrain_contract.results import Result
from retrain_contract.stages import DEFAULT_RESULT_PATH, EXIT_BAD_INPUT, EXIT_PREEMPTED, RESULT_PATH_ENV

log = logging.getLogger("embedder")


class StageInputError(ValueError):
    """An input (path, value, file) is wrong; the message says which and how to fix it."""


class StagePreempted(RuntimeError):
    """The stage stopped on request (SIGTERM) after saving what it needs to resume."""


ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun reads why a rank failed


def rank() -> int:
    """This process's rank under torchrun (``RANK``); 0 for a stage run on its own."""
    return int(os.environ.get("RANK", "0"))


def record_error(message: str) -> None:
    """Under torchrun, write ``message`` to this rank's error file, where the launcher reads why it failed.

    The plain-message form of torch's error file (``{"message": ..., "timestamp": ...}``); nothing
    without ``TORCHELASTIC_ERROR_FILE``. Exceptions that escape are written by torch's ``@record``.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


class _StageParser(argparse.ArgumentParser):
    """argparse, with the usage error also written to the torchrun error file (see :func:`record_error`)."""

    def error(self, message: str):
        record_error(f"{self.prog}: error: {message}")
        super().error(message)


def new_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A stage's parser with the flags every stage takes: the MLflow experiment, where to write the result and
    which Airflow run this is. ``module`` is the stage's module name, ``doc`` its docstring (the description)."""
    parser = _StageParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument(
        "--result-path",
        default=None,
        help=f"where to write the JSON result (default: ${RESULT_PATH_ENV} or {DEFAULT_RESULT_PATH})",
    )
    parser.add_argument("--airflow-dag-id", default="", help="tagged on MLflow runs and model versions")
    parser.add_argument("--airflow-run-id", default="", help="tagged on MLflow runs and model versions")
    return parser


def result_path(args: argparse.Namespace) -> Path:
    return Path(args.result_path or os.environ.get(RESULT_PATH_ENV) or DEFAULT_RESULT_PATH)


def write_result(path: Path, payload: dict[str, Any]) -> None:
    """Write the stage result atomically so a reader never sees half a JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the runners relay each line at its level


def configure_logging() -> None:
    """INFO and below to stdout, warnings and errors to stderr, every line in :data:`LOG_FORMAT`."""
    formatter = logging.Formatter(LOG_FORMAT)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[out, err], force=True)


def label_log_lines(label: str) -> None:
    """Put ``[label]`` before every message (``[rank 1]``), keeping :data:`LOG_FORMAT`'s level field."""
    formatter = logging.Formatter(LOG_FORMAT.replace("%(message)s", f"[{label}] %(message)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def run_stage(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], Result | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``main`` and write its result; return the process exit code.

    ``main`` returns None on the ranks other than 0 of a distributed run: rank 0 writes the result.
    """
    configure_logging()
    args = parser.parse_args(argv)
    try:
        result = main(args)
    except StageInputError as exc:
        log.error("%s: error: %s", parser.prog, exc)
        record_error(f"{parser.prog}: error: {exc}")
        return EXIT_BAD_INPUT
    except StagePreempted as exc:
        log.warning("%s: preempted: %s", parser.prog, exc)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # saved and recorded: exit 75 whatever else is sent meanwhile
        return EXIT_PREEMPTED
    if result is None or rank() != 0:
        return 0
    write_result(result_path(args), result.to_json())
    log.info("%s: result written to %s", parser.prog, result_path(args))
    return 0


def airflow_tags(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in {"airflow.dag_id": args.airflow_dag_id, "airflow.run_id": args.airflow_run_id}.items() if v}
