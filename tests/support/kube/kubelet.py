"""The fake kubelet: runs each pod's base container as a local subprocess and reports it as a kubelet does.

It "schedules" each new pod (a pod that asks for more ``nvidia.com/gpu`` than the node has stays Pending
with a ``FailedScheduling`` event), then runs the base container: its ``command`` and ``args``, or the
image's entrypoint (read from the project's Dockerfile for the image, :data:`IMAGES`) and ``args``;
``python`` is this interpreter. A container whose image it cannot run (a made-up image in a test) is
**simulated**: it runs without a process, and :attr:`Kubelet.pod_ready` says whether it becomes ready.

Environment: ``envFrom`` Secrets (:attr:`Kubelet.secrets`) and ConfigMaps (from the API), ``valueFrom.fieldRef``
(``metadata.annotations['...']``, ``metadata.name``, ...), ``$HOSTNAME`` the pod's hostname; names of
Services resolve to loopback (:mod:`.dns`); ``/airflow/xcom`` is a folder per pod. Every pod shares this
machine's network, so each container port gets a loopback port of its own, passed to an image's entrypoint as
``--host 127.0.0.1 --port <port>`` (the serving image's flags; :meth:`Kubelet.port` says which). Readiness
probes (``httpGet``) run every :attr:`Kubelet.probe_period` seconds and set the pod's ``Ready`` condition.

A container is every process started in it (each carries the pod's uid in ``$EMULATED_POD_UID``, as a
cgroup would hold them, whatever sessions they start: torchrun starts each rank in one of its own), and it
ends as a container does: SIGKILL to all of them when the pod is deleted, and to what is left when its main
process exits. The pod goes Pending → Running → Succeeded/Failed with container statuses as a real kubelet
reports them. It serves ``pods/log`` (the API server proxies it) and can be made to preempt a pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .dns import Dns, _free_port
from .store import Changes, Store, condition, now, status_response

REPO = Path(__file__).resolve().parents[3]
# Images the kubelet can run without a command: repository name -> (Dockerfile, target) with the entrypoint.
IMAGES = {"embedder-server": ("images/embedder/Dockerfile", "server"),
          "embedder-trainer": ("images/embedder/Dockerfile", "trainer")}
XCOM_PATH = "/airflow/xcom"
SIDECAR = "airflow-xcom-sidecar"
NODE = "emulated-node"
POD_IP = "127.0.0.1"  # every emulated pod runs on this machine
MARKER = "EMULATED_POD_UID"  # in the environment of every process of a pod's container


@dataclass
class Container:
    """The base container of one pod: its process, its log lines so far, and its exit code once it ended."""

    uid: str = ""  # the pod's: what marks the container's processes
    log: list[str] = field(default_factory=list)
    exit_code: int | None = None
    proc: asyncio.subprocess.Process | None = None
    changes: Changes = field(default_factory=Changes)  # a line was logged, or the container ended


def entrypoint(image: str) -> list[str] | None:
    """The ENTRYPOINT of ``image`` (by repository name, tag or digest aside), from its target in the project's Dockerfile."""
    repository = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    if repository not in IMAGES:
        return None
    dockerfile, target = IMAGES[repository]
    stage = None
    for line in (REPO / dockerfile).read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            stage = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else None
        elif words[:1] == ["ENTRYPOINT"] and stage == target:
            return json.loads(line.split(None, 1)[1])
    return None


