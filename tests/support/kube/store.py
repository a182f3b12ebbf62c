"""What every role of the emulator shares: the object store (etcd, in effect) and the API's object formats.

The store hands out resourceVersions and wakes whoever waits for a change (watch streams). It is touched
only on the emulator's event loop; :class:`~tests.support.kube.KubeEmulator` moves calls from a test's
thread onto that loop.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid
from collections.abc import Coroutine
from typing import Any

from aiohttp import web


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: str, reason: str, message: str = "") -> dict:
    """A status condition (Deployment ``Progressing``, Pod ``DisruptionTarget``)."""
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": now(), "lastTransitionTime": now()}


def status_response(code: int, reason: str, message: str) -> web.Response:
    """A ``Status`` object, as the API server answers every error."""
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                              "reason": reason, "code": code}, status=code)


def merge(target: dict, patch: dict, *, strategic: bool = False) -> dict:
    """JSON merge patch (RFC 7386); enough for label patches.

    With ``strategic``, a strategic merge patch as far as Deployments need it: lists of named items merge by name.
    """
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value, strategic=strategic)
        elif strategic and isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value) \
                and isinstance(target.get(key), list):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item, strategic=True)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)
    return target


def strategic_merge(target: dict, patch: dict) -> dict:
    return merge(target, patch, strategic=True)


def selector_matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_matches(obj: dict, selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        path, value = term.split("=", 1)
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node) != value:
            return False
    return True


class Changes:
    """A counter that can be awaited: each change advances it and wakes every waiter.

    A waiter remembers the count it has seen and waits past it, so that no change made between its look
    and its wait is missed.
    """

    def __init__(self) -> None:
        self.count = 0
        self._event: asyncio.Event | None = None

    def advance(self) -> int:
        self.count += 1
        if self._event is not None:
            self._event.set()
            self._event = None
        return self.count

    async def wait_past(self, seen: int) -> None:
        while self.count <= seen:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()


class Store:
    """Objects by (resource, namespace, name), each with the resourceVersion of its last change."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.changes = Changes()  # its count is the latest resourceVersion
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background (a kubelet's pod, a rollout), keeping the task until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def resource_version(self) -> int:
        return self.changes.count

    def bump(self, obj: dict) -> dict:
        """Record a change to ``obj``: a new resourceVersion, and every watcher woken."""
        obj["metadata"]["resourceVersion"] = str(self.changes.advance())
        return obj

    def stop(self) -> None:
        self.stopping = True
        self.changes.advance()

    def items(self, resource: str, namespace: str, fields: str | None = None) -> list[dict]:
        return [o for (r, n, _), o in self.objects.items() if r == resource and n == namespace
                and field_matches(o, fields)]

    def event(self, ns: str, pod: str, reason: str, message: str, kind: str = "Normal") -> None:
        name = f"{pod}.{uuid.uuid4().hex[:10]}"
        self.objects[("events", ns, name)] = self.bump({
            "metadata": {"name": name, "namespace": ns}, "type": kind, "reason": reason, "message": message,
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1})
