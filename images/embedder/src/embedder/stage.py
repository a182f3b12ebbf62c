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
import sys
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


def new_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A stage's parser with the flags every stage takes: the MLflow experiment, where to write the result and
    which Airflow run this is. ``module`` is the stage's module name, ``doc`` its docstring (the description)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
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


def run_stage(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], Result],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``main`` and write its result; return the process exit code."""
    configure_logging()
    args = parser.parse_args(argv)
    try:
        result = main(args)
    except StageInputError as exc:
        log.error("%s: error: %s", parser.prog, exc)
        return EXIT_BAD_INPUT
    except StagePreempted as exc:
        log.warning("%s: preempted: %s", parser.prog, exc)
        return EXIT_PREEMPTED
    write_result(result_path(args), result.to_json())
    log.info("%s: result written to %s", parser.prog, result_path(args))
    return 0


def airflow_tags(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in {"airflow.dag_id": args.airflow_dag_id, "airflow.run_id": args.airflow_run_id}.items() if v}
