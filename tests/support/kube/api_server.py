"""The API server's routes, over real HTTP, as the cncf-kubernetes provider, the deploy step and kubectl call them.

Every resource of :data:`.objects.KINDS` has the REST verbs (list with label and field selectors, create,
get, patch with the three patch types, update, delete), namespaced or cluster-scoped, and discovery, so
``kubectl apply -k``, ``get``, ``rollout status|history|undo`` work against it. Some resources have more:

- pods: created pods go to the kubelet (:mod:`.kubelet`), which serves ``pods/log`` and ``pods/exec`` (:mod:`.exec`);
- jobs (``batch/v1``, Indexed) and pytorchjobs (``kubeflow.org/v1``, once a test installs the Training
  Operator: before, the resource does not exist, 404) go to their controllers (:mod:`.jobs`, :mod:`.training`);
- deployments, replicasets and horizontalpodautoscalers are run by :mod:`.workloads`; a change of a
  Deployment's spec bumps its ``generation``; deployments can be watched (with streaming-list bookmarks, as
  kubectl 1.37 asks for ``rollout status``);
- services get a cluster IP and, once their name is used, a proxy to their ready endpoints (:mod:`.service`).

Deleting an object deletes the objects it owns (``ownerReferences``) as the garbage collector does, unless
the ``propagationPolicy`` is ``Orphan``, which a Job's deletion defaults to in ``batch/v1``.

The same routes serve two ports: the worker's, behind the Role (:mod:`.rbac`) and the injected faults,
and the operator's, where a person's kubectl may watch and nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import Iterable

from aiohttp import web

from .exec import Exec
from .jobs import JobController
from .kubelet import Kubelet
from .objects import BY_RESOURCE, KINDS, Kind, PatchError, discovery, json_patch, merge, strategic_merge
from .store import Store, now, selector_matches, status_response
from .training import TrainingOperator

VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0"}
CRDS = {"pytorchjobs": "kubeflow.org", "rollouts": "argoproj.io", "analysisruns": "argoproj.io"}


async def _propagation(request: web.Request, default: str) -> str:
    """The deletion's ``propagationPolicy``: from the query or the ``DeleteOptions`` body."""
    if "propagationPolicy" in request.query:
        return request.query["propagationPolicy"]
    body = await request.json() if request.can_read_body else {}
    return (body or {}).get("propagationPolicy") or default


def not_found(resource: str, name: str) -> web.Response:
    group = BY_RESOURCE[resource].group if resource in BY_RESOURCE else ""
    return status_response(404, "NotFound", f'{resource}{"." + group if group else ""} "{name}" not found')


