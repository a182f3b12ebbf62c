"""The serving process on a trained model version: ``/similar`` labels held-out images far above chance,
and SIGTERM lets the request in flight finish.

Real stages (prepare_data, train, evaluate: the gallery is logged by evaluate), a real MLflow store
(SQLite), and the real ``python -m embedder.serving`` process loading the registered version.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from retrain.waiting import poll
from tests.helpers import free_port, wait_http

pytestmark = pytest.mark.training


def stage(env: dict, cwd: Path, name: str, *args: str) -> dict:
    result = cwd / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"embedder.{name}", *args, "--result-path", str(result)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory, digits_root):
    home = tmp_path_factory.mktemp("served-model")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    prepared = stage(env, home, "prepare_data", "--data-uri", digits_root.as_uri(), "--storage-uri", home.as_uri(),
                     "--experiment", "t")
    trained = stage(env, home, "train", "--manifest-uri", prepared["manifest_uri"], "--experiment", "t",
                    "--architecture", "resnet18", "--image-size", "32", "--epochs", "4", "--batch-size", "32")
    evaluated = stage(env, home, "evaluate", "--manifest-uri", prepared["manifest_uri"],
                      "--challenger-uri", trained["model_uri"], "--challenger-run-id", trained["mlflow_run_id"],
                      "--model-name", "m", "--experiment", "t")
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.register_model({trained['model_uri']!r}, 'm')"],
                   env=env, cwd=home, check=True, capture_output=True, timeout=120)
    port = free_port()
    log = home / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "embedder.serving", "--model-name", "m", "--model-version", "1",
                             "--port", str(port), "--shutdown-timeout", "20", "--max-batch", "16"],
                            env=env, cwd=home, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", timeout=180, proc=proc)
        yield {"url": url, "proc": proc, "log": log, "prepared": prepared, "evaluated": evaluated, "port": port}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(send queue, receive queue) in bytes of the IPv4 TCP socket from ``local_port`` to ``remote_port`` (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, _, queues = line.split()[1:5]
        if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
            sent, received = queues.split(":")
            return int(sent, 16), int(received, 16)
    return None


def server_has_read_everything(client_port: int, server_port: int) -> bool:
    """The server process has read all the client sent: its kernel acknowledged every byte (the client's send
    queue is empty) and the server took them from its receive queue (so uvicorn has the request in hand)."""
    client, server = tcp_queues(client_port, server_port), tcp_queues(server_port, client_port)
    return client is not None and server is not None and client[0] == 0 and server[1] == 0


def test_similar_labels_held_out_images_far_above_chance(server, digits_root):
    meta = requests.get(f"{server['url']}/metadata", timeout=10).json()
    assert meta["gallery_size"] == server["prepared"]["counts"]["train"]  # the whole training split
    held_out = sorted((digits_root / "test").rglob("*.png"))
    truth = [p.parent.name for p in held_out]
    predicted, nearest = [], []
    for start in range(0, len(held_out), 16):
        chunk = held_out[start : start + 16]
        resp = requests.post(f"{server['url']}/similar?k=5", timeout=60,
                             json={"images": [base64.b64encode(p.read_bytes()).decode() for p in chunk]})
        assert resp.status_code == 200, resp.text
        for result in resp.json()["results"]:
            predicted.append(result["label"])
            nearest.append(result["neighbors"][0]["label"])
            assert all(n["item"].startswith("train/") for n in result["neighbors"])  # the gallery is training data
    classes = len(set(truth))
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    top1 = sum(p == t for p, t in zip(nearest, truth, strict=True)) / len(truth)
    print(f"/similar on {len(truth)} held-out images, {classes} classes: k=5 vote accuracy {accuracy:.3f}, "
          f"nearest-neighbour {top1:.3f} (chance {1 / classes:.3f}); evaluate's recall@1 "
          f"{server['evaluated']['challenger']['recall_at_1']:.3f}")
    assert classes == 10 and accuracy >= 0.6 and top1 >= 0.6  # chance is 0.1
    assert max(Counter(predicted).values()) < len(truth) / 2  # not one label for everything


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(server, digits_root):
    images = sorted((digits_root / "test").rglob("*.png"))[:8]
    body = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in images]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.putrequest("POST", "/embed")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[: len(body) // 2])  # the request is in flight: half its body is sent, and read by the server
    client_port = conn.sock.getsockname()[1]
    poll(lambda: server_has_read_everything(client_port, server["port"]), timeout_s=30, interval_s=0.02,
         what="the server reading the first half of the request")
    server["proc"].send_signal(signal.SIGTERM)
    # uvicorn has closed its listening socket and waits for the request in flight
    poll(lambda: "Waiting for connections to close" in server["log"].read_text(), timeout_s=30, interval_s=0.05,
         what="the server's graceful shutdown")
    with pytest.raises(requests.ConnectionError):  # no new connections once stopping
        requests.get(f"{server['url']}/healthz", timeout=5)
    conn.send(body[len(body) // 2 :])
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    assert resp.status == 200 and answer["count"] == 8 and len(answer["embeddings"]) == 8
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is the signal's
    assert server["proc"].wait(30) == -signal.SIGTERM
    log = server["log"].read_text()
    assert "Waiting for connections to close" in log and "embedder.serving.runtime: stopped" in log
    assert "Finished server process" in log and "Traceback" not in log
