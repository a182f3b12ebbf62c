"""Cluster DNS as the emulated pods see it: every pod runs on this machine, so a Service's names resolve to loopback.

In a cluster, a pod reaches a peer at ``<hostname>.<service>.<namespace>.svc.cluster.local:<port>`` (a pod
in a headless Service's subdomain) or at ``<service>:<port>``: another address, the same port. Here all pods
share this machine's network, so each (name, port) gets a loopback port of its own, as each pod has an
address of its own, and the kubelet writes ``127.0.0.1:<that port>`` where a pod's command, arguments or
environment name ``<name>:<port>`` (:meth:`Dns.rewrite`). What the API holds is unchanged: tests see the pod
spec as a cluster would get it. A name that no Service in the pod's namespace gives stays as it is, and does
not resolve, as in a cluster.
"""

from __future__ import annotations

import re
import socket

from .store import Store

DOMAIN = "cluster.local"
ENDPOINT = re.compile(r"(?<![\w.-])([a-z0-9][a-z0-9.-]*[a-z0-9]):(\d{1,5})(?![\w.])")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dns:
    def __init__(self, store: Store):
        self.store = store
        self.ports: dict[tuple[str, str, str, int], int] = {}  # (namespace, service, hostname or "", port) -> loopback port

    def record(self, ns: str, name: str) -> tuple[str, str] | None:
        """(service, hostname or "") that ``name`` names in namespace ``ns``, or None: no such record."""
        for suffix in (f".{ns}.svc.{DOMAIN}", f".{ns}.svc", f".{ns}", ""):
            if suffix and name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        parts = name.split(".")
        service = self.store.objects.get(("services", ns, parts[-1]))
        if service is None or len(parts) > 2:
            return None
        if len(parts) == 2 and service["spec"].get("clusterIP") != "None":
            return None  # only a headless Service gives its pods names
        return parts[-1], parts[0] if len(parts) == 2 else ""

    def rewrite(self, ns: str, text: str) -> str:
        """``text`` with every ``<name>:<port>`` that resolves in ``ns`` written as this machine's ``127.0.0.1:<port>``."""
        def resolve(match: re.Match) -> str:
            record = self.record(ns, match.group(1))
            if record is None:
                return match.group(0)
            key = (ns, *record, int(match.group(2)))
            if key not in self.ports:
                self.ports[key] = _free_port()
            return f"127.0.0.1:{self.ports[key]}"

        return ENDPOINT.sub(resolve, text)
