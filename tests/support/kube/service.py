"""The serving Deployment's Service, on a port of its own: it answers as the pods of the template last
rolled out would.

``/readyz`` follows the Deployment's available replicas; ``/metadata`` and ``/embed`` report the model
name and version from that template's environment. :attr:`ServingService.behaviour` lets a test make a
template's pods fail, slow down or answer with another dimension.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable

from aiohttp import web

from .store import Store


class ServingService:
    def __init__(self, store: Store):
        self.store = store
        self.serving: dict[tuple[str, str], dict] = {}  # the pod template whose pods answer the Service
        # What the serving pods of a template answer on /embed: {"dim": int, "status": int, "delay_s": float}.
        self.behaviour: Callable[[dict], dict] = lambda template: {}

    def serve(self, ns: str, name: str, template: dict) -> None:
        """The pods of ``template`` are the ones available now."""
        self.serving[(ns, name)] = copy.deepcopy(template)

    def app(self) -> web.Application:
        app = web.Application()
        base = "/{ns}/{name}"
        app.router.add_get(base + "/readyz", self.readyz)
        app.router.add_get(base + "/metadata", self.metadata)
        app.router.add_post(base + "/embed", self.embed)
        return app

    def _served(self, request: web.Request) -> tuple[dict, dict]:
        template = self.serving[(request.match_info["ns"], request.match_info["name"])]
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        return template, env

    async def readyz(self, request: web.Request) -> web.Response:
        obj = self.store.objects[("deployments", request.match_info["ns"], request.match_info["name"])]
        if not obj["status"].get("availableReplicas"):
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def metadata(self, request: web.Request) -> web.Response:
        _, env = self._served(request)
        return web.json_response({"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                                  "ready": True})

    async def embed(self, request: web.Request) -> web.Response:
        template, env = self._served(request)
        await request.read()
        behaviour = {"dim": 2048, "status": 200, "delay_s": 0.0, **self.behaviour(template)}
        await asyncio.sleep(behaviour["delay_s"])  # the emulated pods' latency
        if behaviour["status"] != 200:
            return web.json_response({"detail": "emulated failure"}, status=behaviour["status"])
        dim = behaviour["dim"]
        return web.json_response({"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                                  "dim": dim, "embedding": [dim ** -0.5] * dim})
