"""One-line messages for trigger Params the API server refuses.

Airflow validates a new run's ``conf`` against the DAG's Params with jsonschema and answers 400
with ``str(ValidationError)``: the message, then the whole schema and the instance, over several
lines. The Trigger form shows that text as it is. :class:`ParamErrorMiddleware` (installed on the
API server by the plugin) rewrites exactly those answers into one line that names the Param, what
it accepts and what it got, e.g. ``Param 'epochs' (Epochs) must be an integer from 1 to 500; got 2.5``.
Every other response passes through untouched.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from retrain_contract.params import describe

TRIGGER_PATH = re.compile(r"^/api/v2/dags/[^/]+/dagRuns/?$")
_DETAIL = re.compile(r"^Invalid input for param (?P<name>[^:]+): (?P<message>.*?)\n\n"
                     r"Failed validating .*? in schema.*?:\n(?P<schema>.*?)\n\nOn instance.*?:\n(?P<instance>.*)$",
                     re.DOTALL)


def one_line(detail: str) -> str | None:
    """The one-line form of Airflow's Param validation error ``detail``, or None when it is something else."""
    match = _DETAIL.match(detail)
    if not match:
        return None
    name = match.group("name").strip()
    try:
        schema = ast.literal_eval(match.group("schema").strip())
        got = match.group("instance").strip()
    except (ValueError, SyntaxError):
        return f"Param '{name}': {match.group('message').strip()}"
    title = f" ({schema['title']})" if isinstance(schema, dict) and schema.get("title") else ""
    return f"Param '{name}'{title} must be {describe(schema)}; got {got}"


class ParamErrorMiddleware:
    """ASGI middleware: a 400 from ``POST /api/v2/dags/<dag>/dagRuns`` about a Param gets a one-line detail."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not TRIGGER_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_rewritten(message):
            if message["type"] == "http.response.start" and message["status"] == 400:
                held["start"] = message  # wait for the body: the length changes if it is rewritten
                return
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] = held.get("body", b"") + message.get("body", b"")
                if message.get("more_body"):
                    return
                body = _rewrite(held["body"])
                headers = [(k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held["start"], "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_rewritten)


def _rewrite(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    detail = payload.get("detail") if isinstance(payload, dict) else None
    short = one_line(detail) if isinstance(detail, str) else None
    return body if short is None else json.dumps({**payload, "detail": short}).encode()
