"""How a stage is run and how it ends: the protocol between the runners and the stages.

A stage is ``python -m embedder.<name> --flag value ...``. It writes one JSON document, its result,
to the path in ``$EMBEDDER_RESULT_PATH`` (in a pod: where the XCom sidecar reads it) and exits:

- 0: done; the result is the task's XCom;
- :data:`EXIT_BAD_INPUT` (2, argparse's usage error too): an input is wrong; retrying cannot help;
- :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``): stopped by SIGTERM after saving its progress; run it
  again (the runner reschedules it without using up a retry) and it resumes.
"""

from __future__ import annotations

STAGES = ("prepare_data", "train", "evaluate")
RESULT_PATH_ENV = "EMBEDDER_RESULT_PATH"
DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"  # KubernetesPodOperator's XCom sidecar reads this file
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


def module(stage: str) -> str:
    """The module a stage runs as (``python -m <module>``)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return f"embedder.{stage}"
