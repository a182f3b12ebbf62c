"""Every image runs as its pod spec or compose service assumes: user, writable paths, entrypoints, ports, size.

The Kubernetes images (``retrain/embedder-trainer``, ``retrain/embedder-server``) are run as the pods
run them, not as compose does: the trainer image's stage command for each stage (prepare_data, train,
evaluate) with the stage pod's security context (uid 10001, every capability dropped, no privilege
escalation), a read-only root filesystem (stricter than the stage pods, which do not ask for one: it
proves the stages write only to ``/tmp``, ``/dev/shm`` and the XCom folder), ``/dev/shm`` as the GPU
pool's memory volume and ``/airflow/xcom`` as KubernetesPodOperator's emptyDir, against a real S3
(the s3-ceph image) and a real MLflow server (the mlflow image). The server image then serves the
version trained there as k8s/base/serving.yaml runs it: ``--model-name/--model-version``, uid 10001,
read-only root filesystem with ``/tmp`` writable, port 8080.

Sizes are bounded by :data:`SIZE_LIMITS_MB`, the figures the README states.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrain.waiting import poll
from tests.containers.docker_util import docker, host_port, logs, require_engine_and_images, wait_healthy

pytestmark = pytest.mark.containers

TAG = os.environ.get("RETRAIN_IMAGE_TAG", "dev")
TRAINER, SERVER = f"retrain/embedder-trainer:{TAG}", f"retrain/embedder-server:{TAG}"
MLFLOW, S3CEPH = f"retrain/mlflow:{TAG}", f"retrain/s3-ceph:{TAG}"
POD_UID = 10001  # runAsUser of the stage pods (retrain.runners.kubernetes) and of k8s/base/serving.yaml

# Upper bounds in MB (docker image inspect's Size), as the README's image table states them. The
# PyTorch images carry PyPI's CUDA wheels where PyTorch's CPU index cannot be reached (CI here).
SIZE_LIMITS_MB = {
    "retrain/base:python": 450,
    "retrain/base:torch": 7000,
    TRAINER: 7500,
    SERVER: 7500,
    f"retrain/airflow:{TAG}": 1100,
    f"retrain/airflow-compose:{TAG}": 8000,
    MLFLOW: 1400,
    f"retrain/postgres:{TAG}": 800,
    S3CEPH: 600,
}
# The user each image runs as; none is root.
USERS = {
    "retrain/base:python": None,  # a base: no USER of its own (its children set one)
    "retrain/base:torch": None,
    TRAINER: "10001", SERVER: "10001", MLFLOW: "10001",
    f"retrain/airflow:{TAG}": "50000", f"retrain/airflow-compose:{TAG}": "50000",
    f"retrain/postgres:{TAG}": "postgres", S3CEPH: "ceph",
}


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("image", sorted(SIZE_LIMITS_MB))
def test_image_size_user_and_id(image):
    require_engine_and_images(image)
    info = inspect(image)
    size_mb = info["Size"] / 1e6
    assert size_mb <= SIZE_LIMITS_MB[image], f"{image} is {size_mb:.0f} MB, over the README's {SIZE_LIMITS_MB[image]} MB"
    assert (info["Config"].get("User") or None) == USERS[image]
    if USERS[image] is not None:
        uid = docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
        assert uid != "0", f"{image} runs as root"


@dataclass
class Stack:
    network: str
    s3_endpoint: str  # from the host
    mlflow_uri: str  # from the host
    env: dict[str, str]  # what a stage pod gets from its Secrets and settings
    xcom: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    require_engine_and_images(TRAINER, SERVER, MLFLOW, S3CEPH)
    suffix = secrets.token_hex(3)
    network = f"retrain-images-{suffix}"
    access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    docker("network", "create", network)
    names = [f"s3-{suffix}", f"mlflow-{suffix}"]
    try:
        docker("run", "-d", "--name", names[0], "--network", network, "--network-alias", "s3", "-p", "127.0.0.1::9000",
               "-e", f"S3_ACCESS_KEY={access}", "-e", f"S3_SECRET_KEY={secret}", "-e", "S3_BUCKETS=retrain mlflow", S3CEPH)
        wait_healthy(names[0])
        docker("run", "-d", "--name", names[1], "--network", network, "--network-alias", "mlflow", "-p", "127.0.0.1::5000",
               "-e", "MLFLOW_S3_ENDPOINT_URL=http://s3:9000", "-e", f"AWS_ACCESS_KEY_ID={access}",
               "-e", f"AWS_SECRET_ACCESS_KEY={secret}", MLFLOW,
               "mlflow", "server", "--backend-store-uri", "sqlite:////tmp/mlflow.db", "--serve-artifacts",
               "--artifacts-destination", "s3://mlflow", "--host", "0.0.0.0", "--port", "5000",
               "--allowed-hosts", "mlflow:5000,127.0.0.1:*,localhost:*")
        mlflow_uri = f"http://{host_port(names[1], '5000/tcp')}"
        poll(lambda: _answers(f"{mlflow_uri}/health"), timeout_s=120, interval_s=0.5,
             on_timeout=lambda: AssertionError(f"MLflow never answered:\n{logs(names[1])}"))
        xcom = tmp_path_factory.mktemp("xcom")
        xcom.chmod(0o777)  # an emptyDir is world-writable
        yield Stack(network, f"http://{host_port(names[0], '9000/tcp')}", mlflow_uri,
                    {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                     "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                     "MLFLOW_CONFIGURE_LOGGING": "false"}, xcom)
    finally:
        docker("rm", "-f", *names, check=False)
        docker("network", "rm", network, check=False)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def run_stage(stack: Stack, stage: str, *arguments: str) -> dict:
    """``docker run`` of the trainer image's stage command with the stage pod's security context; its result."""
    result = stack.xcom / "return.json"
    result.unlink(missing_ok=True)
    env = [arg for key, value in stack.env.items() for arg in ("-e", f"{key}={value}")]
    proc = docker("run", "--rm", "--network", stack.network, "--user", f"{POD_UID}:{POD_UID}", "--cap-drop", "ALL",
                  "--security-opt", "no-new-privileges", "--read-only", "--tmpfs", "/tmp:rw,exec,mode=1777",
                  "--shm-size", "512m", "-v", f"{stack.xcom}:/airflow/xcom", *env,
                  TRAINER, f"embedder.{stage}", *arguments, check=False, timeout=900)
    assert proc.returncode == 0, f"stage {stage} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    # matplotlib has a writable config directory (MPLCONFIGDIR) under the read-only root: no warning, one font cache
    assert "Matplotlib created a temporary cache directory" not in proc.stdout + proc.stderr
    # the default result path is where the XCom sidecar reads it, written as uid 10001
    assert result.stat().st_uid == POD_UID
    return json.loads(result.read_text())


def test_trainer_image_runs_every_stage_as_a_pod_does_and_the_server_image_serves_it(stack, tmp_path):
    data = subprocess.run([sys.executable, "-m", "embedder.demo_data", "--output", "s3://retrain/data",
                           "--image-size", "32", "--per-class", "40"], capture_output=True, text=True,
                          env={**os.environ, "AWS_ENDPOINT_URL": stack.s3_endpoint,
                               "AWS_ACCESS_KEY_ID": stack.env["AWS_ACCESS_KEY_ID"],
                               "AWS_SECRET_ACCESS_KEY": stack.env["AWS_SECRET_ACCESS_KEY"],
                               "AWS_DEFAULT_REGION": "us-east-1"})
    assert data.returncode == 0, data.stderr
    common = ["--experiment", "images-test"]
    prepared = run_stage(stack, "prepare_data", "--data-uri", "s3://retrain/data", "--storage-uri", "s3://retrain/storage",
                         "--model-name", "image-embedder", *common)
    assert prepared["manifest_uri"].startswith("s3://retrain/storage/")
    trained = run_stage(stack, "train", "--manifest-uri", prepared["manifest_uri"], "--epochs", "1", "--image-size", "32",
                        "--architecture", "resnet18", "--batch-size", "32", "--checkpoint-root", "s3://retrain/storage/checkpoints",
                        *common)
    assert trained["mlflow_run_id"] and trained["model_uri"]
    evaluated = run_stage(stack, "evaluate", "--manifest-uri", prepared["manifest_uri"], "--challenger-uri",
                          trained["model_uri"], "--challenger-run-id", trained["mlflow_run_id"],
                          "--model-name", "image-embedder", *common)
    assert 0.0 <= evaluated["challenger"]["recall_at_1"] <= 1.0

    # register the version (what the promote task does) and serve it as k8s/base/serving.yaml does
    import mlflow

    mlflow.set_tracking_uri(stack.mlflow_uri)
    version = mlflow.register_model(trained["model_uri"], "image-embedder").version
    name = f"server-{secrets.token_hex(3)}"
    env = [arg for key, value in stack.env.items() for arg in ("-e", f"{key}={value}")]
    docker("run", "-d", "--name", name, "--network", stack.network, "--user", f"{POD_UID}:{POD_UID}", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--read-only", "--tmpfs", "/tmp:rw,mode=1777", "-p", "127.0.0.1::8080",
           *env, SERVER, "--model-name", "image-embedder", "--model-version", str(version))
    try:
        url = f"http://{host_port(name, '8080/tcp')}"

        def ready():
            if not json.loads(docker("inspect", "--format", "{{json .State.Running}}", name).stdout):
                pytest.fail(f"the server exited:\n{logs(name)}")
            return _answers(f"{url}/readyz")

        poll(ready, timeout_s=180, interval_s=0.5, on_timeout=lambda: AssertionError(f"never ready:\n{logs(name)}"))
        with urllib.request.urlopen(f"{url}/metadata", timeout=10) as resp:
            metadata = json.load(resp)
        assert str(metadata["model_version"]) == str(version)
        png = _a_png(stack)
        embedded = _post_file(f"{url}/embed", png)
        assert embedded["model_version"] == metadata["model_version"]
        assert len(embedded["embedding"]) == embedded["dim"] == 512  # resnet18's pooled features
        similar = _post_file(f"{url}/similar?k=3", png)
        assert len(similar["results"][0]["neighbors"]) == 3
    finally:
        server_log = logs(name)
        docker("rm", "-f", name, check=False)
    assert "Traceback" not in server_log, server_log


def _a_png(stack: Stack) -> bytes:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    key = next(obj["Key"] for obj in s3.list_objects_v2(Bucket="retrain", Prefix="data/test/")["Contents"]
               if obj["Key"].endswith(".png"))
    return s3.get_object(Bucket="retrain", Key=key)["Body"].read()


def _post_file(url: str, content: bytes) -> dict:
    boundary = secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.load(resp)
