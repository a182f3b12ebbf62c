"""
### Retrain the image embedder

Nightly at 02:00 UTC, when `monitor_drift` confirms drift, or from the **Trigger** form: decide
whether to retrain, snapshot the data, train a ResNet embedder, evaluate it **and the current
champion on the same snapshot**, register it, promote it only if it is better, and roll serving
forward to the champion version.

| task | what it does |
|---|---|
| `check_drift` | reads what serves, the registry and MLflow; notices an operator's veto; skips the rest (saying why) |
| `prepare_data` | manifest of the data root (file, label, split, sha256); dataset version = its hash |
| `train` | fine-tunes the model, logs metrics and the head-less embedder to MLflow |
| `evaluate` | recall@1/@5 and top-1 accuracy of challenger and champion on the same test split; the evaluation report |
| `promote` | registers the challenger (`@challenger`) with its model card; moves `@champion` only on a large enough gain |
| `deploy` | previews the champion **version** beside what serves, proves it on mirrored traffic, switches all at once |

Stages run as `python -m embedder.<stage>`, locally or in pods (`RETRAIN_RUNNER`).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, chain

from retrain import alerts
from retrain.assets import drift_asset
from retrain.operators import CheckDriftOperator, DeployOperator, PromoteOperator
from retrain.runners import param_arguments, stage_operator
from retrain.settings import NEXT_TICK, Settings
from retrain_contract import params
from retrain_contract.results import PrepareResult, TrainResult

settings = Settings.from_env()

with DAG(
    dag_id="retrain_embedder",
    description="Nightly retraining of the image embedder, with champion/challenger promotion and rollout",
    doc_md=__doc__,
    # Nightly, or as soon as monitor_drift confirms drift.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(settings.schedule, timezone="UTC", run_immediately=NEXT_TICK),
                                 assets=[drift_asset(settings)]),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=12),
    tags=["ml", "retraining", "embedder"],
    default_args=alerts.task_defaults(settings),
    # Every Param is declared once in retrain_contract.params; its default here is the deployment's
    # (RETRAIN_EPOCHS, ...), which is what nightly and drift-started runs use.
    params={p.name: Param(settings.param_defaults[p.name], description=p.description, **p.schema()) for p in params.ALL},
) as dag:

    check_drift = CheckDriftOperator(task_id="check_drift")

    common = ["--experiment", settings.experiment,
              "--airflow-dag-id", "{{ dag.dag_id }}", "--airflow-run-id", "{{ run_id }}"]
    prepare = stage_operator("prepare_data", [
        "--data-uri", settings.data_uri, "--storage-uri", settings.storage_uri,
        "--model-name", settings.model_name, *common], settings)
    train = stage_operator("train", [
        "--manifest-uri", PrepareResult.pull("manifest_uri"),
        *param_arguments(params.TRAINING),
        "--checkpoint-root", settings.checkpoint_root,
        "--checkpoint-every-steps", str(settings.checkpoint_every_steps),
        "--checkpoint-retention-days", f"{settings.checkpoint_retention_days:g}",
        *common], settings)
    evaluate = stage_operator("evaluate", [
        "--manifest-uri", PrepareResult.pull("manifest_uri"),
        "--challenger-uri", TrainResult.pull("model_uri"),
        "--challenger-run-id", TrainResult.pull("mlflow_run_id"),
        "--model-name", settings.model_name,
        *common], settings)

    promote = PromoteOperator(task_id="promote", preparation=prepare.output, train_result=train.output,
                              evaluation=evaluate.output)
    deploy = DeployOperator(task_id="deploy", promotion=promote.output, preparation=prepare.output)
    chain(check_drift, prepare, train, evaluate, promote, deploy)
