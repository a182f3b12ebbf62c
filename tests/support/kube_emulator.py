"""A Kubernetes API emulator and a fake kubelet, in-process: the test double for a cluster.

Serves, over real HTTP (and WebSocket for exec), what the cncf-kubernetes provider's
``KubernetesPodOperator`` and the deploy step call:

- pods: list (label/field selectors), create, get, patch (merge), delete; ``pods/log`` (follow,
  timestamps); ``pods/exec`` with the ``v4``/``v5.channel.k8s.io`` framing, used to read the XCom
  sidecar's ``/airflow/xcom/return.json`` and to stop the sidecar;
- events: list (``involvedObject.name`` field selector).

The fake kubelet "schedules" each new pod (a pod that asks for ``nvidia.com/gpu`` stays Pending
with a ``FailedScheduling`` event unless GPUs were added), then runs the base container's command
as a local subprocess: ``python`` is this interpreter, ``envFrom`` Secrets are resolved from the
emulator's Secrets, and ``/airflow/xcom`` is a folder per pod. The pod goes Pending → Running →
Succeeded/Failed with container statuses as a real kubelet reports them.

Every request is recorded as (verb, resource) with RBAC's verb names, so a test can compare what
was called with what a Role grants. Watches are refused with 403, as the project's Role (which
grants none) would have them refused; clients then fall back to polling. Faults: ``fail_next(n, status)`` answers the next n
requests with that status.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

XCOM_PATH = "/airflow/xcom"
SIDECAR = "airflow-xcom-sidecar"


_RESOURCE = {"namespaced": True, "verbs": ["get", "list", "watch", "create", "patch", "delete"]}
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "kind": "Pod", "shortNames": ["po"], **_RESOURCE},
        {"name": "events", "singularName": "event", "kind": "Event", "shortNames": ["ev"], **_RESOURCE}]},
    "/apis/apps/v1": {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
        {"name": "deployments", "singularName": "deployment", "kind": "Deployment", "shortNames": ["deploy"],
         **_RESOURCE}]},
}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(target: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386); enough for label patches."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def strategic_merge(target: dict, patch: dict) -> dict:
    """Strategic merge patch, as far as Deployments need it: lists of named items merge by name."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value) \
                and isinstance(target.get(key), list):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)
    return target


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


