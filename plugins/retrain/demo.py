"""The demo: the whole retraining loop in local mode, through real Airflow, MLflow and PyTorch.

1. builds the demo data set (scikit-learn's digits) under ``$RETRAIN_HOME/data``;
2. starts the MLflow tracking server and the serving process, migrates Airflow's SQLite DB;
3. run 1, as the nightly schedule would: no champion yet, so it trains, promotes and deploys;
4. run 2, ``force_retrain``: champion and challenger are scored on the same snapshot;
5. run 3, a plain run: the champion serves and there is no drift, so it skips and says why;
6. second act, drift: in-distribution traffic, scored by ``monitor_drift``: no drift, no retrain;
7. new labelled data arrives (the digits in a new look) and the traffic shifts to it: the monitor
   confirms drift, alerts and emits the drift Asset event;
8. the run that event starts: ``check_drift`` retrains on the new data, and the new champion serves.

The demo's drift settings are scaled to minutes (15 s windows, K = 2, every embedding sampled, no
cooldown); each can still be overridden from the environment.

The state (registry, runs, serving record) starts empty each time; the services stay up at the
end so the UIs can be opened and ``/embed`` called. ``make down`` stops them.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from mlflow import MlflowClient

from retrain import localstack
from retrain.registry import CHALLENGER, CHAMPION, alias_version
from retrain.settings import Settings

RESET = ("mlflow.db", "mlartifacts", "airflow", "storage", "serving", "alerts.jsonl", "run", "logs", "samples",
         "data")
# Drift settings scaled to a demo that takes minutes, not days (the environment still wins).
DEMO_DRIFT = {"RETRAIN_DRIFT_WINDOW_S": "15", "RETRAIN_DRIFT_WINDOWS": "2", "RETRAIN_SAMPLE_RATE": "1.0",
              "RETRAIN_DRIFT_MIN_SAMPLES": "40", "RETRAIN_DRIFT_PERMUTATIONS": "300", "RETRAIN_DRIFT_COOLDOWN_H": "0"}
TRAFFIC_PER_WINDOW = 60


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def airflow(settings: Settings, *args: str, log_name: str) -> str:
    """Run the Airflow CLI; the full output goes to a log file, the output is returned."""
    exe = str(Path(sys.executable).with_name("airflow"))
    proc = subprocess.run([exe, *args], env=localstack.airflow_env(settings), capture_output=True, text=True)
    log = settings.home / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"airflow {' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return proc.stdout + proc.stderr


def dag_run(settings: Settings, conf: dict, name: str, dag_id: str = "retrain_embedder") -> str:
    started = time.monotonic()
    out = airflow(settings, "dags", "test", dag_id, "--conf", json.dumps(conf), log_name=name)
    state = re.search(r"DagRun Finished: .*?state=(\w+)", out)
    log = settings.home / "logs" / f"{name}.log"
    if not state or state.group(1) != "success":
        raise SystemExit(f"the DAG run did not succeed ({state.group(1) if state else 'no final state'}); see {log}")
    print(f"   DAG run succeeded in {time.monotonic() - started:.0f}s (Airflow log: {log})")
    return out


def decision_line(out: str) -> str:
    match = re.search(r"retrain=(True|False): (.*)", out)
    return match.group(2).strip() if match else "(no decision logged)"


def version_summary(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def embed_probe(settings: Settings) -> tuple[int, float, str]:
    image = next((settings.home / "data" / "test").rglob("*.png"))
    with image.open("rb") as fh:
        body = requests.post(f"{settings.serving_url}/embed", files={"file": (image.name, fh, "image/png")},
                             timeout=30).json()
    return body["dim"], math.sqrt(sum(x * x for x in body["embedding"])), body["model_version"]


def similar_probe(settings: Settings, limit: int = 64) -> tuple[float, int, int]:
    """Held-out test images through /similar (JSON batches): label accuracy, images, classes."""
    images = sorted((settings.home / "data" / "test").rglob("*.png"))
    images = images[:: max(1, len(images) // limit)][:limit]
    truth = [p.parent.name for p in images]
    predicted: list[str] = []
    for start in range(0, len(images), 16):
        batch = [base64.b64encode(p.read_bytes()).decode() for p in images[start : start + 16]]
        resp = requests.post(f"{settings.serving_url}/similar?k=5", json={"images": batch}, timeout=60)
        resp.raise_for_status()
        predicted += [r["label"] for r in resp.json()["results"]]
    hits = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return hits / len(images), len(images), len(set(truth))


def send_traffic(settings: Settings, images: list[Path], windows: int) -> None:
    """Post images to /embed for ``windows`` whole sample windows, then wait until the last one is readable."""
    window = settings.drift.window_s
    for _ in range(windows):
        start = time.time() // window * window
        for image in images[:TRAFFIC_PER_WINDOW]:
            with image.open("rb") as fh:
                requests.post(f"{settings.serving_url}/embed", files={"file": (image.name, fh, "image/png")},
                              timeout=30).raise_for_status()
        time.sleep(max(0.0, start + window - time.time()) + 0.2)
    time.sleep(window / 4 + 1)  # the monitor reads a window a quarter window after it closes


def monitor_report(out: str) -> str:
    match = re.search(r"drift state (\w+): (.*)", out)
    return f"{match.group(1)}: {match.group(2).strip()}" if match else "(no report logged)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--keep-state", action="store_true", help="do not reset the registry and runs first")
    args = parser.parse_args(argv)
    for key, value in DEMO_DRIFT.items():
        os.environ.setdefault(key, value)
    settings = Settings.from_env()
    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    print(f"local mode, state in {settings.home}")

    if not args.keep_state:
        localstack.down(settings)
        for name in RESET:
            path = settings.home / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    step("1. demo data: scikit-learn's handwritten digits as an ImageFolder tree")
    data = settings.home / "data"
    if not data.exists():
        from embedder import demo_data

        counts = demo_data.build(data.as_uri())
        print(f"   wrote {sum(counts.values())} PNGs to {data}: {counts}")
    else:
        print(f"   using {data}")

    step("2. services: MLflow tracking server, serving process, Airflow metadata DB")
    localstack.up(settings)
    airflow(settings, "db", "migrate", log_name="airflow-db-migrate")
    print("   Airflow DB migrated (SQLite)")
    client = MlflowClient(settings.tracking_uri)
    name = settings.model_name
    conf = {"epochs": args.epochs, "image_size": args.image_size, "batch_size": 64}

    step("3. run 1, as the nightly schedule would start it")
    out = dag_run(settings, conf, "dag-run-1")
    print(f"   check_drift: {decision_line(out)}")
    champion = alias_version(client, name, CHAMPION)
    tags = version_summary(client, name, champion)
    print(f"   {tags['promotion.decision'].upper()}: {name} version {champion} is @{CHAMPION}: {tags['promotion.reason']}")
    print(f"   recall@1 {float(tags['eval.recall_at_1']):.4f}, recall@5 {float(tags['eval.recall_at_5']):.4f}, "
          f"top-1 accuracy {float(tags['eval.top1_accuracy']):.4f} on dataset {tags['eval.dataset_version']}")
    dim, norm, served = embed_probe(settings)
    print(f"   POST {settings.serving_url}/embed -> {dim} floats, L2 norm {norm:.6f}, from model version {served}")
    accuracy, n, classes = similar_probe(settings)
    print(f"   POST {settings.serving_url}/similar on {n} held-out images -> label accuracy {accuracy:.3f} "
          f"(chance {1 / classes:.3f})")

    step("4. run 2 with force_retrain: challenger vs champion on the same snapshot")
    out = dag_run(settings, {**conf, "epochs": args.epochs + 1, "force_retrain": True}, "dag-run-2")
    print(f"   check_drift: {decision_line(out)}")
    challenger = alias_version(client, name, CHALLENGER)
    tags = version_summary(client, name, challenger)
    print(f"   challenger version {challenger}: recall@1 {float(tags['eval.recall_at_1']):.4f} vs champion version "
          f"{tags['champion.version']}: {float(tags['champion.recall_at_1']):.4f} (dataset {tags['eval.dataset_version']})")
    print(f"   decision: {tags['promotion.decision'].upper()}: {tags['promotion.reason']}")

    step("5. run 3 without force_retrain")
    out = dag_run(settings, conf, "dag-run-3")
    print(f"   check_drift skipped the run: {decision_line(out)}")

    step("6. second act: in-distribution traffic, scored by the drift monitor")
    before = alias_version(client, name, CHAMPION)
    test_images = sorted((data / "test").rglob("[0-9]*.png"))
    random.Random(0).shuffle(test_images)  # traffic is a random draw of the test split, all classes mixed
    send_traffic(settings, test_images, windows=2)
    out = dag_run(settings, {}, "monitor-1", dag_id="monitor_drift")
    print(f"   monitor_drift: {monitor_report(out)}")

    step("7. new labelled data arrives (the digits in a new look), and traffic shifts to it")
    from embedder import demo_data

    added = demo_data.add_shifted(data.as_uri())
    print(f"   added {sum(added.values())} labelled images to {data}: {added}")
    alerts_before = _alert_lines(settings)
    shifted = sorted((data / "test").rglob("shifted-*.png"))
    random.Random(1).shuffle(shifted)
    send_traffic(settings, shifted, windows=2)
    out = dag_run(settings, {}, "monitor-2", dag_id="monitor_drift")
    print(f"   monitor_drift: {monitor_report(out)}")
    emitted = re.search(r"drift Asset (\S+) updated", out)
    print(f"   drift Asset event: {'emitted for ' + emitted.group(1) if emitted else 'not emitted'}")
    for line in _alert_lines(settings)[len(alerts_before):]:
        alert = json.loads(line)
        print(f"   ALERT received [{alert['kind']}] {alert['title']}: p={alert['fields'].get('p_value')}, "
              f"threshold {alert['fields'].get('threshold')}")

    step("8. the run the drift event starts: retrain on the new data")
    out = dag_run(settings, conf, "dag-run-4")
    print(f"   check_drift: {decision_line(out)}")
    challenger = alias_version(client, name, CHALLENGER)
    tags = version_summary(client, name, challenger)
    print(f"   challenger version {challenger}: recall@1 {float(tags['eval.recall_at_1']):.4f} vs champion version "
          f"{tags['champion.version']}: {float(tags['champion.recall_at_1']):.4f} on the new snapshot "
          f"{tags['eval.dataset_version']}")
    print(f"   decision: {tags['promotion.decision'].upper()}: {tags['promotion.reason']}")

    champion = alias_version(client, name, CHAMPION)
    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    dim, norm, served = embed_probe(settings)
    step(f"done in {time.monotonic() - started:.0f}s")
    print(f"   @{CHAMPION} = {name} version {champion} (before the drift: version {before}); serving version "
          f"{meta['model_version']} (dataset {meta['dataset_version']}); /embed -> {dim} floats, norm {norm:.6f}")
    accuracy, n, classes = similar_probe(settings)
    print(f"   /similar on {n} held-out images -> label accuracy {accuracy:.3f} (chance {1 / classes:.3f}); "
          f"gallery of {meta['gallery_size']} training images")
    print(f"   MLflow UI:   {settings.tracking_uri}   (experiments '{settings.experiment}', "
          f"'{settings.experiment}-monitoring', '{settings.experiment}-serving'; model '{name}')")
    print(f"   Serving API: {settings.serving_url}/docs")
    print("   Airflow UI:  make airflow-ui   (then http://127.0.0.1:8081)")
    print("   stop the services: make down")
    return 0 if served == champion != before else 1


def _alert_lines(settings: Settings) -> list[str]:
    path = Path(settings.alert_file)
    return path.read_text().splitlines() if path.exists() else []


if __name__ == "__main__":
    sys.exit(main())
