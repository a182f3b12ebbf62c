"""What both stage runners share: which stages there are and where they run, and how a preempted stage comes back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from airflow.sdk.exceptions import AirflowRescheduleException

from retrain_contract import stages


@dataclass(frozen=True)
class StageSpec:
    name: str
    gpu: bool = False  # runs on the GPU pool in kubernetes mode

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", stages.module(self.name)]


STAGES: dict[str, StageSpec] = {
    "prepare_data": StageSpec("prepare_data"),
    "train": StageSpec("train", gpu=True),
    "evaluate": StageSpec("evaluate"),
}
assert tuple(STAGES) == stages.STAGES


def reschedule_after_preemption(delay_s: float) -> AirflowRescheduleException:
    """The exception that runs a preempted stage again, in the same try, after ``delay_s``.

    A reschedule keeps the task's try number, so a preempted node does not use up a retry; the
    stage resumes from the checkpoint it saved. The stage caps how often one run may be preempted
    (``--max-preemptions``); past that it fails like any other error and retries count again.
    """
    return AirflowRescheduleException(datetime.now(UTC) + timedelta(seconds=delay_s))
