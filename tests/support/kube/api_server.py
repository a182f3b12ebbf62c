"""The API server's routes, over real HTTP, as the cncf-kubernetes provider, the deploy step and kubectl call them.

- pods: list (label/field selectors), create, get, patch (merge), delete; ``pods/log`` and ``pods/exec``
  are served by the kubelet (:mod:`.kubelet`, :mod:`.exec`);
- events: list (``involvedObject.name`` field selector);
- services: list, create, get, delete (headless ones give their pods DNS names, :mod:`.dns`);
- jobs (``batch/v1``, Indexed): list, create, get, delete, run by the Job controller (:mod:`.jobs`);
- pytorchjobs (``kubeflow.org/v1``): the same, run by the Training Operator (:mod:`.training`) once a test
  installs it (before, the resource does not exist: 404);
- deployments: list, get, patch (strategic merge and JSON merge), and for kubectl ``rollout status``
  a watch stream (with streaming-list bookmarks, as kubectl 1.37 asks for) and discovery.

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

from .controllers import DeploymentController
from .exec import Exec
from .jobs import JobController
from .kubelet import Kubelet
from .store import Store, merge, now, selector_matches, status_response, strategic_merge
from .training import TrainingOperator

VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0"}
_RESOURCE = {"namespaced": True, "verbs": ["get", "list", "watch", "create", "patch", "delete"]}
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": group, "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"}} for group in ("apps", "batch")]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "kind": "Pod", "shortNames": ["po"], **_RESOURCE},
        {"name": "services", "singularName": "service", "kind": "Service", "shortNames": ["svc"], **_RESOURCE},
        {"name": "events", "singularName": "event", "kind": "Event", "shortNames": ["ev"], **_RESOURCE}]},
    "/apis/apps/v1": {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
        {"name": "deployments", "singularName": "deployment", "kind": "Deployment", "shortNames": ["deploy"],
         **_RESOURCE}]},
    "/apis/batch/v1": {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "batch/v1", "resources": [
        {"name": "jobs", "singularName": "job", "kind": "Job", "categories": ["all"], **_RESOURCE}]},
}


_KINDS = {"services": ("Service", "v1"), "jobs": ("Job", "batch/v1"), "pytorchjobs": ("PyTorchJob", "kubeflow.org/v1")}


async def _propagation(request: web.Request, default: str) -> str:
    """The deletion's ``propagationPolicy``: from the query or the ``DeleteOptions`` body."""
    if "propagationPolicy" in request.query:
        return request.query["propagationPolicy"]
    body = await request.json() if request.can_read_body else {}
    return (body or {}).get("propagationPolicy") or default


def not_found(resource: str, name: str) -> web.Response:
    return status_response(404, "NotFound", f'{resource} "{name}" not found')


