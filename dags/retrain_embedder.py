"""
### Retrain the image embedder

Nightly at 02:00 UTC, when `monitor_drift` confirms drift, or from the **Trigger** form: decide
whether to retrain, snapshot the data, train a ResNet embedder, evaluate it **and the current
champion on the same snapshot**, register it, promote it only if it is better, and roll serving
forward to the champion version.

| task | what it does |
|---|---|
| `check_drift` | reads the registry and MLflow; skips the rest (and says why) when there is nothing to do |
| `prepare_data` | manifest of the data root (file, label, split, sha256); dataset version = its hash |
| `train` | fine-tunes the model, logs metrics and the head-less embedder to MLflow |
| `evaluate` | recall@1/@5 and top-1 accuracy of challenger and champion on the same test split |
| `promote` | registers the challenger (`@challenger`); moves `@champion` only on a large enough gain |
| `deploy` | pins serving to the champion **version**, waits until it serves, rolls back on failure |

Stages run as `python -m embedder.<stage>`, locally or in pods (`RETRAIN_RUNNER`).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, chain, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from retrain import alerts, decision, registry, rollout
from retrain.assets import drift_asset
from retrain.settings import Settings
from retrain.stages import stage_operator

settings = Settings.from_env()

with DAG(
    dag_id="retrain_embedder",
    description="Nightly retraining of the image embedder, with champion/challenger promotion and rollout",
    doc_md=__doc__,
    # Nightly, or as soon as monitor_drift confirms drift.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
                                 assets=[drift_asset(settings)]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=12),
    tags=["ml", "retraining", "embedder"],
    default_args=alerts.task_defaults(settings),
    params={
        "force_retrain": Param(False, type="boolean", title="Force retrain",
                               description="Train even when the champion is serving and no drift is confirmed."),
        "epochs": Param(10, type="integer", minimum=1, maximum=500, title="Epochs",
                        description="Passes over the training split."),
        "learning_rate": Param(0.001, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate",
                               description="AdamW learning rate (cosine-annealed to zero)."),
        "batch_size": Param(64, type="integer", minimum=1, maximum=4096, title="Batch size",
                            description="Images per optimisation step."),
        "image_size": Param(224, type="integer", minimum=32, maximum=1024, title="Image size",
                            description="Images are resized to this square side (pixels) for training and serving."),
        "architecture": Param("resnet50", type="string",
                              enum=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                              title="Architecture", description="torchvision ResNet; resnet50 gives 2048-d embeddings."),
        "pretrained_weights": Param("", type="string", title="Pretrained weights",
                                    description="Optional torchvision state dict to start from (file:// or s3://). "
                                                "Empty: train from scratch."),
        "drift_alpha": Param(settings.drift.alpha, type="number", exclusiveMinimum=0, maximum=1,
                             title="Drift p-value threshold",
                             description="A monitoring window drifts when its permutation p-value is below this."),
        "drift_windows": Param(settings.drift.windows, type="integer", minimum=1, maximum=100,
                               title="Drift windows (K)",
                               description="Drift is confirmed after this many consecutive drifted windows."),
        "drift_cooldown_h": Param(settings.drift.cooldown_h, type="number", minimum=0, title="Drift cooldown (hours)",
                                  description="No drift-triggered retrain this soon after the last training."),
        "max_champion_age_days": Param(settings.drift.max_age_days, type="number", exclusiveMinimum=0,
                                       title="Maximum champion age (days)",
                                       description="Retrain when the champion is older than this, drift or not."),
        "min_improvement": Param(0.0, type="number", minimum=0, maximum=1, title="Minimum improvement",
                                 description="Recall@1 gain over the champion (same data) required to promote."),
    },
) as dag:

    @task.short_circuit(task_id="check_drift")
    def check_drift(params: dict | None = None) -> bool:
        """Decide from the registry and MLflow metrics whether this run trains; say why when it does not."""
        cfg = dataclasses.replace(settings.drift, alpha=float(params["drift_alpha"]),
                                  windows=int(params["drift_windows"]), cooldown_h=float(params["drift_cooldown_h"]),
                                  max_age_days=float(params["max_champion_age_days"]))
        result = decision.check(settings, bool(params["force_retrain"]), cfg=cfg)
        ctx = get_current_context()
        ctx["ti"].xcom_push(key="decision", value={"retrain": result.retrain, "reason": result.reason})
        print(f"retrain={result.retrain}: {result.reason}")
        return result.retrain

    common = ["--experiment", settings.experiment,
              "--airflow-dag-id", "{{ dag.dag_id }}", "--airflow-run-id", "{{ run_id }}"]
    prepare = stage_operator("prepare_data", [
        "--data-uri", settings.data_uri, "--storage-uri", settings.storage_uri,
        "--model-name", settings.model_name, *common], settings)
    train = stage_operator("train", [
        "--manifest-uri", "{{ ti.xcom_pull(task_ids='prepare_data')['manifest_uri'] }}",
        "--architecture", "{{ params.architecture }}",
        "--image-size", "{{ params.image_size }}",
        "--epochs", "{{ params.epochs }}",
        "--batch-size", "{{ params.batch_size }}",
        "--learning-rate", "{{ params.learning_rate }}",
        "--pretrained-weights", "{{ params.pretrained_weights }}",
        "--checkpoint-root", settings.checkpoint_root,
        "--checkpoint-every-steps", str(settings.checkpoint_every_steps),
        *common], settings)
    evaluate = stage_operator("evaluate", [
        "--manifest-uri", "{{ ti.xcom_pull(task_ids='prepare_data')['manifest_uri'] }}",
        "--challenger-uri", "{{ ti.xcom_pull(task_ids='train')['model_uri'] }}",
        "--challenger-run-id", "{{ ti.xcom_pull(task_ids='train')['mlflow_run_id'] }}",
        "--model-name", settings.model_name,
        *common], settings)

    @task(task_id="promote")
    def promote(train_result: dict, evaluation: dict, params: dict | None = None) -> dict:
        """Register the challenger and move @champion only if it beats the champion on the same data."""
        result = registry.promote(settings.model_name, train_result, evaluation, float(params["min_improvement"]))
        print(("PROMOTED" if result["promoted"] else "NOT PROMOTED") + f" version {result['version']}: {result['reason']}")
        return result

    @task(task_id="deploy")
    def deploy(promotion: dict, run_id: str | None = None) -> dict:
        """Pin serving to the champion version, wait until it serves it, smoke-test it; roll back on failure.

        A rollback is a verdict, so it fails the task without retries. A retry after anything else
        (a worker lost mid-wait) is safe: it makes no new revision and still knows what to restore.
        """
        try:
            return rollout.roll_out_champion(settings, promotion, run_id)
        except rollout.RolloutFailed as exc:
            failure = AirflowFailException(str(exc))
            failure.alerted = exc.alerted  # the rollback alert went out; the failure callback sends no second one
            raise failure from exc

    promotion = promote(train.output, evaluate.output)
    chain(check_drift(), prepare, train, evaluate, promotion, deploy(promotion))
