"""Local mode's long-running processes: the MLflow tracking server and the serving API.

Both run detached (they outlive the command that started them, as a cluster's services would),
write their logs under ``$RETRAIN_HOME/logs`` and are found again by pid files, so starting them
twice is harmless. ``python -m retrain.localstack up|down|status``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from retrain.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    health_url: str
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    def healthy(self) -> bool:
        try:
            return requests.get(self.health_url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def start(self, env: dict[str, str], timeout_s: float = 120) -> None:
        if self.healthy():
            return
        if self.pid() is None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("ab") as log:
                proc = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.home)
            self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.pid() is None:
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not healthy at {self.health_url} after {timeout_s:.0f}s; see {self.log_file}")
            time.sleep(0.5)

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if self.pid() is None:
                break
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def _host_port(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", str(parsed.port or 80)


def mlflow_service(settings: Settings) -> Service:
    host, port = _host_port(settings.tracking_uri)
    home = settings.home
    return Service("mlflow", [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
        "--host", host, "--port", port, "--workers", "1",
    ], f"{settings.tracking_uri}/health", home)


def serving_service(settings: Settings) -> Service:
    host, port = _host_port(settings.serving_url)
    return Service("serving", [
        settings.local_python, "-m", "embedder.serve", "--state-uri", settings.serving_state_uri,
        "--host", host, "--port", port, "--sample-uri", settings.drift.sample_uri,
        "--sample-rate", str(settings.drift.sample_rate), "--window-seconds", str(settings.drift.window_s),
    ], f"{settings.serving_url}/healthz", settings.home)


def airflow_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the Airflow CLI in local mode: SQLite metadata DB, this repository's DAGs and plugins."""
    env = dict(os.environ if base is None else base)
    env.update({
        "RETRAIN_HOME": str(settings.home),
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "AIRFLOW_HOME": str(settings.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{settings.home / 'airflow' / 'airflow.db'}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "plugins"), env.get("PYTHONPATH", "")) if p),
    })
    return env


def up(settings: Settings) -> None:
    env = airflow_env(settings)
    for service in (mlflow_service(settings), serving_service(settings)):
        service.start(env)
        print(f"{service.name}: up at {service.health_url.rsplit('/', 1)[0]} (log {service.log_file})")


def down(settings: Settings) -> None:
    for service in (serving_service(settings), mlflow_service(settings)):
        print(f"{service.name}: {'stopped' if service.stop() else 'not running'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain.localstack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.action == "up":
        up(settings)
    elif args.action == "down":
        down(settings)
    else:
        for service in (mlflow_service(settings), serving_service(settings)):
            print(f"{service.name}: {'healthy' if service.healthy() else 'down'} ({service.health_url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
