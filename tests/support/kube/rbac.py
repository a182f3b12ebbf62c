"""The project's Role, as the API server would enforce it on the worker's port.

Every request is recorded as (verb, resource) in RBAC's words, so that a test can compare what was
called with what the Role grants (:func:`rbac_rules`). Watches are refused with 403, as the Role (which
grants none) would have them refused; clients then fall back to polling.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from .store import status_response

METHOD_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def verb_of(request: web.Request) -> tuple[str, str]:
    """(verb, resource) of an API request, in RBAC's words: ``("list", "pods")``, ``("get", "pods/log")``."""
    parts = request.path.strip("/").split("/")
    if parts[0] == "version":
        return ("get", "version")
    if parts[0] == "apis":  # /apis/<group>/<version>/... has one segment more than /api/<version>/...
        parts = parts[1:]
    resource = parts[4] if len(parts) > 4 else ""
    sub = parts[6] if len(parts) > 6 else ""
    named = len(parts) > 5
    if request.method == "GET":
        verb = "get" if named else ("watch" if request.query.get("watch") in ("true", "1", "True") else "list")
    else:
        verb = METHOD_VERBS[request.method]
    if sub == "exec":
        verb = "create" if request.method == "POST" else "get"
    return (verb, f"{resource}/{sub}" if sub else resource)


def rbac_rules(docs: Iterable[dict], role: str) -> set[tuple[str, str]]:
    """(verb, resource) pairs a Role grants, in the same words as :meth:`Rbac.verbs`."""
    rules = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == role)["rules"]
    return {(verb, res) for rule in rules for res in rule["resources"] for verb in rule["verbs"]}


class Rbac:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (verb, resource) of every call let through
        self.denied: list[tuple[str, str]] = []  # calls the Role refused

    def verbs(self) -> set[tuple[str, str]]:
        return set(self.requests)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        verb, resource = verb_of(request)
        if verb == "watch":  # the project's Role grants no watch: answer as an API server enforcing it would
            self.denied.append((verb, resource))
            return status_response(403, "Forbidden", f"{resource} is forbidden: cannot watch (emulated RBAC)")
        self.requests.append((verb, resource))
        if resource == "pods/exec" and verb == "get":
            # Since Kubernetes 1.35 a WebSocket upgrade to exec is also authorized as `create`.
            self.requests.append(("create", resource))
        return await handler(request)
