"""What the container tests share: the docker CLI, waiting on a container's healthcheck, step timings."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from retrain.waiting import poll


def docker(*args: str, check: bool = True, timeout: float | None = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def require_engine_and_images(*images: str) -> None:
    """Fail (not skip: these tests run only where an engine was asked for) when something is missing."""
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("needs a Docker engine: `make docker` (.ci/docker-engine) installs and starts one")
    missing = [image for image in images if docker("image", "inspect", image, check=False).returncode != 0]
    if missing:
        pytest.fail(f"images not built: {', '.join(missing)}; build them with `make images` (OFFLINE=1 where no "
                    "registry can be reached)")


def logs(container: str, tail: int = 80) -> str:
    proc = docker("logs", "--tail", str(tail), container, check=False)
    return proc.stdout + proc.stderr


def state(container: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)


def wait_healthy(container: str, timeout_s: float = 120) -> None:
    """Until the container's own healthcheck passes; fails at once (with its log) if it stops."""
    def healthy() -> bool:
        current = state(container)
        if not current["Running"]:
            pytest.fail(f"container {container} exited ({current['ExitCode']}):\n{logs(container)}")
        return current.get("Health", {}).get("Status") == "healthy"

    poll(healthy, timeout_s=timeout_s, interval_s=0.5,
         on_timeout=lambda: AssertionError(f"{container} not healthy after {timeout_s} s:\n{logs(container)}"))


def host_port(container: str, port: str) -> str:
    """``127.0.0.1:N`` where Docker published the container's ``port`` (an ephemeral port: no races)."""
    return docker("port", container, port).stdout.splitlines()[0].strip().replace("0.0.0.0", "127.0.0.1")


class Steps:
    """Each step of a run with its wall time, printed as it ends and as a table at the end."""

    def __init__(self, title: str):
        self.title = title
        self.done: list[tuple[str, float]] = []
        self.started = time.monotonic()

    def run(self, name: str, action: Callable[[], object]) -> object:
        began = time.monotonic()
        print(f"\n[{self.title}] {name} ...", flush=True)
        result = action()
        took = time.monotonic() - began
        self.done.append((name, took))
        print(f"[{self.title}] {name}: {took:.1f} s", flush=True)
        return result

    def table(self) -> str:
        width = max((len(name) for name, _ in self.done), default=10)
        lines = [f"{self.title}: step times", *(f"  {name:<{width}}  {took:7.1f} s" for name, took in self.done),
                 f"  {'total':<{width}}  {time.monotonic() - self.started:7.1f} s"]
        return "\n".join(lines)
