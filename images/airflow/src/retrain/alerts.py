"""The one alert path: every alert the system sends goes through :func:`send_alert`.

Channels, chosen by configuration (see :class:`AlertSettings`):
- the log, always;
- a JSON-lines file (``RETRAIN_ALERT_FILE``; local mode's inbox);
- a Slack incoming webhook (``RETRAIN_ALERT_SLACK_WEBHOOK_URL``);
- a generic JSON webhook (``RETRAIN_ALERT_WEBHOOK_URL``), which receives the alert as a JSON object;
- email over SMTP (``RETRAIN_ALERT_SMTP_HOST`` and ``RETRAIN_ALERT_EMAIL_TO``).

Webhook URLs and SMTP credentials are secrets: they come from the environment (a Kubernetes Secret
via ``envFrom``), never from code or ConfigMaps. A channel that fails is logged and retried a few
times; it never stops the others, and never fails the task that alerts.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier

from retrain.settings import Settings
from retrain.waiting import retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    kind: str  # "task_failed", "rollback", "drift", ...
    title: str
    text: str
    severity: str = "error"
    fields: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AlertSettings:
    slack_webhook_url: str = ""
    webhook_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_starttls: bool = True
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    email_from: str = "retrain-embedder@localhost"
    email_to: tuple[str, ...] = ()
    attempts: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AlertSettings:
        env = os.environ if env is None else env
        return cls(
            slack_webhook_url=env.get("RETRAIN_ALERT_SLACK_WEBHOOK_URL", ""),
            webhook_url=env.get("RETRAIN_ALERT_WEBHOOK_URL", ""),
            smtp_host=env.get("RETRAIN_ALERT_SMTP_HOST", ""),
            smtp_port=int(env.get("RETRAIN_ALERT_SMTP_PORT", "587")),
            smtp_starttls=env.get("RETRAIN_ALERT_SMTP_STARTTLS", "true").lower() in ("1", "true", "yes"),
            smtp_user=env.get("RETRAIN_ALERT_SMTP_USER", ""),
            smtp_password=env.get("RETRAIN_ALERT_SMTP_PASSWORD", ""),
            email_from=env.get("RETRAIN_ALERT_EMAIL_FROM", "retrain-embedder@localhost"),
            email_to=tuple(a.strip() for a in env.get("RETRAIN_ALERT_EMAIL_TO", "").split(",") if a.strip()),
        )

    @property
    def channels(self) -> list[str]:
        return [name for name, on in (("slack", self.slack_webhook_url), ("webhook", self.webhook_url),
                                      ("email", self.smtp_host and self.email_to)) if on]


def _summary(alert: Alert) -> str:
    fields = "\n".join(f"{k}: {v}" for k, v in alert.fields.items() if v is not None)
    return f"{alert.text}\n\n{fields}".strip()


def _slack(alert: Alert, cfg: AlertSettings) -> None:
    import requests

    icon = ":rotating_light:" if alert.severity == "error" else ":warning:"
    fields = [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in alert.fields.items() if v is not None][:10]
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} *{alert.title}*\n{alert.text}"}}]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    resp = requests.post(cfg.slack_webhook_url, json={"text": f"{alert.title}: {alert.text}", "blocks": blocks},
                         timeout=10)
    resp.raise_for_status()


def _webhook(alert: Alert, cfg: AlertSettings) -> None:
    import requests

    resp = requests.post(cfg.webhook_url, data=json.dumps(asdict(alert), default=str),
                         headers={"Content-Type": "application/json"}, timeout=10)
    resp.raise_for_status()


def _email(alert: Alert, cfg: AlertSettings) -> None:
    msg = EmailMessage()
    msg["Subject"] = f"[retrain-embedder] {alert.title}"
    msg["From"] = cfg.email_from
    msg["To"] = ", ".join(cfg.email_to)
    msg.set_content(_summary(alert))
    msg.add_attachment(json.dumps(asdict(alert), default=str, indent=2).encode(), maintype="application",
                       subtype="json", filename="alert.json")
    with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=15) as smtp:
        if cfg.smtp_starttls:
            smtp.starttls()
        if cfg.smtp_user:
            smtp.login(cfg.smtp_user, cfg.smtp_password)
        smtp.send_message(msg)


SENDERS = {"slack": _slack, "webhook": _webhook, "email": _email}


def send_alert(alert: Alert, settings: Settings | None = None, channels: AlertSettings | None = None) -> dict[str, str]:
    """Deliver ``alert`` on every configured channel; returns ``{channel: "sent" | error}``."""
    settings = settings or Settings.from_env()
    cfg = channels or AlertSettings.from_env()
    log.log(logging.ERROR if alert.severity == "error" else logging.WARNING, "ALERT [%s] %s: %s %s",
            alert.kind, alert.title, alert.text, json.dumps(alert.fields, default=str))
    outcome: dict[str, str] = {}
    if settings.alert_file:
        path = Path(settings.alert_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(asdict(alert), default=str) + "\n")
        outcome["file"] = "sent"
    for name in cfg.channels:
        try:
            retry(lambda send=SENDERS[name]: send(alert, cfg), attempts=cfg.attempts, what=f"alert channel {name}")
            outcome[name] = "sent"
        except Exception as exc:  # a channel's failure must not stop the others or the task
            outcome[name] = f"{type(exc).__name__}: {exc}"
            log.error("alert channel %s failed %d times, giving up: %s", name, cfg.attempts, exc)
    return outcome


def task_failure_alert(context: Any) -> Alert:
    ti = context["ti"]
    exc = context.get("exception")
    return Alert(
        kind="task_failed",
        title=f"{ti.dag_id}.{ti.task_id} failed",
        text=f"{type(exc).__name__}: {exc}" if exc else "task failed",
        fields={"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "try_number": ti.try_number},
    )


def task_defaults(settings: Settings) -> dict[str, Any]:
    """``default_args`` of every DAG here: owner, retries with exponential backoff, an alert on final failure."""
    from datetime import timedelta

    return {
        "owner": "ml-platform",
        "retries": settings.task_retries,
        "retry_delay": timedelta(seconds=settings.retry_delay_s),
        "retry_exponential_backoff": True,
        "on_failure_callback": FailureNotifier(),
    }


class FailureNotifier(BaseNotifier):
    """``on_failure_callback`` for tasks: Airflow calls it only on a task's final failure (not on retries)."""

    def notify(self, context: Any) -> None:
        if getattr(context.get("exception"), "alerted", False):
            return  # the task already sent its own, more specific alert
        send_alert(task_failure_alert(context))
