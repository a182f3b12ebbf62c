"""A stand-in for a distributed stage, for the launchers' own tests: it rendezvouses and all-reduces for real.

Run under torchrun (``python -m torch.distributed.run ... -m tests.support.ddp_probe``), each rank joins
the gloo process group, all-reduces ``rank + 1`` and prints what it got; rank 0 then writes the result a
stage writes (``$EMBEDDER_RESULT_PATH``, :mod:`retrain_contract.stages`), with the world it saw. It keeps
the stage's exit codes: SIGTERM ends it with ``EXIT_PREEMPTED``. Test controls, from the environment:

- ``PROBE_HOLD``: a file; after the all-reduce, every rank prints ``holding`` and waits until it exists
  (a test preempts a pod meanwhile);
- ``PROBE_EXIT``: ``<node>:<code>``: that node's ranks exit with ``code`` after the all-reduce.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from retrain_contract.stages import DEFAULT_RESULT_PATH, EXIT_PREEMPTED, RESULT_PATH_ENV


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_PREEMPTED))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = int(os.environ["GROUP_RANK"])
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    print(f"probe rank {rank}/{world} node {node} local {os.environ['LOCAL_RANK']} all-reduced {total.item():g} "
          f"job-index {os.environ.get('JOB_COMPLETION_INDEX', '-')}", flush=True)
    exit_at = os.environ.get("PROBE_EXIT", "")
    if exit_at and int(exit_at.split(":")[0]) == node:
        dist.destroy_process_group()  # as a stage leaves: a live gloo group at exit may abort the process
        return int(exit_at.split(":")[1])
    if hold := os.environ.get("PROBE_HOLD"):
        print(f"probe rank {rank} holding", flush=True)
        while not Path(hold).exists():
            time.sleep(0.05)
    if rank == 0:
        path = Path(os.environ.get(RESULT_PATH_ENV) or DEFAULT_RESULT_PATH)
        path.write_text(json.dumps({"world_size": world, "all_reduced": total.item(),
                                    "job_index": os.environ.get("JOB_COMPLETION_INDEX"), "argv": sys.argv[1:]}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