class ApiServer:
    def __init__(self, store: Store, kubelet: Kubelet):
        self.store = store
        self.kubelet = kubelet
        self.exec = Exec(kubelet)
        self.jobs = JobController(store, self.add_pod, lambda ns, name: self.remove("pods", ns, name))
        self.training = TrainingOperator(store, self.add_pod, lambda ns, svc: self.add_object("services", ns, svc))
        self._controllers = {"jobs": self.jobs, "pytorchjobs": self.training}
        self.installed: set[str] = set()  # CRDs a test installed (pytorchjobs, rollouts, analysisruns)
        self.created: list[dict] = []  # every pod as it was created
        self.faults: list[int] = []  # statuses to answer the worker's next requests with
        self.fault_rules: list[list] = []  # [method, path part, status, times]: for the next such requests
        self.on_service: list = []  # called with (namespace, name) when a Service is created or changed
        self._cluster_ips = 0

    def app(self, middlewares: Iterable = ()) -> web.Application:
        app = web.Application(middlewares=[*middlewares, self.crds])
        app.router.add_get("/version", lambda r: web.json_response(VERSION))
        app.router.add_get("/openapi/v2", lambda r: status_response(404, "NotFound", "the server could not find the "
                                                                               "requested resource"))
        app.router.add_get("/openapi/v3", lambda r: status_response(404, "NotFound", "the server could not find the "
                                                                               "requested resource"))
        for path in ("/api", "/apis", *{k.prefix for k in KINDS}):
            app.router.add_get(path, lambda r, path=path: self._discovery(r, path))
        pods = "/api/v1/namespaces/{ns}/pods/{name}"
        app.router.add_get(pods + "/log", self.kubelet.pod_log)
        app.router.add_get(pods + "/exec", self.exec.pod_exec)
        app.router.add_post(pods + "/exec", self.exec.pod_exec)
        for kind in KINDS:
            base = f"{kind.prefix}/namespaces/{{ns}}/{kind.resource}" if kind.namespaced else \
                f"{kind.prefix}/{kind.resource}"
            app.router.add_get(base, lambda r, k=kind: self.list(r, k))
            app.router.add_post(base, lambda r, k=kind: self.create(r, k))
            for sub in ("", "/status"):
                app.router.add_get(base + "/{name}" + sub, lambda r, k=kind: self.get(r, k))
                app.router.add_patch(base + "/{name}" + sub, lambda r, k=kind: self.patch(r, k))
                app.router.add_put(base + "/{name}" + sub, lambda r, k=kind: self.update(r, k))
            app.router.add_delete(base + "/{name}", lambda r, k=kind: self.delete(r, k))
        return app

    def _discovery(self, request: web.Request, path: str) -> web.Response:
        doc = discovery(self.installed).get(path)
        return web.json_response(doc) if doc else status_response(404, "NotFound", "the server could not find the "
                                                                                    "requested resource")

    @web.middleware
    async def inject_faults(self, request: web.Request, handler):
        """Answer the next requests with the statuses of :attr:`faults` (never ``/version``)."""
        if self.faults and request.path != "/version":
            return status_response(self.faults.pop(0), "ServiceUnavailable", "injected fault")
        for rule in self.fault_rules:
            method, part, status, _ = rule
            if request.method == method and part in request.path:
                rule[3] -= 1
                if rule[3] <= 0:
                    self.fault_rules.remove(rule)
                return status_response(status, "ServiceUnavailable", "injected fault")
        return await handler(request)

    @web.middleware
    async def crds(self, request: web.Request, handler):
        """A CRD's resource exists only once a test installed it: 404 before, as an API server answers."""
        for resource, group in CRDS.items():
            if f"/{group}/" in request.path and resource not in self.installed:
                return status_response(404, "NotFound", "the server could not find the requested resource")
        return await handler(request)

    # ---- the verbs ---------------------------------------------------------------------------------
    def _ns(self, request: web.Request, kind: Kind) -> str:
        return request.match_info.get("ns", "") if kind.namespaced else ""

    def _obj(self, request: web.Request, kind: Kind) -> dict | None:
        return self.store.objects.get((kind.resource, self._ns(request, kind), request.match_info["name"]))

    async def list(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        ns = self._ns(request, kind)
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, kind, ns)
        items = [o for o in self.store.items(kind.resource, ns, request.query.get("fieldSelector"))
                 if selector_matches(o["metadata"].get("labels", {}), request.query.get("labelSelector"))]
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": {"resourceVersion": str(self.store.resource_version)},
                                  "items": [{"kind": kind.kind, "apiVersion": kind.api_version, **o} for o in items]})

    async def get(self, request: web.Request, kind: Kind) -> web.Response:
        obj = self._obj(request, kind)
        if obj is None:
            return not_found(kind.resource, request.match_info["name"])
        return web.json_response({"kind": kind.kind, "apiVersion": kind.api_version, **obj})

    async def create(self, request: web.Request, kind: Kind) -> web.Response:
        ns = self._ns(request, kind)
        obj = await request.json()
        name = obj["metadata"]["name"]
        if (kind.resource, ns, name) in self.store.objects:
            return status_response(409, "AlreadyExists", f'{kind.resource} "{name}" already exists')
        controller = self._controllers.get(kind.resource)
        refusal = controller.admit(ns, obj) if controller else None
        if refusal:
            return status_response(422, "Invalid", f'{kind.kind}.{kind.group or "core"} "{name}" is invalid: {refusal}')
        if request.query.get("dryRun"):
            return web.json_response(obj, status=201)
        if kind.resource == "pods":
            return web.json_response(self.add_pod(ns, obj), status=201)
        return web.json_response(self.add_object(kind.resource, ns, obj), status=201)

    async def patch(self, request: web.Request, kind: Kind) -> web.Response:
        obj = self._obj(request, kind)
        if obj is None:
            return not_found(kind.resource, request.match_info["name"])
        before = copy.deepcopy(obj)
        body = await request.json()
        patch_type = request.content_type
        try:
            if patch_type == "application/strategic-merge-patch+json":
                strategic_merge(obj, body)
            elif patch_type == "application/merge-patch+json":
                merge(obj, body)  # RFC 7386: lists are replaced, as a real API server does
            elif patch_type == "application/json-patch+json":
                json_patch(obj, body)
            else:
                return status_response(415, "UnsupportedMediaType", f"patch type {patch_type} is not supported")
        except PatchError as exc:
            obj.clear()
            obj.update(before)
            return status_response(422, "Invalid", str(exc))
        self._changed(kind, obj, before)
        return web.json_response({"kind": kind.kind, "apiVersion": kind.api_version, **self.store.bump(obj)})

    async def update(self, request: web.Request, kind: Kind) -> web.Response:
        obj = self._obj(request, kind)
        if obj is None:
            return not_found(kind.resource, request.match_info["name"])
        before = copy.deepcopy(obj)
        body = await request.json()
        keep = {k: before["metadata"][k] for k in ("uid", "creationTimestamp", "generation", "namespace")
                if k in before["metadata"]}
        obj.clear()
        obj.update(body)
        obj["metadata"].update(keep)
        if request.path.endswith("/status"):
            obj["spec"] = before.get("spec")
        else:
            obj["status"] = before.get("status", {})
        self._changed(kind, obj, before)
        return web.json_response(self.store.bump(obj))

    def _changed(self, kind: Kind, obj: dict, before: dict) -> None:
        if obj.get("spec") != before.get("spec") and kind.resource in ("deployments", "replicasets", "rollouts"):
            obj["metadata"]["generation"] = before["metadata"].get("generation", 1) + 1
        if kind.resource == "services":
            for callback in self.on_service:
                callback(obj["metadata"]["namespace"], obj["metadata"]["name"])

    async def delete(self, request: web.Request, kind: Kind) -> web.Response:
        ns, name = self._ns(request, kind), request.match_info["name"]
        # batch/v1 Jobs orphan their pods unless told otherwise (kubectl asks for Background).
        policy = await _propagation(request, "Orphan" if kind.resource == "jobs" else "Background")
        obj = self.remove(kind.resource, ns, name, policy)
        if obj is None:
            return not_found(kind.resource, name)
        if kind.resource == "pods":
            return web.json_response(obj)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "details": {"name": name, "kind": kind.resource, "uid": obj["metadata"]["uid"]}})

    # ---- what controllers call ---------------------------------------------------------------------
    def add_pod(self, ns: str, pod: dict) -> dict:
        """Store a new pod and hand it to the kubelet (for a client's request, or a controller's)."""
        name = pod["metadata"]["name"]
        pod.update(kind="Pod", apiVersion="v1")
        pod["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        self.store.objects[("pods", ns, name)] = self.store.bump(pod)
        self.created.append(copy.deepcopy(pod))
        self.kubelet.start(ns, name)
        return pod

    def add_object(self, resource: str, ns: str, obj: dict) -> dict:
        """Store a new object (for a client's request, or a controller's) and hand it to its controller."""
        kind = BY_RESOURCE[resource]
        obj.update(kind=kind.kind, apiVersion=kind.api_version)
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        if kind.namespaced:
            obj["metadata"]["namespace"] = ns
        if resource == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if "clusterIP" not in spec:
                self._cluster_ips += 1
                spec["clusterIP"] = f"10.96.{self._cluster_ips // 256}.{self._cluster_ips % 256}"
            obj["status"] = {"loadBalancer": {}}
        elif resource in ("deployments", "replicasets", "horizontalpodautoscalers", "rollouts"):
            obj.setdefault("status", {})
        self.store.objects[(resource, ns, obj["metadata"]["name"])] = obj
        if controller := self._controllers.get(resource):
            controller.created(ns, obj)
        self.store.bump(obj)
        if resource == "services":
            for callback in self.on_service:
                callback(ns, obj["metadata"]["name"])
        return obj

    def remove(self, resource: str, ns: str, name: str, propagation: str = "Background") -> dict | None:
        """Delete an object, and what it owns as the garbage collector would (``Orphan``: they lose the owner)."""
        obj = self.store.objects.pop((resource, ns, name), None)
        if obj is None:
            return None
        if resource == "pods":
            self.kubelet.kill(ns, name)
        uid = obj["metadata"].get("uid")
        for (kind, where, dependent), child in list(self.store.objects.items()):
            refs = child["metadata"].get("ownerReferences") or []
            if where != ns or not any(ref.get("uid") == uid for ref in refs):
                continue
            if propagation == "Orphan":
                child["metadata"]["ownerReferences"] = [ref for ref in refs if ref.get("uid") != uid]
                self.store.bump(child)
            else:
                self.remove(kind, ns, dependent)
        self.store.changes.advance()  # whoever waits on the store (a controller, a watch) sees it gone
        return obj

    # ---- watch -------------------------------------------------------------------------------------
    async def _watch(self, request: web.Request, kind: Kind, ns: str) -> web.StreamResponse:
        """A watch stream (one JSON event per line), as kubectl's ``rollout status`` consumes it.

        It ends at ``timeoutSeconds``, when the emulator stops, or when the watcher goes away: then the
        server cancels this handler (the runner's ``handler_cancellation``), or a write fails.
        """
        try:
            return await self._stream(request, kind, ns)
        except ConnectionResetError:  # the watcher went away (kubectl exits as soon as it has its answer)
            return web.Response()

    async def _stream(self, request: web.Request, kind: Kind, ns: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(event: str, obj: dict) -> None:
            body = {"kind": kind.kind, "apiVersion": kind.api_version, **obj}
            await resp.write(json.dumps({"type": event, "object": body}).encode() + b"\n")

        selector = request.query.get("fieldSelector")
        sent = int(request.query.get("resourceVersion") or 0)
        if request.query.get("sendInitialEvents") == "true":  # a streaming list: ADDED for each, then a bookmark
            sent = self.store.resource_version
            for obj in self.store.items(kind.resource, ns, selector):
                await send("ADDED", obj)
            await send("BOOKMARK", {"metadata": {"resourceVersion": str(sent),
                                                 "annotations": {"k8s.io/initial-events-end": "true"}}})
        timeout = float(request.query.get("timeoutSeconds") or 300)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.store.stopping:
                    latest = self.store.resource_version
                    for obj in self.store.items(kind.resource, ns, selector):
                        if int(obj["metadata"]["resourceVersion"]) > sent:
                            await send("MODIFIED", obj)
                    sent = latest
                    await self.store.changes.wait_past(sent)
        return resp