class Kubelet:
    def __init__(self, store: Store, workdir: Path, env: dict[str, str], dns: Dns | None = None):
        self.store = store
        self.dns = dns or Dns(store)
        self.workdir = workdir
        self.env = env
        self.gpus = 0  # nvidia.com/gpu the node has
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.containers: dict[tuple[str, str], Container] = {}
        self.ports: dict[tuple[str, str, int], int] = {}  # (namespace, pod, container port) -> loopback port
        self.probe_period = 0.2
        self.pod_ready: Callable[[dict], bool] = lambda pod: True  # a simulated container: does its pod get ready?

    def port(self, ns: str, name: str, container_port: int) -> int:
        """The loopback port where the pod's ``container_port`` listens."""
        key = (ns, name, container_port)
        if key not in self.ports:
            self.ports[key] = _free_port()
        return self.ports[key]

    def xcom_dir(self, ns: str, name: str) -> Path:
        """The pod's ``/airflow/xcom``, shared by its base container and the XCom sidecar."""
        return self.workdir / "pods" / ns / name / "xcom"

    # ---- what the API server asks of it ---------------------------------------------------------
    def start(self, ns: str, name: str) -> None:
        """A pod was created: schedule it and run its base container."""
        self.containers[(ns, name)] = Container(uid=self.store.objects[("pods", ns, name)]["metadata"]["uid"])
        self.store.spawn(self._run(ns, name))

    def kill(self, ns: str, name: str) -> None:
        """The pod was deleted: kill its container at once."""
        container = self.containers.get((ns, name))
        if container is not None and container.proc is not None and container.exit_code is None:
            _kill_container(container.uid)

    def preempt(self, ns: str, name: str, reason: str) -> None:
        """What a node's shutdown does to a running pod: the ``DisruptionTarget`` condition, then SIGTERM.

        The container's exit code is then reported as for any other exit (the grace period is the time it takes).
        """
        pod = self.store.objects[("pods", ns, name)]
        pod["status"].setdefault("conditions", []).append(condition(
            "DisruptionTarget", "True", reason, "Pod was terminated in response to imminent node shutdown."))
        self.store.bump(pod)
        self.store.event(ns, name, "Killing", "Stopping container base", "Normal")
        proc = self.containers[(ns, name)].proc
        assert proc is not None, f"pod {ns}/{name} has no running container to preempt"
        proc.send_signal(signal.SIGTERM)

    def stop_sidecar(self, ns: str, name: str) -> None:
        """The XCom sidecar was told to exit (over exec): it terminates with 0."""
        pod = self.store.objects.get(("pods", ns, name))
        if pod is None:
            return
        for st in pod["status"].get("containerStatuses", []):
            if st["name"] == SIDECAR:
                st.update(ready=False, started=False, state={"terminated": {
                    "exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}})
        self._settle(pod)

    async def pod_log(self, request: web.Request) -> web.StreamResponse:
        """``GET pods/{name}/log``: ``timestamps`` prefixes each line; ``follow`` streams until the container ends."""
        ns, name = request.match_info["ns"], request.match_info["name"]
        container = self.containers.get((ns, name))
        if container is None or ("pods", ns, name) not in self.store.objects:
            return status_response(404, "NotFound", f'pods "{name}" not found')
        stamp = request.query.get("timestamps") in ("true", "True", "1")
        follow = request.query.get("follow") in ("true", "True", "1")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        sent = 0
        while True:
            seen = container.changes.count
            while sent < len(container.log):
                line = container.log[sent]
                sent += 1
                await resp.write(((now().replace("Z", ".000000000Z") + " ") if stamp else "").encode() + line.encode())
            if container.exit_code is not None or not follow:
                break
            await container.changes.wait_past(seen)
        await resp.write_eof()
        return resp

    # ---- the pod's life --------------------------------------------------------------------------
    def _settle(self, pod: dict) -> None:
        """Phase from container states, as the kubelet reports it."""
        states = [st["state"] for st in pod["status"].get("containerStatuses", [])]
        if states and all("terminated" in s for s in states):
            base = next(st for st in pod["status"]["containerStatuses"] if st["name"] != SIDECAR)
            pod["status"]["phase"] = "Succeeded" if base["state"]["terminated"]["exitCode"] == 0 else "Failed"
        self.store.bump(pod)

    def _resolve_env(self, ns: str, pod: dict, spec: dict) -> dict[str, str]:
        env = dict(self.env)
        env["HOSTNAME"] = pod["spec"].get("hostname") or pod["metadata"]["name"]
        for source in spec.get("envFrom", []):
            if "configMapRef" in source:
                ref = source["configMapRef"]
                found = self.store.objects.get(("configmaps", ns, ref.get("name", "")))
                if found is None and not ref.get("optional"):
                    raise LookupError(f'configmap "{ref.get("name")}" not found')
                env.update((found or {}).get("data") or {})
                continue
            ref = source.get("secretRef") or {}
            data = self.secrets.get((ns, ref.get("name", "")))
            if data is None and not ref.get("optional"):
                raise LookupError(f'secret "{ref.get("name")}" not found')
            env.update(data or {})
        for var in spec.get("env", []):
            ref = (var.get("valueFrom") or {}).get("fieldRef")
            env[var["name"]] = _field(pod, ref["fieldPath"]) if ref else var.get("value", "")
        return {key: self.dns.rewrite(ns, value) for key, value in env.items()}

    @staticmethod
    def _gpus_requested(spec: dict) -> int:
        limits = (spec.get("resources") or {}).get("limits") or {}
        return int(limits.get("nvidia.com/gpu", 0))

    @staticmethod
    def _waiting(name: str, reason: str) -> dict:
        return {"name": name, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                "state": {"waiting": {"reason": reason}}}

    def _schedule(self, ns: str, name: str, pod: dict, base: dict) -> bool:
        if self._gpus_requested(base) > self.gpus:
            message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
            pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                            "message": message}]
            self.store.event(ns, name, "FailedScheduling", message, "Warning")
            self.store.bump(pod)
            return False
        pod["spec"]["nodeName"] = NODE
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self.store.event(ns, name, "Scheduled", f"Successfully assigned {ns}/{name} to {NODE}")
        return True

    async def _run(self, ns: str, name: str) -> None:
        pod = self.store.objects[("pods", ns, name)]
        spec = pod["spec"]["containers"]
        base = next(c for c in spec if c["name"] != SIDECAR)
        container = self.containers[(ns, name)]
        if not self._schedule(ns, name, pod, base):
            return
        try:
            env = self._resolve_env(ns, pod, base)
        except LookupError as exc:
            pod["status"]["containerStatuses"] = [self._waiting(c["name"], "CreateContainerConfigError") for c in spec]
            self.store.event(ns, name, "Failed", f"Error: {exc}", "Warning")
            self.store.bump(pod)
            return
        xcom = self.xcom_dir(ns, name)
        xcom.mkdir(parents=True, exist_ok=True)
        env["EMBEDDER_RESULT_PATH"] = str(xcom / "return.json")
        env[MARKER] = container.uid
        program = base.get("command") or entrypoint(base.get("image", ""))
        ports = [p["containerPort"] for p in base.get("ports", [])]
        extra = ["--host", POD_IP, "--port", str(self.port(ns, name, ports[0]))] if ports and not base.get("command") \
            else []
        cmd = [self.dns.rewrite(ns, arg) for arg in [*(program or []), *(base.get("args") or []), *extra]]
        if cmd and cmd[0] == "python":
            cmd[0] = sys.executable
        started = now()
        probed = "readinessProbe" in base
        pod["status"].update(phase="Running", startTime=started, podIP=POD_IP, podIPs=[{"ip": POD_IP}], containerStatuses=[
            {"name": c["name"], "ready": not probed, "started": True, "restartCount": 0, "image": c["image"],
             "imageID": "", "state": {"running": {"startedAt": started}}} for c in spec])
        pod["status"]["conditions"].append({"type": "Ready", "status": "False" if probed else "True"})
        self.store.bump(pod)
        if program is None:  # an image this kubelet cannot run: the container is simulated
            self.store.spawn(self._simulate(ns, name, pod))
            return
        proc = container.proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir)
        if probed:
            self.store.spawn(self._probe(ns, name, pod, base, container))

        async def read() -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                container.log.append(line.decode(errors="replace"))
                container.changes.advance()

        reading = asyncio.ensure_future(read())
        code = await proc.wait()
        _kill_container(container.uid)  # the container ends with its main process: what it left holds no pipe
        await reading
        container.exit_code = code
        container.changes.advance()
        for st in pod["status"]["containerStatuses"]:
            if st["name"] == base["name"]:
                st.update(ready=False, started=False, state={"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                    "startedAt": started, "finishedAt": now()}})
        self._settle(pod)


    def _set_ready(self, pod: dict, ready: bool) -> None:
        cond = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        if (cond["status"] == "True") != ready:
            cond["status"] = "True" if ready else "False"
            for st in pod["status"].get("containerStatuses", []):
                if "running" in st["state"]:
                    st["ready"] = ready
            self.store.bump(pod)

    async def _simulate(self, ns: str, name: str, pod: dict) -> None:
        """A container without a process: ready (or never) as :attr:`pod_ready` says, until the pod is deleted."""
        await asyncio.sleep(self.probe_period)
        if ("pods", ns, name) in self.store.objects:
            self._set_ready(pod, bool(self.pod_ready(pod)))

    async def _probe(self, ns: str, name: str, pod: dict, base: dict, container: Container) -> None:
        """The readiness probe (``httpGet`` on a container port) while the container runs."""
        import aiohttp

        probe = base["readinessProbe"].get("httpGet") or {}
        port = probe.get("port")
        named = {p.get("name"): p["containerPort"] for p in base.get("ports", [])}
        target = self.port(ns, name, named.get(port, port) if isinstance(port, str) else int(port))
        url = f"http://{POD_IP}:{target}{probe.get('path', '/')}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while container.exit_code is None and ("pods", ns, name) in self.store.objects:
                try:
                    async with session.get(url) as resp:
                        ready = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ready = False
                if container.exit_code is None:
                    self._set_ready(pod, ready)
                await asyncio.sleep(self.probe_period)
        self._set_ready(pod, False)


def _kill_container(uid: str) -> None:
    """SIGKILL every process of a pod's container (those whose environment carries its uid), as a runtime stops one."""
    marker = f"{MARKER}={uid}".encode() + b"\0"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours
            if marker in Path(entry.path, "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


_LABELLED = re.compile(r"metadata\.(annotations|labels)\['([^']+)'\]")


def _field(pod: dict, path: str) -> str:
    """A ``fieldRef``'s value: what the downward API gives a container from its own pod."""
    if match := _LABELLED.fullmatch(path):
        return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
    return {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"].get("namespace", ""),
            "metadata.uid": pod["metadata"].get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.podIP": POD_IP, "status.hostIP": POD_IP}[path]
