"""Alert channels against real receivers on loopback: an HTTP server (Slack and generic webhooks) and
an SMTP server (aiosmtpd); drift alerts deduplicated by state and cooldown."""

from __future__ import annotations

import dataclasses
import email
import json
import threading
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from aiosmtpd.controller import Controller

from retrain import alerts, monitor
from retrain.settings import Settings
from tests.helpers import free_port
from tests.support.samples import unit, write_window


class Receiver(ThreadingHTTPServer):
    """Records every POST (path, JSON body); answers ``fail`` 503s first."""

    def __init__(self, fail: int = 0):
        self.posts: list[tuple[str, dict]] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail:
                    receiver.fail -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Inbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def receivers(monkeypatch):
    http = Receiver()
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    env = {"RETRAIN_ALERT_SLACK_WEBHOOK_URL": http.url("/services/T000/B000/slack"),
           "RETRAIN_ALERT_WEBHOOK_URL": http.url("/hooks/retrain"),
           "RETRAIN_ALERT_SMTP_HOST": "127.0.0.1", "RETRAIN_ALERT_SMTP_PORT": str(smtp.port),
           "RETRAIN_ALERT_SMTP_STARTTLS": "false", "RETRAIN_ALERT_EMAIL_TO": "ml-oncall@example.com,owner@example.com"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield http, inbox
    smtp.stop()
    http.shutdown()


def test_every_configured_channel_receives_the_alert(receivers, tmp_path):
    http, inbox = receivers
    settings = Settings.from_env({"RETRAIN_HOME": str(tmp_path)})
    alert = alerts.Alert(kind="drift", title="drift confirmed for m version 3", text="p < 0.01 in 3 windows",
                         fields={"model_version": "3", "p_value": 0.002, "threshold": 0.01})
    outcome = alerts.send_alert(alert, settings)
    assert outcome == {"file": "sent", "slack": "sent", "webhook": "sent", "email": "sent"}
    by_path = dict(http.posts)
    slack = by_path["/services/T000/B000/slack"]
    assert slack["text"] == "drift confirmed for m version 3: p < 0.01 in 3 windows"
    assert any(f["text"] == "*p_value*\n0.002" for f in slack["blocks"][1]["fields"])
    hook = by_path["/hooks/retrain"]
    assert (hook["kind"], hook["fields"]["threshold"]) == ("drift", 0.01)
    [mail] = inbox.messages
    assert mail["Subject"] == "[retrain-embedder] drift confirmed for m version 3"
    assert mail["To"] == "ml-oncall@example.com, owner@example.com"
    assert "p_value: 0.002" in mail.get_body(("plain",)).get_content()


def test_a_failing_channel_is_retried_and_never_stops_the_others(receivers, tmp_path, monkeypatch):
    http, inbox = receivers
    http.fail = 1  # the first POST gets a 503
    monkeypatch.setattr(alerts.time, "sleep", lambda s: None)
    monkeypatch.setenv("RETRAIN_ALERT_SMTP_PORT", str(free_port()))  # nobody listens there
    outcome = alerts.send_alert(alerts.Alert(kind="rollback", title="t", text="x"),
                                Settings.from_env({"RETRAIN_HOME": str(tmp_path)}))
    assert outcome["slack"] == outcome["webhook"] == "sent"  # the 503 was retried
    assert outcome["email"].startswith("ConnectionRefusedError")
    assert len(http.posts) == 2 and inbox.messages == []


def test_drift_alerts_arrive_once_per_state_change_and_again_after_the_cooldown(receivers, world):
    http, inbox = receivers
    settings, client, rng, _ = world
    settings = dataclasses.replace(settings, drift=dataclasses.replace(settings.drift, windows=2, alert_cooldown_h=1))
    same = lambda n: unit(rng.standard_normal((n, 16)) + 2.0)  # noqa: E731
    shifted = lambda n: unit(rng.standard_normal((n, 16)) + np.r_[np.full(8, 3.0), np.full(8, 1.0)])  # noqa: E731
    t0 = 1_800_000_000
    for i, rows in enumerate([same(80), shifted(80), shifted(80)]):
        write_window(settings, t0 + 60 * i, rows)
    monitor.monitor_once(settings, client, now=t0 + 180 + 30)  # ok → drift: alert
    write_window(settings, t0 + 180, shifted(80))
    monitor.monitor_once(settings, client, now=t0 + 240 + 30)  # still drift, inside the cooldown: quiet
    write_window(settings, t0 + 240, shifted(80))
    monitor.monitor_once(settings, client, now=t0 + 300 + 30 + 3600)  # still drift, cooldown over: again
    for i in range(2):
        write_window(settings, t0 + 300 + 60 * i, same(80))
    monitor.monitor_once(settings, client, now=t0 + 420 + 30 + 3600)  # drift → ok: alert
    titles = [body["title"] for path, body in http.posts if path == "/hooks/retrain"]
    assert titles == ["drift confirmed for image-embedder version 1"] * 2 + ["drift cleared for image-embedder version 1"]
    assert [m["Subject"] for m in inbox.messages] == [f"[retrain-embedder] {t}" for t in titles]
    first = next(body for path, body in http.posts if path == "/hooks/retrain")
    assert {"model_version", "p_value", "threshold", "window_start", "mlflow_link"} <= first["fields"].keys()
    assert first["fields"]["model_version"] == "1" and first["fields"]["p_value"] < 0.01
