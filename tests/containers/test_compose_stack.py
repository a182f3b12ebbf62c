"""The docker-compose stack end to end, as a user runs it, with the failure paths it must survive.

One stack (``docker compose up -d --wait`` of docker-compose.yaml, plus docker-compose.ceph.yaml where
``RETRAIN_E2E_S3=ceph``: no registry to pull MinIO from) and one retrain run through Airflow's REST
API with small Params, during which:

- S3 is stopped before the run: ``prepare_data`` fails with a message naming S3, is retried, and
  succeeds once S3is back;
- MLflow is restarted as soon as ``train`` has succeeded (the run is between tasks): the next
  tasks' clients retry and the run succeeds;

then: the serving container reports the promoted version and answers ``/embed`` and ``/similar``;
MLflow's UI API lists the run and the version; the serving container is killed (its process, as a
crash or the OOM killer would) and compose's restart policy brings it back serving the pinned
version; ``docker compose down -v`` leaves no container, network or volume. Each step prints its
wall time, and the table of them closes the run.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from localdev.airflow_api import AirflowAPI
from localdev.compose import write_env
from retrain.waiting import poll
from tests.containers.docker_util import Steps, docker, require_engine_and_images, state

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[2]
TAG = os.environ.get("RETRAIN_IMAGE_TAG", "dev")
S3_KIND = os.environ.get("RETRAIN_E2E_S3", "minio")
DAG = "retrain_embedder"
MODEL = "image-embedder"
SMALL = {"epochs": 1, "image_size": 32, "batch_size": 32, "architecture": "resnet18", "force_retrain": True}
RETRY_DELAY_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Compose:
    project: str
    env_file: Path
    env: dict[str, str]

    def files(self) -> list[str]:
        files = ["-f", "docker-compose.yaml"]
        if S3_KIND == "ceph":
            files += ["-f", "docker-compose.ceph.yaml"]
        return files

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return docker("compose", "-p", self.project, *self.files(), "--env-file", str(self.env_file), *args,
                      check=check, timeout=timeout, cwd=REPO)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def url(self, port_var: str) -> str:
        return f"http://127.0.0.1:{self.env[port_var]}"

    def diagnose(self) -> str:
        return self("ps", "-a", check=False).stdout + self("logs", "--tail", "60", check=False).stdout


@pytest.fixture(scope="module")
def steps() -> Iterator[Steps]:
    recorder = Steps("compose e2e")
    yield recorder
    print("\n" + recorder.table(), flush=True)


@pytest.fixture(scope="module")
def compose(tmp_path_factory, steps) -> Iterator[Compose]:
    images = [f"retrain/{name}:{TAG}" for name in ("airflow-compose", "mlflow", "postgres", "embedder-server")]
    require_engine_and_images(*images, *([f"retrain/s3-ceph:{TAG}"] if S3_KIND == "ceph" else []))
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    write_env(REPO / ".env.example", env_file)
    ports = {name: str(free_port()) for name in ("AIRFLOW_PORT", "MLFLOW_PORT", "SERVING_PORT", "MINIO_CONSOLE_PORT")}
    with env_file.open("a") as f:
        f.writelines(f"{name}={value}\n" for name, value in {**ports, "RETRAIN_IMAGE_TAG": TAG,
                                                              "RETRAIN_RETRY_DELAY_S": str(RETRY_DELAY_S)}.items())
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    stack = Compose(f"retrain-e2e-{secrets.token_hex(3)}", env_file, env)
    try:
        up = steps.run("docker compose up --wait (every healthcheck)",
                       lambda: stack("up", "-d", "--wait", "--wait-timeout", "600", "--no-build", "--pull", "never",
                                     check=False))
        if up.returncode != 0:
            pytest.fail(f"compose up failed:\n{up.stderr[-3000:]}\n{stack.diagnose()}")
        yield stack
    finally:
        down = steps.run("docker compose down -v", lambda: stack("down", "-v", "--remove-orphans", check=False))
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}").stdout.split()
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={stack.project}").stdout.split()
        assert down.returncode == 0 and not left and not volumes, f"down left {left} {volumes}: {down.stderr}"


@pytest.fixture(scope="module")
def api(compose) -> AirflowAPI:
    client = AirflowAPI(compose.url("AIRFLOW_PORT"), compose.env["AIRFLOW_ADMIN_USER"],
                        compose.env["AIRFLOW_ADMIN_PASSWORD"])
    client.login()
    return client


def task_state(api: AirflowAPI, run_id: str, task_id: str) -> dict:
    return api.task_instances(DAG, run_id).get(task_id, {})


def wait_task(api: AirflowAPI, run_id: str, task_id: str, states: set[str], timeout_s: float = 600) -> dict:
    def reached():
        run = api.run(DAG, run_id)
        ti = task_state(api, run_id, task_id)
        if run["state"] == "failed":
            pytest.fail(f"run failed while waiting for {task_id} in {states}: "
                        f"{ {t: i['state'] for t, i in api.task_instances(DAG, run_id).items()} }")
        return ti if ti.get("state") in states else None

    return poll(reached, timeout_s=timeout_s, interval_s=1.0, what=f"{task_id} in {sorted(states)}")


def digit_png() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[0] * 255 / 16).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def champion_version(mlflow_url: str) -> str:
    resp = requests.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias",
                        params={"name": MODEL, "alias": "champion"}, timeout=10)
    resp.raise_for_status()
    return resp.json()["model_version"]["version"]


def serving_metadata(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/metadata", timeout=5) as resp:
            return json.load(resp)
    except OSError:
        return None


@pytest.mark.parametrize("files", [["docker-compose.yaml"], ["docker-compose.yaml", "docker-compose.ceph.yaml"]],
                         ids=["minio", "ceph"])
def test_docker_compose_config_accepts_the_files(files, tmp_path):
    """The real Compose binary's own check (``localdev.compose check`` is the Docker-free one)."""
    require_engine_and_images()
    env_file = tmp_path / ".env"
    write_env(REPO / ".env.example", env_file)
    args = [arg for f in files for arg in ("-f", f)]
    config = docker("compose", *args, "--env-file", str(env_file), "config", "--format", "json", cwd=REPO)
    services = json.loads(config.stdout)["services"]
    assert {"postgres", "s3", "s3-init", "mlflow", "serving", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-init"} <= services.keys()
    want = "retrain/s3-ceph" if "docker-compose.ceph.yaml" in files else "minio/minio"
    assert services["s3"]["image"].startswith(want)
    # a required secret left unset is refused by Compose itself, naming the variable
    env_file.write_text("\n".join(line for line in env_file.read_text().splitlines()
                                  if not line.startswith("POSTGRES_PASSWORD=")) + "\n")
    broken = docker("compose", *args, "--env-file", str(env_file), "config", "--quiet", cwd=REPO, check=False)
    assert broken.returncode != 0 and "POSTGRES_PASSWORD" in broken.stderr


def test_retrain_through_the_stack_with_s3_and_mlflow_outages(compose, api, steps):
    mlflow_url, serving_url = compose.url("MLFLOW_PORT"), compose.url("SERVING_PORT")
    steps.run("DAGs parsed", lambda: api.wait_for_dags({DAG}, timeout_s=180))

    steps.run("stop S3", lambda: compose("stop", "s3"))
    api.set_paused(DAG, False)
    run = steps.run("trigger retrain_embedder (REST, small Params)", lambda: api.trigger(DAG, SMALL))
    run_id = run["dag_run_id"]

    steps.run("prepare_data fails without S3 and waits to retry",
              lambda: wait_task(api, run_id, "prepare_data", {"up_for_retry"}))
    first_try = "\n".join(str(line.get("event", "")) for line in api.log(DAG, run_id, "prepare_data", 1))
    assert "S3" in first_try and "http://s3:9000" in first_try, first_try[-3000:]

    steps.run("start S3 (healthy)", lambda: compose("up", "-d", "--wait", "--no-build", "--pull", "never", "s3"))
    steps.run("prepare_data retried and succeeded", lambda: wait_task(api, run_id, "prepare_data", {"success"}))
    assert task_state(api, run_id, "prepare_data")["try_number"] == 2

    steps.run("train succeeded", lambda: wait_task(api, run_id, "train", {"success"}, timeout_s=900))
    steps.run("restart MLflow between tasks", lambda: compose("restart", "mlflow"))
    finished = steps.run("run finished", lambda: api.wait_for_run(DAG, run_id, timeout_s=900))
    states = {t: ti["state"] for t, ti in api.task_instances(DAG, run_id).items()}
    assert finished["state"] == "success", f"{states}\n{compose.diagnose()}"
    assert states["promote"] == "success" and states["deploy"] == "success", states

    promoted = api.xcom(DAG, run_id, "promote")
    trained = api.xcom(DAG, run_id, "train")
    assert promoted["promoted"] is True and promoted["champion"] == champion_version(mlflow_url)

    # serving follows the deploy task's desired state
    metadata = steps.run("serving reports the promoted version", lambda: poll(
        lambda: (m := serving_metadata(serving_url)) and str(m.get("model_version")) == promoted["champion"] and m,
        timeout_s=120, interval_s=1.0, what="serving on the promoted version"))
    png = digit_png()
    embedded = requests.post(f"{serving_url}/embed", files={"file": ("q.png", png, "image/png")}, timeout=60)
    assert embedded.status_code == 200, embedded.text
    assert str(embedded.json()["model_version"]) == promoted["champion"] and embedded.json()["dim"] == 512
    similar = requests.post(f"{serving_url}/similar", params={"k": 3}, files={"file": ("q.png", png, "image/png")},
                            timeout=60)
    assert similar.status_code == 200, similar.text
    assert len(similar.json()["results"][0]["neighbors"]) == 3
    assert metadata["model_name"] == MODEL

    # MLflow's UI: its page, and the UI's own API listing the run and the version
    ui = requests.get(mlflow_url, timeout=10)
    assert ui.status_code == 200 and "<title>MLflow</title>" in ui.text
    runs = requests.post(f"{mlflow_url}/ajax-api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [trained["mlflow_experiment_id"]], "max_results": 100}, timeout=10)
    assert trained["mlflow_run_id"] in {r["info"]["run_id"] for r in runs.json()["runs"]}
    versions = requests.get(f"{mlflow_url}/ajax-api/2.0/mlflow/model-versions/search",
                            params={"filter": f"name='{MODEL}'"}, timeout=10).json()["model_versions"]
    assert promoted["version"] in {v["version"] for v in versions}

    # the serving container crashes (its process killed from outside): compose brings it back on the pinned version
    container = compose.container("serving")
    restarts = state(container)["Restarting"], docker("inspect", "--format", "{{.RestartCount}}", container).stdout
    pid = state(container)["Pid"]
    steps.run("kill the serving process", lambda: os.kill(pid, 9))

    def back_on_version():
        count = docker("inspect", "--format", "{{.RestartCount}}", container).stdout
        m = serving_metadata(serving_url)
        return count != restarts[1] and m and str(m.get("model_version")) == promoted["champion"] and m

    steps.run("serving restarted on the pinned version",
              lambda: poll(back_on_version, timeout_s=180, interval_s=1.0, what="serving back on the pinned version"))
