"""The local stack: MLflow, the serving API and Airflow's components as local processes.

``python -m localdev.stack up|down|status`` (``make up`` / ``make down``). Airflow runs the way it
runs in production, as separate processes: API server (UI, REST API and the Task SDK's execution
API), scheduler with the LocalExecutor, DAG processor and triggerer, on a SQLite metadata database.

- **One place for every address:** MLflow, serving and Airflow listen where the settings say
  (``MLFLOW_TRACKING_URI``, ``RETRAIN_SERVING_URL``, ``RETRAIN_AIRFLOW_URL``); the execution API URL the
  task workers call and the UI's base URL are derived from the Airflow URL, so no component can point
  at another one's port. Nothing listens on another interface: the worker and triggerer log servers
  are not started, because every component reads the task logs from the same folder.
- **Sized to the machine:** the LocalExecutor starts ``parallelism`` workers up front; it is the number
  of CPUs (at least 2, at most 16), not Airflow's default of 32.
- **Secrets made here, never written in code:** the JWT secret the components share and the ``admin``
  password are random, created once per ``RETRAIN_HOME`` in files only the user can read.
- **A clean stop:** every process the stack starts, and everything those start (executor workers,
  task processes, stage subprocesses in their own sessions), carries a marker in its environment.
  ``down`` stops Airflow first (the scheduler's tree: a running stage gets SIGTERM, saves a checkpoint
  and exits), then the other components, then anything left with the marker, and returns only when
  none is left.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from localdev import processes
from retrain.settings import Settings
from retrain.waiting import poll

REPO = Path(__file__).resolve().parents[1]
ADMIN_USER = "admin"
AIRFLOW_COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer")
STOP_ORDER = ("scheduler", "triggerer", "dag-processor", "api-server", "serving", "mlflow")
STOP_GRACE_S = 45.0  # a stopped training stage saves a checkpoint first (the local runner allows it 30 s)
SERVING_POLL_S = 0.25  # the serving process reads its record this often: a switch takes effect within it


class StackError(RuntimeError):
    """A component did not start or stop; the message names it and its log file."""


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    url: str = ""


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or (443 if parsed.scheme == "https" else 80)


class LocalStack:
    """The processes of local mode for one ``RETRAIN_HOME``."""

    def __init__(self, settings: Settings, base_env: dict[str, str] | None = None):
        self.settings = settings
        self.home = settings.home
        self.base_env = dict(os.environ if base_env is None else base_env)

    # -- where things are --------------------------------------------------------------------------

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    @property
    def parallelism(self) -> int:
        return max(2, min(16, os.cpu_count() or 2))

    # -- secrets and environment -------------------------------------------------------------------

    def _secrets(self) -> dict[str, str]:
        """The stack's random secrets, created on first use (mode 0600)."""
        path = self.airflow_home / "localdev-secrets.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            values = {"jwt_secret": secrets.token_urlsafe(32), "api_secret_key": secrets.token_urlsafe(32),
                      "admin_password": secrets.token_urlsafe(12)}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(values, fh)
        return json.loads(path.read_text())

    @property
    def admin_password(self) -> str:
        return self._secrets()["admin_password"]

    def _passwords_file(self) -> Path:
        path = self.airflow_home / "simple_auth_manager_passwords.json"
        wanted = {ADMIN_USER: self.admin_password}
        if not path.exists() or json.loads(path.read_text()) != wanted:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(wanted, fh)
        return path

    def airflow_env(self) -> dict[str, str]:
        """The environment of every process of the stack, the Airflow CLI included."""
        s = self.settings
        host, port = host_port(s.airflow_url)
        keys = self._secrets()
        env = dict(self.base_env)
        env.update({
            processes.MARKER: str(self.home),
            "RETRAIN_HOME": str(self.home),
            "MLFLOW_TRACKING_URI": s.tracking_uri,
            "RETRAIN_SERVING_URL": s.serving_url,
            "RETRAIN_AIRFLOW_URL": s.airflow_url,
            "AIRFLOW_HOME": str(self.airflow_home),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # MLflow's job consumers: 8 processes this never uses
            "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's messages in task logs at their own level, not as stderr
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            # A task whose scheduler died (killed, machine restarted) is reset and run again this soon after a
            # new scheduler starts, resuming from its checkpoint (Airflow's default is every 5 minutes).
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
            "AIRFLOW__API__HOST": host,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": s.airflow_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.airflow_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": keys["api_secret_key"],
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self._passwords_file()),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "plugins"), str(REPO),
                                                      self.base_env.get("PYTHONPATH", "")) if p),
        })
        return env

    # -- components --------------------------------------------------------------------------------

    def _airflow_healthy(self, component: str) -> Callable[[], bool]:
        def check() -> bool:
            try:
                health = requests.get(f"{self.settings.airflow_url}/api/v2/monitor/health", timeout=2).json()
            except (requests.RequestException, ValueError):
                return False
            return (health.get(component.replace("-", "_")) or {}).get("status") == "healthy"

        return check

    def components(self) -> list[Component]:
        s = self.settings
        bin_dir = Path(sys.executable).parent
        mlflow_host, mlflow_port = host_port(s.tracking_uri)
        serving_host, serving_port = host_port(s.serving_url)
        airflow = str(bin_dir / "airflow")
        return [
            Component("mlflow", [str(bin_dir / "mlflow"), "server",
                                 "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                                 "--artifacts-destination", str(self.home / "mlartifacts"),
                                 "--host", mlflow_host, "--port", str(mlflow_port), "--workers", "1"],
                      lambda: _http_ok(f"{s.tracking_uri}/health"), s.tracking_uri),
            Component("serving", [s.local_python, "-m", "embedder.serving", "--state-uri", s.serving_state_uri,
                                  "--host", serving_host, "--port", str(serving_port),
                                  "--sample-uri", s.drift.sample_uri, "--sample-rate", str(s.drift.sample_rate),
                                  "--window-seconds", str(s.drift.window_s),
                                  "--mirror-rate", str(s.rollout.mirror_rate), "--poll-interval", str(SERVING_POLL_S),
                                  "--docs"],
                      lambda: _http_ok(f"{s.serving_url}/healthz"), f"{s.serving_url}/docs"),
            Component("api-server", [airflow, "api-server"],
                      lambda: _http_ok(f"{s.airflow_url}/api/v2/monitor/health"), s.airflow_url),
            Component("dag-processor", [airflow, "dag-processor"], self._airflow_healthy("dag-processor")),
            Component("scheduler", [airflow, "scheduler", "--skip-serve-logs"], self._airflow_healthy("scheduler")),
            Component("triggerer", [airflow, "triggerer", "--skip-serve-logs"], self._airflow_healthy("triggerer")),
        ]

    def component(self, name: str) -> Component:
        return next(c for c in self.components() if c.name == name)

    # -- processes ---------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The component's process id, when the process that ``start`` recorded is still alive."""
        return processes.PidFile(self.pid_file(name)).alive()

    def processes(self) -> list[psutil.Process]:
        """Every live process of this stack: the components' sessions, and stage processes by their marker."""
        sessions = {rec[0] for rec in (processes.PidFile(self.pid_file(n)).recorded() for n in STOP_ORDER) if rec}
        return processes.members(sessions, str(self.home))

    def tree(self, name: str) -> list[psutil.Process]:
        return processes.tree(self.pid(name))

    def migrate(self) -> None:
        """Create or upgrade Airflow's metadata database (idempotent)."""
        log = self.log_file("airflow-db-migrate")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            proc = subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                                  env=self.airflow_env(), stdout=fh, stderr=subprocess.STDOUT, cwd=self.home)
        if proc.returncode:
            raise StackError(f"airflow db migrate failed (exit {proc.returncode}); see {log}")

    def start(self, name: str, timeout_s: float = 180.0) -> None:
        component, what = self.component(name), f"{name} (log {self.log_file(name)})"
        if self.pid(name) is None:
            processes.spawn(component.argv, self.airflow_env(), self.log_file(name),
                            processes.PidFile(self.pid_file(name)), self.home)

        def ready() -> bool:
            if self.pid(name) is None:
                raise StackError(f"{what}: the process exited")
            return component.ready()

        poll(ready, timeout_s=timeout_s, interval_s=0.25, on_timeout=lambda: StackError(
            f"{what}: not ready after {timeout_s:.0f} s"))

    def up(self, names: Iterable[str] | None = None, timeout_s: float = 180.0) -> None:
        wanted = list(names) if names is not None else [c.name for c in self.components()]
        self.home.mkdir(parents=True, exist_ok=True)
        if any(n in AIRFLOW_COMPONENTS for n in wanted):
            self.migrate()
        for name in [c.name for c in self.components() if c.name in wanted]:
            self.start(name, timeout_s)

    def kill(self, name: str) -> list[int]:
        """SIGKILL the component and every process below it at once (a crash); returns their pids.

        It returns once all of them have exited, so a ``start`` right after starts a new one.
        """
        procs = self.tree(name)
        processes.kill(procs)
        return [p.pid for p in procs]

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM the component's whole tree, wait for all of it to exit (SIGKILL after ``grace_s``)."""
        procs = self.tree(name)
        if not procs:
            return False
        processes.terminate(procs, grace_s)
        return True

    def down(self, grace_s: float = STOP_GRACE_S) -> dict[str, str]:
        """Stop every component, then anything left that carries the marker; returns what each was."""
        outcome = {name: "stopped" if self.stop(name, grace_s) else "not running" for name in STOP_ORDER}
        leftovers = self.processes()
        if leftovers:
            processes.terminate(leftovers, grace_s)
            outcome["leftover processes"] = f"stopped {len(leftovers)}"
        for name in STOP_ORDER:
            self.pid_file(name).unlink(missing_ok=True)
        return outcome


def print_urls(stack: LocalStack) -> None:
    s = stack.settings
    print(f"   Airflow UI:  {s.airflow_url}   (user {ADMIN_USER}, password {stack.admin_password})")
    print(f"   MLflow UI:   {s.tracking_uri}")
    print(f"   Serving API: {s.serving_url}/docs")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    stack = LocalStack(Settings.from_env())
    if args.action == "up":
        for component in stack.components():
            stack.up([component.name]) if component.name not in AIRFLOW_COMPONENTS else None
        stack.up(AIRFLOW_COMPONENTS)
        for component in stack.components():
            print(f"{component.name}: up (log {stack.log_file(component.name)})")
        print_urls(stack)
    elif args.action == "down":
        for name, what in stack.down().items():
            print(f"{name}: {what}")
    else:
        for component in stack.components():
            state = "ready" if component.ready() else ("starting or failing" if stack.pid(component.name) else "down")
            print(f"{component.name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
