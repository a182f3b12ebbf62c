"""The stage contract shared by every ``python -m embedder.<stage>`` command.

A stage parses its flags, does its work, writes one JSON object to the result path (which the
runner turns into the task's XCom) and exits 0. Bad input raises :class:`StageInputError`; the
stage then exits with :data:`EXIT_BAD_INPUT` and a one-line message that names the culprit, so
the runner can fail the task without retrying a run that cannot succeed. A stage that was asked to
stop (SIGTERM: a preempted node, a drained pod) and saved its progress raises :class:`StagePreempted`
and exits with :data:`EXIT_PREEMPTED`; the runner reschedules the task without using up a retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"
RESULT_PATH_ENV = "EMBEDDER_RESULT_PATH"
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving progress; run it again to resume

log = logging.getLogger("embedder")


class StageInputError(ValueError):
    """An input (path, value, file) is wrong; the message says which and how to fix it."""


class StagePreempted(RuntimeError):
    """The stage stopped on request (SIGTERM) after saving what it needs to resume."""


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every stage accepts: where to write the result and which Airflow run this is."""
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


def run_stage(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], dict[str, Any]],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``main`` and write its result; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    args = parser.parse_args(argv)
    try:
        payload = main(args)
    except StageInputError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except StagePreempted as exc:
        print(f"{parser.prog}: preempted: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    write_result(result_path(args), payload)
    log.info("%s: result written to %s", parser.prog, result_path(args))
    return 0


def airflow_tags(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in {"airflow.dag_id": args.airflow_dag_id, "airflow.run_id": args.airflow_run_id}.items() if v}
