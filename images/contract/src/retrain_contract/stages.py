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


# Distributed training: the train stage under torchrun (torch.distributed.run), one process per GPU.
RENDEZVOUS_PORT = 29400  # torchrun's c10d rendezvous on the first node (a headless Service names it)
# torchrun with this protocol's exit codes (torchrun itself exits 1 for a preempted rank and on SIGTERM):
# the module takes torchrun's own flags; see embedder.torchrun.
LAUNCHER = "embedder.torchrun"


def command(stage: str, python: str = "python", *, nproc_per_node: int | str = 1, nnodes: int = 1,
            rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """The command that runs ``stage``: ``python -m embedder.<stage>``, or that module under torchrun.

    One process on one node keeps the plain command. Otherwise torchrun starts ``nproc_per_node``
    processes per node (``"auto"``: one per visible GPU, or one on a machine without GPUs);
    ``nnodes`` > 1 rendezvous at ``rdzv_endpoint`` (``host:port``) under ``rdzv_id`` with the c10d
    backend, one node alone uses ``--standalone``. ``--max-restarts 0``: a failed rank fails the
    stage, and the runner's own preemption and retry rules decide what happens next.

    torchrun runs as :data:`LAUNCHER`, which takes torchrun's flags and exits with this protocol's
    codes: :data:`EXIT_PREEMPTED` when the ranks stopped on SIGTERM (it forwards SIGTERM to every
    rank), :data:`EXIT_BAD_INPUT` for bad input, and otherwise 1 with a line naming the rank that failed.
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be at least 1, got {nnodes}")
    if nproc_per_node != "auto" and int(nproc_per_node) < 1:
        raise ValueError(f"nproc_per_node must be 'auto' or at least 1, got {nproc_per_node!r}")
    if nnodes == 1 and str(nproc_per_node) == "1":
        return [python, "-m", module(stage)]
    launcher = [python, "-m", LAUNCHER, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
                "--max-restarts", "0"]
    if nnodes == 1:
        launcher.append("--standalone")
    else:
        if not rdzv_endpoint or not rdzv_id:
            raise ValueError("several nodes need rdzv_endpoint (host:port of the first node) and rdzv_id")
        launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    return [*launcher, "-m", module(stage)]
