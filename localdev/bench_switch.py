"""Benchmark of what serves changing: the switch, and a rollback warm vs a rollback that loads, side by side.

The real serving process of local mode (``python -m embedder.serving --state-uri ...``, polling its record as
``make up`` starts it) on two registered versions of a real embedder (an untrained torchvision ResNet logged by
the train stage's own ``log_model``, with a gallery), in a private SQLite MLflow store. The record is written
as the deploy step writes it (:class:`retrain.rollout.LocalServing`), and each time is from that write until
``/metadata`` reports the version answering clients:

1. **switch**: the preview is loaded and ready; every client request to it (what the deploy step does once the
   analysis passed);
2. **rollback, warm**: back to the version that served before, still warm (the deploy step's switch back);
3. **rollback, cold**: back to a version the process no longer holds, which it downloads, loads and warms up
   first (what a rolling rollback costs: new pods loading the old model; the old design's only rollback).

Each round starts with the first version serving; the medians and the ratio cold / warm are printed. Every
time includes the wait for the process's next read of its record (``--poll-interval``, as ``make up`` sets it).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from localdev.stack import SERVING_POLL_S
from retrain.rollout.targets import SWITCHED, LocalServing, Mark
from retrain.waiting import poll
from retrain_contract.serving import Pin

MODEL = "bench-embedder"


def register(home: Path, architecture: str, image_size: int) -> list[str]:
    """Two versions of an untrained embedder, logged as training logs them, each with a small gallery."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from embedder import gallery, model, train

    client = MlflowClient()
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = model.build(architecture, 10)
        with mlflow.start_run() as run:
            info = train.log_model(net, [str(i) for i in range(10)], "bench",
                                   argparse.Namespace(image_size=image_size, architecture=architecture))
            with torch.inference_mode():
                rows = net.embedder.eval()(torch.rand(20, 3, image_size, image_size))
            gallery.log(client, run.info.run_id, gallery.Gallery(rows, [str(i % 10) for i in range(20)],
                                                                 [f"train/{i}.png" for i in range(20)], "bench"))
        versions.append(str(mlflow.register_model(info.model_uri, MODEL).version))
    return versions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.bench_switch", description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=SERVING_POLL_S,
                        help="the serving process's record poll (as make up starts it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        home = Path(tmp)
        os.chdir(home)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # one of another store (mlflow.set_experiment exports it)
        import mlflow

        mlflow.set_tracking_uri(uri)
        print(f"registering two {args.architecture} versions ({args.image_size} px) ...", flush=True)
        a, b = register(home, args.architecture, args.image_size)
        state = (home / "serving" / "desired.json").as_uri()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = (home / "serving.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "embedder.serving", "--state-uri", state, "--port", str(port),
                                 "--poll-interval", str(args.poll_interval)], stdout=log, stderr=subprocess.STDOUT)
        try:
            times = measure(LocalServing(state, url, f"{url}/preview"), url, a, b, args.rounds, proc)
        except Exception:
            print((home / "serving.log").read_text()[-3000:], file=sys.stderr)  # what the serving process said
            raise
        finally:
            proc.terminate()
            proc.wait(30)
    switch, warm, cold = (statistics.median(times[k]) for k in ("switch", "warm", "cold"))
    print(f"\nwhat serves changes ({args.architecture}, {args.image_size} px, record polled every "
          f"{args.poll_interval:g} s, {args.rounds} rounds; medians)")
    print(f"  switch: preview ready -> every client on it   {switch * 1000:8.0f} ms")
    print(f"  rollback, warm (switch back)                  {warm * 1000:8.0f} ms")
    print(f"  rollback, cold (load the old version again)   {cold * 1000:8.0f} ms")
    print(f"  ratio cold / warm: {cold / warm:.1f}")
    return 0


def serving(url: str) -> str | None:
    try:
        return requests.get(f"{url}/metadata", timeout=5).json().get("model_version")
    except (requests.RequestException, ValueError):
        return None


def timed(url: str, version: str, proc: subprocess.Popen) -> float:
    """Seconds until ``/metadata`` reports ``version`` answering clients."""
    started = time.perf_counter()

    def done() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the serving process exited ({proc.returncode}); see its log")
        return serving(url) == version

    poll(done, timeout_s=300, interval_s=0.005, what=f"version {version} serving")
    return time.perf_counter() - started


def measure(target: LocalServing, url: str, a: str, b: str, rounds: int, proc: subprocess.Popen) -> dict[str, list]:
    times: dict[str, list[float]] = {"switch": [], "warm": [], "cold": []}
    mark = Mark(MODEL, a, "bench", SWITCHED, time.time())
    target.switch(Pin(MODEL, a), "bench: first", mark, warm_s=0)
    timed(url, a, proc)
    for r in range(rounds):
        old, new = a, b
        preview = Pin(MODEL, new)
        target.start_preview(preview, "bench", "bench")
        poll(lambda: target.preview_status(preview)[0], timeout_s=300, interval_s=0.05, what="the preview")  # noqa: B023
        target.switch(Pin(MODEL, new), "bench: switch", mark, warm_s=600)
        times["switch"].append(timed(url, new, proc))
        target.switch_back(Pin(MODEL, old), "bench: switch back", mark)
        times["warm"].append(timed(url, old, proc))
        target.switch(Pin(MODEL, new), "bench: cold", mark, warm_s=0)  # nothing holds it: loaded first
        times["cold"].append(timed(url, new, proc))
        target.switch(Pin(MODEL, old), "bench: back for the next round", mark, warm_s=0)
        timed(url, old, proc)
        print(f"  round {r + 1}: switch {times['switch'][-1] * 1000:.0f} ms, warm rollback {times['warm'][-1] * 1000:.0f} "
              f"ms, cold rollback {times['cold'][-1] * 1000:.0f} ms", flush=True)
    return times


if __name__ == "__main__":
    sys.exit(main())