@dataclass
class Container:
    log: list[str] = field(default_factory=list)
    exit_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class KubeEmulator:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.env = dict(os.environ if env is None else env)
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name) -> object
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.gpus = 0
        self.requests: list[tuple[str, str]] = []  # (verb, resource) in RBAC's words
        self.created: list[dict] = []  # every pod as it was created
        self.denied: list[tuple[str, str]] = []  # requests refused by the emulated RBAC
        self.pod_ready: Callable[[dict], bool] = lambda template: True
        self.revisions: dict[tuple[str, str], list[dict]] = {}  # pod templates, one per revision
        self.serving: dict[tuple[str, str], dict] = {}  # the pod template whose pods answer the Service
        # What the serving pods of a template answer on /embed: {"dim": int, "status": int, "delay_s": float}.
        self.service_behaviour: Callable[[dict], dict] = lambda template: {}
        self._changed: asyncio.Condition | None = None
        self.operator_port = 0
        self._stopping = False
        self.controller_delay = 0.3  # seconds between the fake Deployment controller's steps
        self.containers: dict[tuple[str, str], Container] = {}
        self._faults: list[int] = []
        self._rv = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> KubeEmulator:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True, name="kube-emulator").start()
        ready.wait(30)
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._loop and self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)

    async def _serve(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/version", lambda r: web.json_response({"major": "1", "minor": "37", "gitVersion": "v1.37.0"}))
        base = "/api/v1/namespaces/{ns}"
        app.router.add_get(base + "/pods", self.list_pods)
        app.router.add_post(base + "/pods", self.create_pod)
        app.router.add_get(base + "/pods/{name}", self.get_pod)
        app.router.add_patch(base + "/pods/{name}", self.patch_pod)
        app.router.add_delete(base + "/pods/{name}", self.delete_pod)
        app.router.add_get(base + "/pods/{name}/log", self.pod_log)
        app.router.add_get(base + "/pods/{name}/exec", self.pod_exec)
        app.router.add_post(base + "/pods/{name}/exec", self.pod_exec)
        app.router.add_get(base + "/events", self.list_events)
        apps = "/apis/apps/v1/namespaces/{ns}/deployments"
        app.router.add_get(apps, self.list_deployments)
        app.router.add_get(apps + "/{name}", self.get_deployment)
        app.router.add_patch(apps + "/{name}", self.patch_deployment)
        for path, doc in DISCOVERY.items():
            app.router.add_get(path, lambda r, doc=doc: web.json_response(doc))
        svc = "/_service/{ns}/{name}"
        app.router.add_get(svc + "/readyz", self.service_readyz)
        app.router.add_get(svc + "/metadata", self.service_metadata)
        app.router.add_post(svc + "/embed", self.service_embed)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        # A second port for people: kubectl run by an operator, who may watch; its calls are not the worker's.
        operator = web.TCPSite(self._runner, "127.0.0.1", 0)
        await operator.start()
        self.operator_port = operator._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def kubeconfig(self, path: Path, namespace: str = "retrain", user: str = "airflow-worker") -> Path:
        """A kubeconfig for ``user``: ``airflow-worker`` (the project's Role: no watch, every call
        recorded) or ``operator`` (a person running kubectl: may watch, calls not recorded)."""
        server = self.url if user == "airflow-worker" else f"http://127.0.0.1:{self.operator_port}"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": server}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }))
        return path

    # ---- test controls ---------------------------------------------------------------------------
    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[(namespace, name)] = dict(data)

    def fail_next(self, count: int, status: int = 503) -> None:
        self._faults.extend([status] * count)

    def add_deployment(self, deployment: dict, ready: Callable[[dict], bool] | None = None) -> None:
        """Create a Deployment already rolled out; ``ready(pod_template)`` says if its new pods become ready."""
        deployment = copy.deepcopy(deployment)
        meta = deployment["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
        replicas = deployment["spec"].get("replicas", 1)
        deployment["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                                "readyReplicas": replicas, "availableReplicas": replicas, "conditions": [
                                    self._condition("Progressing", "True", "NewReplicaSetAvailable")]}
        self.objects[("deployments", meta["namespace"], meta["name"])] = self._bump(deployment)
        self.serving[(meta["namespace"], meta["name"])] = copy.deepcopy(deployment["spec"]["template"])
        self.pod_ready = ready or (lambda template: True)
        self.revisions[(meta["namespace"], meta["name"])] = [copy.deepcopy(deployment["spec"]["template"])]

    def preempt(self, namespace: str, name: str, reason: str = "TerminationByKubelet") -> None:
        """What a node's preemption does to a running pod: the ``DisruptionTarget`` condition, then SIGTERM.

        The kubelet then waits for the container to exit (the grace period); its exit code is reported
        as for any other exit.
        """
        async def preempt() -> None:
            pod = self.objects[("pods", namespace, name)]
            pod["status"].setdefault("conditions", []).append(self._condition(
                "DisruptionTarget", "True", reason, "Pod was terminated in response to imminent node shutdown."))
            self._bump(pod)
            self._event(namespace, name, "Killing", "Stopping container base", "Normal")
            self.containers[(namespace, name)].proc.send_signal(signal.SIGTERM)

        asyncio.run_coroutine_threadsafe(preempt(), self._loop).result(10)

    def deployment(self, namespace: str, name: str) -> dict:
        return copy.deepcopy(self.objects[("deployments", namespace, name)])

    @property
    def faults_pending(self) -> int:
        return len(self._faults)

    def pods(self, namespace: str = "retrain") -> list[dict]:
        return [copy.deepcopy(o) for (r, ns, _), o in self.objects.items() if r == "pods" and ns == namespace]

    def logs_of(self, namespace: str, name: str) -> str:
        return "".join(self.containers[(namespace, name)].log)

    def verbs(self) -> set[tuple[str, str]]:
        return set(self.requests)

    # ---- HTTP plumbing ---------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.path.startswith("/_service/"):  # traffic to a Service, not an API call
            return await handler(request)
        if request.transport and request.transport.get_extra_info("sockname")[1] == self.operator_port:
            return await handler(request)  # kubectl as an operator: not the worker's Role
        verb, resource = self._rbac(request)
        if verb == "watch":  # the project's Role grants no watch: answer as an API server enforcing it would
            self.denied.append((verb, resource))
            return self._status(403, "Forbidden", f"{resource} is forbidden: cannot watch (emulated RBAC)")
        self.requests.append((verb, resource))
        if resource == "pods/exec" and verb == "get":
            # Since Kubernetes 1.35 a WebSocket upgrade to exec is also authorized as `create`.
            self.requests.append(("create", resource))
        if self._faults and request.path != "/version":
            status = self._faults.pop(0)
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "injected fault", "reason": "ServiceUnavailable", "code": status},
                                     status=status)
        return await handler(request)

    @staticmethod
    def _rbac(request: web.Request) -> tuple[str, str]:
        parts = request.path.strip("/").split("/")
        if parts[0] == "version":
            return ("get", "version")
        if parts[0] == "apis":  # /apis/<group>/<version>/... has one segment more than /api/<version>/...
            parts = parts[1:]
        resource = parts[4] if len(parts) > 4 else ""
        sub = parts[6] if len(parts) > 6 else ""
        named = len(parts) > 5
        verb = {"GET": "get" if named else ("watch" if request.query.get("watch") in ("true", "1", "True") else "list"),
                "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method]
        if sub == "exec":
            verb = "create" if request.method == "POST" else "get"
        return (verb, f"{resource}/{sub}" if sub else resource)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code}, status=code)

    def _bump(self, obj: dict) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._notify)
        return obj

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        if self._changed is not None:
            asyncio.get_running_loop().create_task(notify())

    # ---- pods ------------------------------------------------------------------------------------
    async def list_pods(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        items = [o for (r, n, _), o in self.objects.items() if r == "pods" and n == ns
                 and selector_matches(o["metadata"].get("labels", {}), request.query.get("labelSelector"))
                 and field_matches(o, request.query.get("fieldSelector"))]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self._rv)}, "items": items})

    async def create_pod(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        pod = await request.json()
        name = pod["metadata"]["name"]
        if ("pods", ns, name) in self.objects:
            return self._status(409, "AlreadyExists", f'pods "{name}" already exists')
        pod["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        self.objects[("pods", ns, name)] = self._bump(pod)
        self.created.append(copy.deepcopy(pod))
        self.containers[(ns, name)] = Container()
        asyncio.get_running_loop().create_task(self._kubelet(ns, name))
        return web.json_response(pod, status=201)

    def _pod(self, request: web.Request) -> dict | None:
        return self.objects.get(("pods", request.match_info["ns"], request.match_info["name"]))

    async def get_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return self._status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(pod)

    async def patch_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return self._status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        merge(pod, await request.json())
        return web.json_response(self._bump(pod))

    async def delete_pod(self, request: web.Request) -> web.Response:
        key = ("pods", request.match_info["ns"], request.match_info["name"])
        pod = self.objects.pop(key, None)
        if pod is None:
            return self._status(404, "NotFound", f'pods "{key[2]}" not found')
        proc = getattr(self.containers.get(key[1:]), "proc", None)
        if proc is not None and proc.returncode is None:
            proc.kill()
        return web.json_response(pod)

    async def list_events(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        items = [o for (r, n, _), o in self.objects.items() if r == "events" and n == ns
                 and field_matches(o, request.query.get("fieldSelector"))]
        return web.json_response({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _event(self, ns: str, pod: str, reason: str, message: str, kind: str = "Normal") -> None:
        name = f"{pod}.{uuid.uuid4().hex[:10]}"
        self.objects[("events", ns, name)] = self._bump({
            "metadata": {"name": name, "namespace": ns}, "type": kind, "reason": reason, "message": message,
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1})

    # ---- deployments and a fake Deployment controller -------------------------------------------
    @staticmethod
    def _condition(kind: str, status: str, reason: str, message: str = "") -> dict:
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "lastUpdateTime": now(), "lastTransitionTime": now()}

    async def list_deployments(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        if request.query.get("watch") in ("true", "1"):
            return await self._watch_deployments(request, ns)
        items = [o for (r, n, _), o in self.objects.items() if r == "deployments" and n == ns
                 and field_matches(o, request.query.get("fieldSelector"))]
        return web.json_response({"kind": "DeploymentList", "apiVersion": "apps/v1",
                                  "metadata": {"resourceVersion": str(self._rv)}, "items": items})

    async def _watch_deployments(self, request: web.Request, ns: str) -> web.StreamResponse:
        """A watch stream (one JSON event per line), as kubectl's ``rollout status`` consumes it."""
        try:
            return await self._stream_deployments(request, ns)
        except ConnectionResetError:  # the watcher went away (kubectl exits as soon as it has its answer)
            return web.Response()

    async def _stream_deployments(self, request: web.Request, ns: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        selector = request.query.get("fieldSelector")
        sent = int(request.query.get("resourceVersion") or 0)
        if request.query.get("sendInitialEvents") == "true":  # a streaming list: ADDED for each, then a bookmark
            for (r, n, _), obj in list(self.objects.items()):
                if r == "deployments" and n == ns and field_matches(obj, selector):
                    await resp.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            sent = self._rv
            await resp.write(json.dumps({"type": "BOOKMARK", "object": {
                "kind": "Deployment", "apiVersion": "apps/v1", "metadata": {
                    "resourceVersion": str(sent), "annotations": {"k8s.io/initial-events-end": "true"}}}}).encode() + b"\n")
        deadline = asyncio.get_running_loop().time() + float(request.query.get("timeoutSeconds") or 300)
        while asyncio.get_running_loop().time() < deadline and not self._stopping:
            if request.transport is None or request.transport.is_closing():
                break  # the watcher went away
            for (r, n, _), obj in list(self.objects.items()):
                rv = int(obj["metadata"]["resourceVersion"])
                if r == "deployments" and n == ns and rv > sent and field_matches(obj, selector):
                    await resp.write(json.dumps({"type": "MODIFIED", "object": obj}).encode() + b"\n")
            sent = self._rv
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.5)
        return resp

    # ---- the serving Service: what the Deployment's ready pods answer -----------------------------
    def service_url(self, namespace: str, name: str) -> str:
        return f"{self.url}/_service/{namespace}/{name}"

    def _served(self, request: web.Request) -> tuple[dict, dict]:
        key = (request.match_info["ns"], request.match_info["name"])
        template = self.serving[key]
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        return template, env

    async def service_readyz(self, request: web.Request) -> web.Response:
        obj = self.objects[("deployments", request.match_info["ns"], request.match_info["name"])]
        if not obj["status"].get("availableReplicas"):
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def service_metadata(self, request: web.Request) -> web.Response:
        _, env = self._served(request)
        return web.json_response({"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                                  "ready": True})

    async def service_embed(self, request: web.Request) -> web.Response:
        template, env = self._served(request)
        await request.read()
        behaviour = {"dim": 2048, "status": 200, "delay_s": 0.0, **self.service_behaviour(template)}
        await asyncio.sleep(behaviour["delay_s"])
        if behaviour["status"] != 200:
            return web.json_response({"detail": "emulated failure"}, status=behaviour["status"])
        dim = behaviour["dim"]
        return web.json_response({"model_name": env.get("MODEL_NAME"), "model_version": env.get("MODEL_VERSION"),
                                  "dim": dim, "embedding": [dim ** -0.5] * dim})

    async def get_deployment(self, request: web.Request) -> web.Response:
        obj = self.objects.get(("deployments", request.match_info["ns"], request.match_info["name"]))
        if obj is None:
            return self._status(404, "NotFound", f'deployments.apps "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def patch_deployment(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self.objects.get(("deployments", ns, name))
        if obj is None:
            return self._status(404, "NotFound", f'deployments.apps "{name}" not found')
        before = copy.deepcopy(obj["spec"])
        body = await request.json()
        kind = request.content_type
        if kind == "application/strategic-merge-patch+json":
            strategic_merge(obj, body)
        elif kind == "application/merge-patch+json":
            merge(obj, body)  # RFC 7386: lists are replaced, as a real API server does
        else:
            return self._status(400, "BadRequest", f"patch type {kind} is not supported by this emulator")
        if obj["spec"] != before:
            obj["metadata"]["generation"] += 1
            if obj["spec"]["template"] != before["template"]:
                history = self.revisions.setdefault((ns, name), [])
                history.append(copy.deepcopy(obj["spec"]["template"]))
                obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = str(len(history))
                asyncio.get_running_loop().create_task(self._roll(ns, name, obj["metadata"]["generation"]))
        return web.json_response(self._bump(obj))

    async def _roll(self, ns: str, name: str, generation: int) -> None:
        """Surge one new pod at a time (maxUnavailable 0), as the real controller would report it."""
        obj = self.objects[("deployments", ns, name)]
        await asyncio.sleep(self.controller_delay)  # status is stale for a moment after the patch
        if obj["metadata"]["generation"] != generation:
            return
        want = obj["spec"].get("replicas", 1)
        deadline = asyncio.get_running_loop().time() + obj["spec"].get("progressDeadlineSeconds", 600)
        st = obj["status"]
        st.update(observedGeneration=generation, updatedReplicas=0, replicas=want)
        st["conditions"] = [self._condition("Progressing", "True", "ReplicaSetUpdated")]
        self._bump(obj)
        ready = self.pod_ready(obj["spec"]["template"])
        while st["updatedReplicas"] < want:
            await asyncio.sleep(self.controller_delay)
            if obj["metadata"]["generation"] != generation:
                return
            if not ready:
                st.update(replicas=want + 1, updatedReplicas=1, unavailableReplicas=1)
                if asyncio.get_running_loop().time() > deadline:
                    st["conditions"] = [self._condition("Progressing", "False", "ProgressDeadlineExceeded",
                                                        f'ReplicaSet "{name}" has timed out progressing.')]
                    self._bump(obj)
                    return
                self._bump(obj)
                continue
            st.update(updatedReplicas=st["updatedReplicas"] + 1, replicas=want + 1)
            self._bump(obj)
        st.update(replicas=want, readyReplicas=want, availableReplicas=want, unavailableReplicas=0)
        st["conditions"] = [self._condition("Progressing", "True", "NewReplicaSetAvailable")]
        self.serving[(ns, name)] = copy.deepcopy(obj["spec"]["template"])
        self._bump(obj)

    # ---- logs ------------------------------------------------------------------------------------
    async def pod_log(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        container = self.containers.get((ns, name))
        if container is None or self._pod(request) is None:
            return self._status(404, "NotFound", f'pods "{name}" not found')
        stamp = request.query.get("timestamps") in ("true", "True", "1")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        sent = 0
        while True:
            while sent < len(container.log):
                line = container.log[sent]
                sent += 1
                await resp.write(((now().replace("Z", ".000000000Z") + " ") if stamp else "").encode() + line.encode())
            if container.done.is_set() or request.query.get("follow") not in ("true", "True", "1"):
                break
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    # ---- exec ------------------------------------------------------------------------------------
    async def pod_exec(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(request)
        command = request.query.getall("command", [])
        xcom = str(self.workdir / "pods" / ns / name / "xcom")
        if command[:2] == ["/bin/sh", "-c"]:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command[2].replace(XCOM_PATH, xcom),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await proc.communicate()
            if out:
                await ws.send_bytes(b"\x01" + out)
            if err:
                await ws.send_bytes(b"\x02" + err)
            status = {"metadata": {}, "status": "Success"} if proc.returncode == 0 else {
                "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": str(proc.returncode)}]}}
            await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        else:  # an interactive shell: the only thing KPO asks of it is to stop the sidecar
            async for msg in ws:  # the client sends str stdin as TEXT frames, bytes as BINARY: "\x00" + data
                data = msg.data.encode() if msg.type == WSMsgType.TEXT else msg.data
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) and data[:1] == b"\x00" and b"kill" in data:
                    self._stop_sidecar(ns, name)
                    await ws.send_bytes(b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode())
                    break
        await ws.close()
        return ws

    def _stop_sidecar(self, ns: str, name: str) -> None:
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return
        for st in pod["status"].get("containerStatuses", []):
            if st["name"] == SIDECAR:
                st.update(ready=False, started=False, state={"terminated": {
                    "exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}})
        self._settle(pod)

    # ---- the fake kubelet ------------------------------------------------------------------------
    def _settle(self, pod: dict) -> None:
        """Phase from container states, as the kubelet reports it."""
        states = [st["state"] for st in pod["status"].get("containerStatuses", [])]
        if states and all("terminated" in s for s in states):
            base = next(st for st in pod["status"]["containerStatuses"] if st["name"] != SIDECAR)
            pod["status"]["phase"] = "Succeeded" if base["state"]["terminated"]["exitCode"] == 0 else "Failed"
        self._bump(pod)

    def _resolve_env(self, ns: str, spec: dict) -> dict[str, str]:
        env = {k: v for k, v in self.env.items()}
        for source in spec.get("envFrom", []):
            ref = source.get("secretRef") or {}
            data = self.secrets.get((ns, ref.get("name", "")))
            if data is None and not ref.get("optional"):
                raise LookupError(f'secret "{ref.get("name")}" not found')
            env.update(data or {})
        for var in spec.get("env", []):
            env[var["name"]] = var.get("value", "")
        return env

    @staticmethod
    def _gpus_requested(spec: dict) -> int:
        limits = (spec.get("resources") or {}).get("limits") or {}
        return int(limits.get("nvidia.com/gpu", 0))

    async def _kubelet(self, ns: str, name: str) -> None:
        pod = self.objects[("pods", ns, name)]
        spec = pod["spec"]["containers"]
        base = next(c for c in spec if c["name"] != SIDECAR)
        container = self.containers[(ns, name)]
        if self._gpus_requested(base) > self.gpus:
            pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]
            self._event(ns, name, "FailedScheduling", "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                        "Warning")
            self._bump(pod)
            return
        pod["spec"]["nodeName"] = "emulated-node"
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self._event(ns, name, "Scheduled", f"Successfully assigned {ns}/{name} to emulated-node")
        try:
            env = self._resolve_env(ns, base)
        except LookupError as exc:
            pod["status"]["containerStatuses"] = [self._waiting(c["name"], "CreateContainerConfigError") for c in spec]
            self._event(ns, name, "Failed", f"Error: {exc}", "Warning")
            self._bump(pod)
            return
        xcom = self.workdir / "pods" / ns / name / "xcom"
        xcom.mkdir(parents=True, exist_ok=True)
        env["EMBEDDER_RESULT_PATH"] = str(xcom / "return.json")
        cmd = [*(base.get("command") or []), *(base.get("args") or [])]
        if cmd and cmd[0] == "python":
            cmd[0] = sys.executable
        started = now()
        pod["status"].update(phase="Running", startTime=started, containerStatuses=[
            {"name": c["name"], "ready": True, "started": True, "restartCount": 0, "image": c["image"],
             "imageID": "", "state": {"running": {"startedAt": started}}} for c in spec])
        self._bump(pod)
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    cwd=self.workdir)
        container.proc = proc  # type: ignore[attr-defined]
        assert proc.stdout is not None
        async for line in proc.stdout:
            container.log.append(line.decode(errors="replace"))
        code = await proc.wait()
        container.exit_code = code
        container.done.set()
        for st in pod["status"]["containerStatuses"]:
            if st["name"] == base["name"]:
                st.update(ready=False, started=False, state={"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                    "startedAt": started, "finishedAt": now()}})
        self._settle(pod)

    @staticmethod
    def _waiting(name: str, reason: str) -> dict:
        return {"name": name, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                "state": {"waiting": {"reason": reason}}}


def rbac_rules(docs: Iterable[dict], role: str) -> set[tuple[str, str]]:
    """(verb, resource) pairs a Role grants, in the same words as :meth:`KubeEmulator.verbs`."""
    rules = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == role)["rules"]
    return {(verb, res) for rule in rules for res in rule["resources"] for verb in rule["verbs"]}
