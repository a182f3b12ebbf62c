"""End-to-end support: the local stack on free ports, the REST client, and headless Chromium.

Every component is real and is driven only through its public interface: Airflow's REST API and UI
(Chromium from Debian, driven by Playwright; no browser is ever downloaded), MLflow's tracking
server, the serving API. A failed browser test leaves a screenshot in ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from localdev.airflow_api import AirflowAPI
from localdev.stack import ADMIN_USER, LocalStack
from retrain.settings import Settings
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# A deployment scaled to tests: what runs without a conf (the form's defaults, drift-started runs) train.
SMALL_RUNS = {"RETRAIN_EPOCHS": "1", "RETRAIN_IMAGE_SIZE": "32", "RETRAIN_ARCHITECTURE": "resnet18",
              "RETRAIN_BATCH_SIZE": "32"}
# No client traffic while these stacks deploy: the analysis replays held-out images after 3 s, and the old version
# stays warm 2 s after a switch.
QUIET_DEPLOYS = {"RETRAIN_ANALYSIS_WINDOW_S": "3", "RETRAIN_SCALE_DOWN_DELAY_S": "2"}


class RunningStack:
    """A local stack of the tests' own, its settings, environment and REST client."""

    def __init__(self, home: Path, env: dict[str, str]):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RETRAIN_", "AIRFLOW", "MLFLOW_"))}
        self.env = {**base, "RETRAIN_HOME": str(home),
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
                    "RETRAIN_SERVING_URL": f"http://127.0.0.1:{free_port()}",
                    "RETRAIN_AIRFLOW_URL": f"http://127.0.0.1:{free_port()}", **env}
        self.settings = Settings.from_env(self.env)
        self.stack = LocalStack(self.settings, self.env)
        self.api = AirflowAPI(self.settings.airflow_url, ADMIN_USER, self.stack.admin_password)

    def up(self) -> RunningStack:
        self.stack.up()
        self.api.wait_for_dags({"retrain_embedder", "monitor_drift"})
        return self

    def down_as_make_does(self) -> str:
        """``make down``: the stack's own stop command; returns its output."""
        proc = subprocess.run([sys.executable, "-m", "localdev.stack", "down"], env=self.env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def ports(self) -> list[int]:
        from localdev.stack import host_port

        return [host_port(url)[1] for url in (self.settings.tracking_uri, self.settings.serving_url,
                                              self.settings.airflow_url)]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def started_stack(home: Path, env: dict[str, str]) -> Iterator[RunningStack]:
    """A running stack; on the way out it is stopped with ``make down``'s command, and nothing may be left."""
    running = RunningStack(home, env)
    try:
        yield running.up()
    finally:
        output = running.down_as_make_does()
        left = running.stack.processes()
        assert not left, f"processes left after `make down`: {[(p.pid, p.name()) for p in left]}\n{output}"
        assert not [p for p in running.ports() if listening(p)], output


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's Chromium at /usr/bin/chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield chromium
        chromium.close()


def airflow_page(browser, running: RunningStack, path: str):
    """A new browser tab logged in to the stack's Airflow UI (the login form of its auth manager), at ``path``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{running.settings.airflow_url}/auth/login?next={quote(running.settings.airflow_url + path, safe='')}")
    page.fill('input[name="username"]', ADMIN_USER)
    page.fill('input[name="password"]', running.stack.admin_password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{path.split('?')[0]}**")
    return page


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that drove a browser leaves a screenshot of every page it had open."""
    outcome = yield
    report = outcome.get_result()
    pages = item.funcargs.get("pages") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and pages:
        ARTIFACTS.mkdir(exist_ok=True)
        for i, page in enumerate(pages):
            path = ARTIFACTS / f"{item.name}-{i}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                report.sections.append(("screenshot", str(path)))
            except Exception as exc:  # a closed page: say so instead of hiding the test's own failure
                report.sections.append(("screenshot", f"{path}: {exc}"))


@pytest.fixture
def pages() -> list:
    """Pages a browser test opens register here, so that a failure leaves their screenshots."""
    return []
