"""``pods/exec`` over WebSocket with the ``v5.channel.k8s.io`` / ``v4.channel.k8s.io`` framing.

Each binary message is one channel byte and its data: 0 stdin, 1 stdout, 2 stderr, 3 the error channel,
which carries the command's final ``Status`` (``Success``, or ``Failure`` with the exit code). KPO uses
exec twice: ``/bin/sh -c 'cat /airflow/xcom/return.json'`` to read the XCom sidecar's file, and an
interactive shell to which it writes ``kill -s SIGINT 1`` to stop the sidecar.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

from aiohttp import WSMsgType, web

from .kubelet import XCOM_PATH, Kubelet

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR = b"\x00", b"\x01", b"\x02", b"\x03"
SUCCESS = {"metadata": {}, "status": "Success"}


def exit_status(code: int) -> dict:
    """The error channel's ``Status`` for a command that exited with ``code``."""
    if code == 0:
        return SUCCESS
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


class Exec:
    def __init__(self, kubelet: Kubelet):
        self.kubelet = kubelet

    async def pod_exec(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        ws = web.WebSocketResponse(protocols=PROTOCOLS)
        await ws.prepare(request)
        command = request.query.getall("command", [])
        if command[:2] == ["/bin/sh", "-c"]:
            await self._run(ws, command[2].replace(XCOM_PATH, str(self.kubelet.xcom_dir(ns, name))))
        else:  # an interactive shell: the only thing KPO asks of it is to stop the sidecar
            await self._shell(ws, ns, name)
        await ws.close()
        return ws

    @staticmethod
    async def _run(ws: web.WebSocketResponse, script: str) -> None:
        proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", script,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        if out:
            await ws.send_bytes(STDOUT + out)
        if err:
            await ws.send_bytes(STDERR + err)
        assert proc.returncode is not None
        await ws.send_bytes(ERROR + json.dumps(exit_status(proc.returncode)).encode())

    async def _shell(self, ws: web.WebSocketResponse, ns: str, name: str) -> None:
        async for msg in ws:  # the client sends str stdin as TEXT frames, bytes as BINARY: "\x00" + data
            data = msg.data.encode() if msg.type == WSMsgType.TEXT else msg.data
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) and data[:1] == STDIN and b"kill" in data:
                self.kubelet.stop_sidecar(ns, name)
                await ws.send_bytes(ERROR + json.dumps(SUCCESS).encode())
                break
