"""The emulator as tests use it: the roles put together, served on an event loop of their own.

Two ports for the API server: the worker's (behind the Role, every call recorded, faults injected) and an
operator's kubectl's (may watch, nothing recorded); and a port per Service port (:mod:`.service`).
Everything the roles hold is touched only on the emulator's loop; calls from a test's thread that read or
change it are run there.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .api_server import ApiServer
from .kubelet import Kubelet
from .objects import KINDS
from .rbac import Rbac
from .service import Services
from .store import Store
from .workloads import Workloads


class _Delegate:
    """An attribute of :class:`KubeEmulator` that lives on one of its roles (tests read and set it on the emulator)."""

    def __init__(self, role: str, attr: str):
        self.role, self.attr = role, attr

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(getattr(obj, self.role), self.attr)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.role), self.attr, value)


class KubeEmulator:
    gpus = _Delegate("kubelet", "gpus")  # nvidia.com/gpu the node has: a pod asking for more stays Pending
    controller_delay = _Delegate("workloads", "tick")  # seconds between the controllers' passes when nothing changes
    pod_ready = _Delegate("kubelet", "pod_ready")  # pod_ready(pod): does a simulated container's pod become ready?
    hpa_replicas = _Delegate("workloads", "hpa_replicas")  # the replicas an HPA's metrics ask for (None: its minimum)
    service_behaviour = _Delegate("services", "behaviour")  # behaviour(pod) -> {"dim", "status", "delay_s"}
    created = _Delegate("api", "created")  # every pod as it was created
    requests = _Delegate("rbac", "requests")  # (verb, resource) of the worker's calls
    denied = _Delegate("rbac", "denied")  # the worker's calls the Role refused

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.store = Store()
        self.kubelet = Kubelet(self.store, workdir, dict(os.environ if env is None else env))
        self.api = ApiServer(self.store, self.kubelet)
        self.workloads = Workloads(self.store, self.api.add_pod, lambda ns, name: self.api.remove("pods", ns, name))
        self.services = Services(self.store, self.kubelet.dns, self.kubelet)
        self.api.on_service.append(self.services.changed)
        self.rbac = Rbac()
        self.url = ""  # the worker's API server
        self.operator_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runners: list[web.AppRunner] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> KubeEmulator:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve())
            except BaseException as exc:
                failed.append(exc)
                return
            finally:
                ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True, name="kube-emulator").start()
        if not ready.wait(30) or failed:
            raise RuntimeError("the Kubernetes emulator did not start") from (failed[0] if failed else None)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def stop() -> None:
            self.store.stop()  # watch streams end, the controllers stop
            for (ns, name), container in list(self.kubelet.containers.items()):
                if container.exit_code is None:
                    self.kubelet.kill(ns, name)
            await self.services.close()
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None
        if self.workloads.failures:  # an emulator bug must not pass as the system's behaviour
            raise AssertionError(f"the emulator's controllers failed: {self.workloads.failures[:3]}")

    async def _serve(self) -> None:
        self.url = await self._listen(self.api.app(middlewares=[self.rbac.middleware, self.api.inject_faults]))
        self.operator_url = await self._listen(self.api.app())
        self.store.spawn(self.workloads.run())

    async def _listen(self, app: web.Application) -> str:
        # handler_cancellation: a handler that streams (a watch, a followed log) is cancelled when its client goes.
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the emulator's loop, where the roles' state lives, and return its result."""
        async def call() -> Any:
            return fn(*args)

        assert self._loop is not None, "start() the emulator first"
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(30)

    def kubeconfig(self, path: Path, namespace: str = "retrain", user: str = "airflow-worker") -> Path:
        """A kubeconfig for ``user``: ``airflow-worker`` (the project's Role: no watch, every call
        recorded) or ``operator`` (a person running kubectl: may watch, calls not recorded)."""
        server = self.url if user == "airflow-worker" else self.operator_url
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": server}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }))
        return path

    def service_url(self, namespace: str, name: str, port: int = 80) -> str:
        """Where the Service ``name`` answers (its proxy to its ready endpoints), once it exists."""
        async def listening() -> None:
            await self.services.ready(namespace, name, port)

        assert self._loop is not None, "start() the emulator first"
        asyncio.run_coroutine_threadsafe(listening(), self._loop).result(30)
        return f"http://127.0.0.1:{self.services.local_port(namespace, name, port)}"

    # ---- test controls ---------------------------------------------------------------------------
    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.kubelet.secrets[(namespace, name)] = dict(data)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the worker's next ``count`` API requests with ``status``."""
        self.api.faults.extend([status] * count)

    def fail_next_request(self, method: str, path_part: str, status: int = 503, times: int = 1) -> None:
        """Answer the worker's next ``times`` ``method`` requests whose path contains ``path_part`` with ``status``."""
        self.api.fault_rules.append([method, path_part, status, times])

    @property
    def faults_pending(self) -> int:
        return len(self.api.faults)

    def apply(self, docs: list[dict], namespace: str = "retrain") -> None:
        """Create the objects of rendered manifests (as a first ``kubectl apply`` does, without kubectl)."""
        def create() -> None:
            for doc in docs:
                doc = copy.deepcopy(doc)
                ns = doc["metadata"].pop("namespace", namespace)
                resource = next(k.resource for k in KINDS if k.kind == doc["kind"])
                if (resource, ns if resource != "namespaces" else "", doc["metadata"]["name"]) not in self.store.objects:
                    self.api.add_object(resource, ns if resource != "namespaces" else "", doc)

        self._in_loop(create)

    def install_training_operator(self) -> None:
        """The Kubeflow Training Operator and its CRDs: ``pytorchjobs`` becomes a resource (:mod:`.training`)."""
        self.api.installed.add("pytorchjobs")
        self.api.training.installed = True

    def install_argo_rollouts(self) -> None:
        """Argo Rollouts and its CRDs: ``rollouts`` becomes a resource (:mod:`.rollouts`)."""
        self.api.installed |= {"rollouts", "analysisruns"}

    def preempt(self, namespace: str, name: str, reason: str = "TerminationByKubelet") -> None:
        """What a node's shutdown does to a running pod: the ``DisruptionTarget`` condition, then SIGTERM."""
        self._in_loop(self.kubelet.preempt, namespace, name, reason)

    def wait(self, check: Callable[[KubeEmulator], bool], timeout_s: float = 120, what: str = "the cluster") -> None:
        """Until ``check(self)`` is true (it runs on the test's thread; reads go through the emulator's loop)."""
        from retrain.waiting import poll

        poll(lambda: check(self), timeout_s=timeout_s, interval_s=0.05, what=what)

    # ---- what a test reads -----------------------------------------------------------------------
    def deployment(self, namespace: str, name: str) -> dict:
        return self._in_loop(lambda: copy.deepcopy(self.store.objects[("deployments", namespace, name)]))

    def get(self, resource: str, name: str, namespace: str = "retrain") -> dict | None:
        return self._in_loop(lambda: copy.deepcopy(self.store.objects.get((resource, namespace, name))))

    def endpoints(self, namespace: str, name: str) -> list[str]:
        """The pods a Service sends requests to now."""
        return self._in_loop(lambda: [p["metadata"]["name"] for p in self.services.endpoints(namespace, name)])

    def pods(self, namespace: str = "retrain") -> list[dict]:
        return self._in_loop(lambda: copy.deepcopy(self.store.items("pods", namespace)))

    def objects(self, resource: str, namespace: str = "retrain") -> list[dict]:
        """The ``jobs``, ``services`` (or any resource) the API server holds now."""
        return self._in_loop(lambda: copy.deepcopy(self.store.items(resource, namespace)))

    def logs_of(self, namespace: str, name: str) -> str:
        return "".join(self.kubelet.containers[(namespace, name)].log)

    def verbs(self) -> set[tuple[str, str]]:
        return self.rbac.verbs()
