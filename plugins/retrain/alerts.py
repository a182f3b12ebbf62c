"""The one alert path: every alert the system sends goes through :func:`send_alert`.

Channels: the log (always) and a JSON-lines file (``RETRAIN_ALERT_FILE``, local mode's inbox).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier

from retrain.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    kind: str  # "task_failed", "rollback", "drift", ...
    title: str
    text: str
    severity: str = "error"
    fields: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


def send_alert(alert: Alert, settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    log.log(logging.ERROR if alert.severity == "error" else logging.WARNING, "ALERT [%s] %s: %s %s",
            alert.kind, alert.title, alert.text, json.dumps(alert.fields, default=str))
    if settings.alert_file:
        path = Path(settings.alert_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(asdict(alert), default=str) + "\n")


def task_failure_alert(context: Any) -> Alert:
    ti = context["ti"]
    exc = context.get("exception")
    return Alert(
        kind="task_failed",
        title=f"{ti.dag_id}.{ti.task_id} failed",
        text=f"{type(exc).__name__}: {exc}" if exc else "task failed",
        fields={"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "try_number": ti.try_number},
    )


class FailureNotifier(BaseNotifier):
    """``on_failure_callback`` for tasks: Airflow calls it only on a task's final failure (not on retries)."""

    def notify(self, context: Any) -> None:
        if getattr(context.get("exception"), "alerted", False):
            return  # the task already sent its own, more specific alert
        send_alert(task_failure_alert(context))
