"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import subprocess

import requests

from retrain.waiting import poll


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers 200; RuntimeError at once if ``proc`` (the server) exits first."""

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    poll(up, timeout_s=timeout, interval_s=0.3, what=url)