class ApiServer:
    def __init__(self, store: Store, kubelet: Kubelet, controller: DeploymentController):
        self.store = store
        self.kubelet = kubelet
        self.controller = controller
        self.exec = Exec(kubelet)
        self.jobs = JobController(store, self.add_pod, lambda ns, name: self.remove("pods", ns, name))
        self.training = TrainingOperator(store, self.add_pod, lambda ns, svc: self.add_object("services", ns, svc))
        self._controllers = {"jobs": self.jobs, "pytorchjobs": self.training}
        self.created: list[dict] = []  # every pod as it was created
        self.faults: list[int] = []  # statuses to answer the worker's next requests with
        self._cluster_ips = 0

    def app(self, middlewares: Iterable = ()) -> web.Application:
        app = web.Application(middlewares=[*middlewares, self.crds])
        app.router.add_get("/version", lambda r: web.json_response(VERSION))
        for path, doc in DISCOVERY.items():
            app.router.add_get(path, lambda r, doc=doc: web.json_response(doc))
        pods = "/api/v1/namespaces/{ns}/pods"
        app.router.add_get(pods, self.list_pods)
        app.router.add_post(pods, self.create_pod)
        app.router.add_get(pods + "/{name}", self.get_pod)
        app.router.add_patch(pods + "/{name}", self.patch_pod)
        app.router.add_delete(pods + "/{name}", self.delete_pod)
        app.router.add_get(pods + "/{name}/log", self.kubelet.pod_log)
        app.router.add_get(pods + "/{name}/exec", self.exec.pod_exec)
        app.router.add_post(pods + "/{name}/exec", self.exec.pod_exec)
        app.router.add_get("/api/v1/namespaces/{ns}/events", self.list_events)
        for path, resource in (("/api/v1/namespaces/{ns}/services", "services"),
                               ("/apis/batch/v1/namespaces/{ns}/jobs", "jobs"),
                               ("/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs", "pytorchjobs")):
            app.router.add_get(path, lambda r, res=resource: self.list_objects(r, res))
            app.router.add_post(path, lambda r, res=resource: self.create_object(r, res))
            app.router.add_get(path + "/{name}", lambda r, res=resource: self.get_object(r, res))
            app.router.add_delete(path + "/{name}", lambda r, res=resource: self.delete_object(r, res))
        deployments = "/apis/apps/v1/namespaces/{ns}/deployments"
        app.router.add_get(deployments, self.list_deployments)
        app.router.add_get(deployments + "/{name}", self.get_deployment)
        app.router.add_patch(deployments + "/{name}", self.patch_deployment)
        return app

    @web.middleware
    async def inject_faults(self, request: web.Request, handler):
        """Answer the next requests with the statuses of :attr:`faults` (never ``/version``)."""
        if self.faults and request.path != "/version":
            return status_response(self.faults.pop(0), "ServiceUnavailable", "injected fault")
        return await handler(request)

    def _list(self, kind: str, api_version: str, items: list[dict]) -> web.Response:
        return web.json_response({"kind": kind, "apiVersion": api_version,
                                  "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": items})

    # ---- pods ------------------------------------------------------------------------------------
    async def list_pods(self, request: web.Request) -> web.Response:
        items = [o for o in self.store.items("pods", request.match_info["ns"], request.query.get("fieldSelector"))
                 if selector_matches(o["metadata"].get("labels", {}), request.query.get("labelSelector"))]
        return self._list("PodList", "v1", items)

    async def create_pod(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        pod = await request.json()
        name = pod["metadata"]["name"]
        if ("pods", ns, name) in self.store.objects:
            return status_response(409, "AlreadyExists", f'pods "{name}" already exists')
        return web.json_response(self.add_pod(ns, pod), status=201)

    def add_pod(self, ns: str, pod: dict) -> dict:
        """Store a new pod and hand it to the kubelet (for a client's request, or a controller's)."""
        name = pod["metadata"]["name"]
        pod["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        self.store.objects[("pods", ns, name)] = self.store.bump(pod)
        self.created.append(copy.deepcopy(pod))
        self.kubelet.start(ns, name)
        return pod

    def _pod(self, request: web.Request) -> dict | None:
        return self.store.objects.get(("pods", request.match_info["ns"], request.match_info["name"]))

    async def get_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return not_found("pods", request.match_info["name"])
        return web.json_response(pod)

    async def patch_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return not_found("pods", request.match_info["name"])
        merge(pod, await request.json())
        return web.json_response(self.store.bump(pod))

    async def delete_pod(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        pod = self.remove("pods", ns, name, await _propagation(request, "Background"))
        if pod is None:
            return not_found("pods", name)
        return web.json_response(pod)

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

    async def list_events(self, request: web.Request) -> web.Response:
        items = self.store.items("events", request.match_info["ns"], request.query.get("fieldSelector"))
        return web.json_response({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})

    # ---- services, jobs, pytorchjobs ---------------------------------------------------------------
    @web.middleware
    async def crds(self, request: web.Request, handler):
        """Without the Training Operator's CRD, ``pytorchjobs`` is not a resource: 404, as an API server answers."""
        if "/kubeflow.org/" in request.path and not self.training.installed:
            return status_response(404, "NotFound", "the server could not find the requested resource")
        return await handler(request)

    async def list_objects(self, request: web.Request, resource: str) -> web.Response:
        items = [o for o in self.store.items(resource, request.match_info["ns"], request.query.get("fieldSelector"))
                 if selector_matches(o["metadata"].get("labels", {}), request.query.get("labelSelector"))]
        kind, version = _KINDS[resource]
        return self._list(f"{kind}List", version, items)

    async def create_object(self, request: web.Request, resource: str) -> web.Response:
        ns = request.match_info["ns"]
        obj = await request.json()
        name = obj["metadata"]["name"]
        kind, version = _KINDS[resource]
        if (resource, ns, name) in self.store.objects:
            return status_response(409, "AlreadyExists", f'{resource} "{name}" already exists')
        controller = self._controllers.get(resource)
        refusal = controller.admit(ns, obj) if controller else None
        if refusal:
            return status_response(422, "Invalid", f'{kind}.{version.split("/")[0]} "{name}" is invalid: {refusal}')
        return web.json_response(self.add_object(resource, ns, obj), status=201)

    def add_object(self, resource: str, ns: str, obj: dict) -> dict:
        """Store a new Service, Job or PyTorchJob (for a client's request, or a controller's) and hand it to its controller."""
        kind, version = _KINDS[resource]
        obj.update(kind=kind, apiVersion=version)
        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        if resource == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if "clusterIP" not in spec:
                self._cluster_ips += 1
                spec["clusterIP"] = f"10.96.{self._cluster_ips // 256}.{self._cluster_ips % 256}"
            obj["status"] = {"loadBalancer": {}}
        self.store.objects[(resource, ns, obj["metadata"]["name"])] = obj
        if controller := self._controllers.get(resource):
            controller.created(ns, obj)
        self.store.bump(obj)
        return obj

    async def get_object(self, request: web.Request, resource: str) -> web.Response:
        obj = self.store.objects.get((resource, request.match_info["ns"], request.match_info["name"]))
        if obj is None:
            return not_found(resource, request.match_info["name"])
        return web.json_response(obj)

    async def delete_object(self, request: web.Request, resource: str) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        # batch/v1 Jobs orphan their pods unless told otherwise (kubectl asks for Background).
        obj = self.remove(resource, ns, name, await _propagation(request, "Orphan" if resource == "jobs" else "Background"))
        if obj is None:
            return not_found(resource, name)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "details": {"name": name, "kind": resource, "uid": obj["metadata"]["uid"]}})

    # ---- deployments -----------------------------------------------------------------------------
    async def list_deployments(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        if request.query.get("watch") in ("true", "1"):
            return await self._watch_deployments(request, ns)
        return self._list("DeploymentList", "apps/v1", self.store.items("deployments", ns, request.query.get("fieldSelector")))

    async def get_deployment(self, request: web.Request) -> web.Response:
        obj = self.store.objects.get(("deployments", request.match_info["ns"], request.match_info["name"]))
        if obj is None:
            return not_found("deployments.apps", request.match_info["name"])
        return web.json_response(obj)

    async def patch_deployment(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self.store.objects.get(("deployments", ns, name))
        if obj is None:
            return not_found("deployments.apps", name)
        before = copy.deepcopy(obj["spec"])
        body = await request.json()
        kind = request.content_type
        if kind == "application/strategic-merge-patch+json":
            strategic_merge(obj, body)
        elif kind == "application/merge-patch+json":
            merge(obj, body)  # RFC 7386: lists are replaced, as a real API server does
        else:
            return status_response(400, "BadRequest", f"patch type {kind} is not supported by this emulator")
        if obj["spec"] != before:
            obj["metadata"]["generation"] += 1
            self.controller.spec_changed(ns, name, obj, before)
        return web.json_response(self.store.bump(obj))

    async def _watch_deployments(self, request: web.Request, ns: str) -> web.StreamResponse:
        """A watch stream (one JSON event per line), as kubectl's ``rollout status`` consumes it.

        It ends at ``timeoutSeconds``, when the emulator stops, or when the watcher goes away: then the
        server cancels this handler (the runner's ``handler_cancellation``), or a write fails.
        """
        try:
            return await self._stream_deployments(request, ns)
        except ConnectionResetError:  # the watcher went away (kubectl exits as soon as it has its answer)
            return web.Response()

    async def _stream_deployments(self, request: web.Request, ns: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(kind: str, obj: dict) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        selector = request.query.get("fieldSelector")
        sent = int(request.query.get("resourceVersion") or 0)
        if request.query.get("sendInitialEvents") == "true":  # a streaming list: ADDED for each, then a bookmark
            sent = self.store.resource_version
            for obj in self.store.items("deployments", ns, selector):
                await send("ADDED", obj)
            await send("BOOKMARK", {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {
                "resourceVersion": str(sent), "annotations": {"k8s.io/initial-events-end": "true"}}})
        timeout = float(request.query.get("timeoutSeconds") or 300)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.store.stopping:
                    latest = self.store.resource_version
                    for obj in self.store.items("deployments", ns, selector):
                        if int(obj["metadata"]["resourceVersion"]) > sent:
                            await send("MODIFIED", obj)
                    sent = latest
                    await self.store.changes.wait_past(sent)
        return resp
