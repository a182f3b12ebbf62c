"""ClusterIP Services: each Service port listens on the loopback port its name resolves to (:mod:`.dns`) and
sends every request to one of the Service's ready endpoints, as kube-proxy does, per request.

Endpoints are the pods in the Service's namespace whose labels match its ``selector``, running and
``Ready``, taken in turn. A request goes to the pod's process, at the loopback port the kubelet gave its
container port (the Service's ``targetPort``, by name or number). A pod whose container is simulated (no
process) answers as a serving pod of its template would: ``/readyz``, ``/metadata`` with the model name and
version from its environment, ``/embed`` as :attr:`Services.behaviour` says. With no ready endpoint the
Service answers 503, as a proxy in front of it would.

A change of a Service (its selector) applies to the next request: requests already sent to a pod finish there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import aiohttp
from aiohttp import web

from .dns import Dns
from .kubelet import POD_IP, Kubelet
from .store import Store, selector_matches
from .workloads import pod_ready

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


class Services:
    def __init__(self, store: Store, dns: Dns, kubelet: Kubelet):
        self.store, self.dns, self.kubelet = store, dns, kubelet
        # What a simulated serving pod answers on /embed: {"dim": int, "status": int, "delay_s": float}.
        self.behaviour: Callable[[dict], dict] = lambda pod: {}
        self.sent: dict[tuple[str, str], list[str]] = {}  # (namespace, service) -> the pod each request went to
        self._listening: dict[tuple[str, str, int], web.AppRunner] = {}
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None

    def local_port(self, ns: str, name: str, port: int) -> int:
        """The loopback port where ``name``:``port`` answers (the one pods' commands are rewritten to)."""
        key = (ns, name, "", port)
        if key not in self.dns.ports:
            from .dns import _free_port

            self.dns.ports[key] = _free_port()
        return self.dns.ports[key]

    def changed(self, ns: str, name: str) -> None:
        """A Service was created or changed: listen on each of its ports (a headless one has no proxy)."""
        svc = self.store.objects.get(("services", ns, name))
        if svc is None or svc["spec"].get("clusterIP") == "None" or not svc["spec"].get("selector"):
            return
        for port in svc["spec"].get("ports", []):
            if (ns, name, port["port"]) not in self._listening:
                self._listening[(ns, name, port["port"])] = None  # type: ignore[assignment]
                self.store.spawn(self._listen(ns, name, port["port"]))

    async def _listen(self, ns: str, name: str, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", lambda request: self._forward(request, ns, name, port))
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, POD_IP, self.local_port(ns, name, port)).start()
        self._listening[(ns, name, port)] = runner

    async def ready(self, ns: str, name: str, port: int) -> None:
        """Wait until the Service's port is listening."""
        self.changed(ns, name)
        while self._listening.get((ns, name, port)) is None:
            await asyncio.sleep(0.01)

    def endpoints(self, ns: str, name: str) -> list[dict]:
        svc = self.store.objects.get(("services", ns, name))
        if svc is None:
            return []
        selector = ",".join(f"{k}={v}" for k, v in svc["spec"].get("selector", {}).items())
        return sorted((p for p in self.store.items("pods", ns) if pod_ready(p)
                       and selector_matches(p["metadata"].get("labels", {}), selector)),
                      key=lambda p: p["metadata"]["name"])

    async def _forward(self, request: web.Request, ns: str, name: str, port: int) -> web.StreamResponse:
        body = await request.read()
        endpoints = self.endpoints(ns, name)
        if not endpoints:
            return web.json_response({"detail": f"no endpoints available for service {name!r}"}, status=503)
        pod = endpoints[next(self._turn) % len(endpoints)]
        self.sent.setdefault((ns, name), []).append(pod["metadata"]["name"])
        container = self.kubelet.containers.get((ns, pod["metadata"]["name"]))
        if container is None or container.proc is None:
            return await self._simulated(request, pod, body)
        svc = self.store.objects[("services", ns, name)]
        target = next(p.get("targetPort", p["port"]) for p in svc["spec"]["ports"] if p["port"] == port)
        base = next(c for c in pod["spec"]["containers"] if c.get("ports"))
        named = {p.get("name"): p["containerPort"] for p in base["ports"]}
        local = self.kubelet.port(ns, pod["metadata"]["name"], named.get(target, target) if isinstance(target, str)
                                  else int(target))
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with self._session.request(request.method, f"http://{POD_IP}:{local}{request.path_qs}",
                                             headers=headers, data=body) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(body=payload, status=upstream.status, headers=out)
        except aiohttp.ClientError as exc:
            return web.json_response({"detail": f"upstream connect error: {exc}"}, status=503)

    async def _simulated(self, request: web.Request, pod: dict, body: bytes) -> web.Response:
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        version = {"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION")}
        path = request.path
        if path.endswith("/readyz"):
            return web.json_response({"status": "ready", "model_version": version["model_version"]})
        if path.endswith("/metadata"):
            return web.json_response({**version, "ready": True})
        if path.endswith("/embed"):
            behaviour = {"dim": 2048, "status": 200, "delay_s": 0.0, **self.behaviour(pod)}
            await asyncio.sleep(behaviour["delay_s"])  # the emulated pods' latency
            if behaviour["status"] != 200:
                return web.json_response({"detail": "emulated failure"}, status=behaviour["status"])
            dim = behaviour["dim"]
            return web.json_response({**version, "dim": dim, "embedding": [dim ** -0.5] * dim})
        return web.json_response({"detail": f"{path}: not emulated for a simulated pod"}, status=404)

    async def close(self) -> None:
        for runner in self._listening.values():
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
        if self._session is not None:
            await self._session.close()
