"""The demo: the whole retraining loop in local mode, run by Airflow's own scheduler, as users run it.

1. builds the demo data set (scikit-learn's digits) under ``$RETRAIN_HOME/data``;
2. starts the local stack (``localdev.stack``): MLflow, serving, and Airflow's API server, scheduler,
   DAG processor and triggerer; unpauses both DAGs through the REST API;
3. run 1, triggered through the REST API as the Trigger form does, with its defaults: no champion
   yet, so it trains, promotes and deploys;
4. run 2, ``force_retrain``: champion and challenger are scored on the same snapshot;
5. run 3, a plain run: the champion serves and there is no drift, so it skips and its note says why;
6. second act, drift: in-distribution traffic, scored by ``monitor_drift``: no drift;
7. new labelled data arrives (the digits in a new look) and the traffic shifts to it: the monitor
   confirms drift, alerts and updates the drift Asset;
8. the scheduler itself starts ``retrain_embedder`` from that Asset event; it retrains on the new
   data, and the new champion serves.

The deployment's settings are scaled to a demo on two CPU cores: runs train a ResNet-50 at 32 px for
two epochs (``RETRAIN_IMAGE_SIZE``, ``RETRAIN_EPOCHS``: what a run without a conf, like the one the
drift event starts, uses), 15 s drift windows, K = 2, every embedding sampled, no cooldown. Each can
still be overridden from the environment.

The state (registry, runs, serving record, Airflow's database) starts empty each time; the stack
stays up at the end, so the UIs can be opened. ``make down`` stops it.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from localdev.airflow_api import AirflowAPI
from localdev.stack import ADMIN_USER, LocalStack
from localdev.traffic import send_windows
from retrain.settings import Settings

RETRAIN, MONITOR = "retrain_embedder", "monitor_drift"
RESET = ("mlflow.db", "mlartifacts", "airflow", "storage", "serving", "alerts.jsonl", "run", "logs", "samples",
         "data")
# A deployment scaled to a demo that takes minutes, not days (the environment still wins).
DEMO_SETTINGS = {
    "RETRAIN_EPOCHS": "2", "RETRAIN_IMAGE_SIZE": "32", "RETRAIN_BATCH_SIZE": "64",
    "RETRAIN_DRIFT_WINDOW_S": "15", "RETRAIN_DRIFT_WINDOWS": "2", "RETRAIN_SAMPLE_RATE": "1.0",
    "RETRAIN_DRIFT_MIN_SAMPLES": "40", "RETRAIN_DRIFT_PERMUTATIONS": "300", "RETRAIN_DRIFT_COOLDOWN_H": "0",
    # No client traffic while the demo deploys: the analysis waits 3 s for mirrored requests, then replays
    # held-out images to both versions; the old version stays warm 3 s after each switch.
    "RETRAIN_ANALYSIS_WINDOW_S": "3", "RETRAIN_SCALE_DOWN_DELAY_S": "3", "RETRAIN_MIRROR_RATE": "1.0",
}
TRAFFIC_PER_WINDOW = 60


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, stack: LocalStack, api: AirflowAPI):
        self.stack, self.api = stack, api
        self.settings = stack.settings
        self.finished: list[dict[str, Any]] = []

    def run(self, dag_id: str, created: dict[str, Any]) -> dict[str, Any]:
        """Wait for a run and print how it ended; returns the finished run."""
        run = self.api.wait_for_run(dag_id, created["dag_run_id"])
        took = _seconds(run["start_date"], run["end_date"])
        print(f"   {dag_id} run {run['dag_run_id']} ({run['run_type']}, triggered by {run['triggered_by']}): "
              f"{run['state']} in {took:.0f}s", flush=True)
        self.finished.append(run)
        if run["state"] != "success":
            failed = [t for t, ti in self.api.task_instances(dag_id, run["dag_run_id"]).items() if ti["state"] == "failed"]
            raise SystemExit(f"the run failed at {', '.join(failed) or '?'}; its log is in the Airflow UI "
                             f"({self.settings.airflow_url}) and under {self.stack.airflow_home / 'logs'}")
        return run

    def result(self, dag_id: str, run: dict[str, Any], task_id: str) -> Any:
        return self.api.xcom(dag_id, run["dag_run_id"], task_id)

    def retrain_summary(self, run: dict[str, Any]) -> None:
        decision = self.result(RETRAIN, run, "check_drift")
        print(f"   check_drift: {decision['reason']}")
        if not decision["retrain"]:
            print(f"   run note: {run['note']}")
            return
        promotion = self.result(RETRAIN, run, "promote")
        champion = promotion["champion_recall_at_1"]
        versus = f"vs champion version {promotion['previous_champion']}: {champion:.4f}" if champion is not None \
            else "(no champion yet)"
        print(f"   challenger version {promotion['version']}: recall@1 {promotion['recall_at_1']:.4f} {versus} "
              f"on dataset {promotion['dataset_version']}")
        print(f"   {'PROMOTED' if promotion['promoted'] else 'NOT PROMOTED'}: {promotion['reason']}")
        deployed = self.result(RETRAIN, run, "deploy")
        if deployed.get("analysis"):
            verdict = deployed["analysis"]
            gates = ", ".join(f"{g['name']} {'pass' if g['passed'] else 'FAIL'}" for g in verdict["gates"])
            print(f"   analysis of the preview on mirrored traffic: {verdict['images']} images "
                  f"({verdict['replayed']} replayed held-out images): {gates}")
        print(f"   deploy: serving model version {deployed['model_version']} (revision {deployed['revision']}, "
              f"{'switched' if deployed['changed'] else 'unchanged'}, smoke /embed {deployed['embed_latency_ms']} ms)"
              + (f"; {deployed['note']}" if deployed.get("note") else ""))


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
    """Post images to /embed for ``windows`` whole sample windows, each confirmed written (localdev.traffic)."""
    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    send_windows(settings, settings.serving_url, meta["model_name"], meta["model_version"], images, windows,
                 TRAFFIC_PER_WINDOW)


def monitor_report(demo: Demo) -> dict[str, Any]:
    run = demo.run(MONITOR, demo.api.trigger(MONITOR))
    report = demo.result(MONITOR, run, "score_windows")
    print(f"   monitor_drift: {report['state']}: {report['reason']}; windows scored now: {len(report['scored'])}")
    emitted = demo.api.task_instances(MONITOR, run["dag_run_id"])["emit_drift_event"]["state"] == "success"
    print(f"   drift Asset event: {'emitted' if emitted else 'not emitted'}")
    return report


def _alert_lines(settings: Settings) -> list[str]:
    path = Path(settings.alert_file)
    return path.read_text().splitlines() if path.exists() else []


def _seconds(start: str | None, end: str | None) -> float:
    from datetime import datetime

    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
            ).total_seconds()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-state", action="store_true", help="do not reset the registry, runs and data first")
    args = parser.parse_args(argv)
    for key, value in DEMO_SETTINGS.items():
        os.environ.setdefault(key, value)
    settings = Settings.from_env()
    stack = LocalStack(settings)
    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    print(f"local mode, state in {settings.home}")

    if not args.keep_state:
        stack.down()
        for name in RESET:
            path = settings.home / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    step("1. demo data: scikit-learn's handwritten digits as an ImageFolder tree")
    data = settings.home / "data"
    from embedder import demo_data

    if not data.exists():
        counts = demo_data.build(data.as_uri())
        print(f"   wrote {sum(counts.values())} PNGs to {data}: {counts}")
    else:
        print(f"   using {data}")

    step("2. the local stack: MLflow, serving, Airflow's API server, DAG processor, scheduler, triggerer")
    stack.up()
    for component in stack.components():
        print(f"   {component.name}: up" + (f" at {component.url}" if component.url else ""))
    api = AirflowAPI(settings.airflow_url, ADMIN_USER, stack.admin_password)
    api.wait_for_dags({RETRAIN, MONITOR})
    for dag_id in (RETRAIN, MONITOR):
        api.set_paused(dag_id, False)
    print(f"   DAGs {RETRAIN} and {MONITOR} parsed and unpaused (REST API)")
    demo = Demo(stack, api)

    step("3. run 1, triggered as the Trigger form does, with the Params' defaults")
    demo.retrain_summary(demo.run(RETRAIN, api.trigger(RETRAIN)))
    dim, norm, served = embed_probe(settings)
    print(f"   POST {settings.serving_url}/embed -> {dim} floats, L2 norm {norm:.6f}, from model version {served}")
    accuracy, n, classes = similar_probe(settings)
    print(f"   POST {settings.serving_url}/similar on {n} held-out images -> label accuracy {accuracy:.3f} "
          f"(chance {1 / classes:.3f})")

    step("4. run 2 with force_retrain: challenger vs champion on the same snapshot")
    epochs = settings.param_defaults["epochs"] + 1
    demo.retrain_summary(demo.run(RETRAIN, api.trigger(RETRAIN, {"force_retrain": True, "epochs": epochs})))

    step("5. run 3 without force_retrain")
    demo.retrain_summary(demo.run(RETRAIN, api.trigger(RETRAIN)))

    step("6. second act: in-distribution traffic, scored by the drift monitor")
    before = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()["model_version"]
    test_images = sorted((data / "test").rglob("[0-9]*.png"))
    random.Random(0).shuffle(test_images)  # traffic is a random draw of the test split, all classes mixed
    send_traffic(settings, test_images, windows=2)
    monitor_report(demo)

    step("7. new labelled data arrives (the digits in a new look), and traffic shifts to it")
    added = demo_data.add_shifted(data.as_uri())
    print(f"   added {sum(added.values())} labelled images to {data}: {added}")
    alerts_before = _alert_lines(settings)
    shifted = sorted((data / "test").rglob("shifted-*.png"))
    random.Random(1).shuffle(shifted)
    known = {r["dag_run_id"] for r in api.runs(RETRAIN)}
    send_traffic(settings, shifted, windows=2)
    monitor_report(demo)
    for line in _alert_lines(settings)[len(alerts_before):]:
        alert = json.loads(line)
        print(f"   ALERT received [{alert['kind']}] {alert['title']}: p={alert['fields'].get('p_value')}, "
              f"threshold {alert['fields'].get('threshold')}")

    step("8. the run the scheduler starts from the drift Asset event: retrain on the new data")
    demo.retrain_summary(demo.run(RETRAIN, api.wait_for_new_run(RETRAIN, "asset_triggered", known)))

    meta = requests.get(f"{settings.serving_url}/metadata", timeout=10).json()
    dim, norm, served = embed_probe(settings)
    step(f"done in {time.monotonic() - started:.0f}s")
    print(f"   serving model version {meta['model_version']} (before the drift: version {before}; "
          f"dataset {meta['dataset_version']}); "
          f"/embed -> {dim} floats, norm {norm:.6f}")
    accuracy, n, classes = similar_probe(settings)
    print(f"   /similar on {n} held-out images -> label accuracy {accuracy:.3f} (chance {1 / classes:.3f}); "
          f"gallery of {meta['gallery_size']} training images")
    print("   runs, as the Airflow UI lists them:")
    for run in demo.finished:
        print(f"     {run['dag_id']:<17} {run['run_type']:<16} {run['state']:<8} {run['dag_run_id']}")
    print(f"   Airflow UI:  {settings.airflow_url}   (user {ADMIN_USER}, password {stack.admin_password})")
    print(f"   MLflow UI:   {settings.tracking_uri}   (experiments '{settings.experiment}', "
          f"'{settings.experiment}-monitoring', '{settings.experiment}-serving'; model '{settings.model_name}')")
    print(f"   Serving API: {settings.serving_url}/docs")
    print("   the stack stays up; stop it with: make down")
    return 0 if served == meta["model_version"] != before else 1


if __name__ == "__main__":
    sys.exit(main())
