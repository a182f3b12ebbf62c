"""DAG tests: import, policy, structure, Params, and the stage CLI contract."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pendulum
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from retrain.runners.common import STAGES
from retrain.runners.local import LocalStageOperator

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["retrain_embedder"]


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {Path(d.fileloc).stem for d in dagbag.dags.values()} == {p.stem for p in DAG_FILES}


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_policy(dagbag, path):
    dag = next(d for d in dagbag.dags.values() if Path(d.fileloc) == path)
    assert dag.dag_id == path.stem
    assert dag.tags and dag.doc_md and dag.catchup is False
    for task in dag.tasks:
        assert task.on_failure_callback, f"{task.task_id} has no failure alert"


@pytest.mark.parametrize("module", ["retrain_embedder", "monitor_drift"])
def test_dag_file_imports_no_ml_libraries(module):
    import sys

    before = set(sys.modules)
    importlib.reload(importlib.import_module(module))
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "torchvision", "embedder")}


def test_monitor_drift_is_hourly_and_emits_the_asset_retrain_embedder_runs_on(dagbag, dag):
    monitor = dagbag.dags["monitor_drift"]
    assert monitor.timetable.expression == "5 * * * *" and monitor.max_active_runs == 1
    assert monitor.get_task("drift_confirmed").downstream_task_ids == {"emit_drift_event"}
    [emitted] = monitor.get_task("emit_drift_event").outlets
    assert [emitted] == list(dag.timetable.asset_condition.objects)  # the Asset retrain_embedder is scheduled on


def test_schedule_is_nightly_at_two_utc_one_run_at_a_time(dag):
    assert dag.max_active_runs == 1
    # The scheduler's own timetable class, built from what the DAG declares, says when runs happen.
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable

    cron = dag.timetable.timetable  # AssetOrTimeSchedule: the cron part (the drift Asset is the other)
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["image-embedder_drift_confirmed"]
    timetable = CronTriggerTimetable(cron.expression, timezone=cron.timezone)
    restriction = TimeRestriction(earliest=pendulum.datetime(2026, 3, 29, 12, tz="UTC"), latest=None, catchup=True)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    second = timetable.next_dagrun_info(last_automated_data_interval=first.data_interval, restriction=restriction)
    assert first.run_after == pendulum.datetime(2026, 3, 30, 2, tz="UTC")  # the day after a DST change in Europe
    assert second.run_after - first.run_after == pendulum.duration(days=1)


def test_task_order(dag):
    order = ["check_drift", "prepare_data", "train", "evaluate", "promote", "deploy"]
    for upstream, downstream in itertools.pairwise(order):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert set(dag.task_ids) == set(order)
    # A retry of deploy is safe (no new revision); a rollback is a verdict and fails without retries.
    assert dag.get_task("deploy").retries == dag.default_args["retries"]


def test_a_rollback_fails_deploy_without_retries_and_without_a_second_alert(dag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from retrain import rollout

    def rolled_back(*args, **kwargs):
        exc = rollout.RolloutFailed("smoke test failed. Rolled back to model version 1.")
        exc.alerted = True
        raise exc

    monkeypatch.setattr(rollout, "roll_out_champion", rolled_back)
    with pytest.raises(AirflowFailException, match="Rolled back to model version 1") as info:
        dag.get_task("deploy").execute({"run_id": "r"})
    assert info.value.alerted is True


def test_params_build_a_typed_trigger_form(dag):
    required = {"force_retrain", "epochs", "learning_rate", "batch_size", "image_size", "min_improvement"}
    assert required <= set(dag.params)
    for name in dag.params:
        param: Param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
        assert param.schema.get("type"), name


def test_the_form_with_its_defaults_is_valid_and_only_the_optional_param_may_be_empty(dag):
    """The Trigger form sends every default (an empty text field as null): the server must accept all of them.

    A field is required in the form unless its type admits null; only the pretrained weights may be empty.
    """
    defaults = {k: dag.params[k] for k in dag.params}
    params = ParamsDict({k: dag.params.get_param(k) for k in dag.params})
    params.validate()
    assert defaults["pretrained_weights"] is None
    optional = {k for k in dag.params if "null" in dag.params.get_param(k).schema["type"]}
    assert optional == {"pretrained_weights"}


def test_dag_params_and_stage_flags_come_from_one_declaration(dag):
    """Each run Param is declared once (retrain_contract.params); the DAG's Params and the train stage's
    flags agree on name, default, bounds and choices, and the architectures are the model package's."""
    from embedder import model, train
    from retrain_contract import params as specs

    assert list(dag.params) == [p.name for p in specs.ALL]
    flags = {a.dest: a for a in train.get_args_parser()._actions}
    for spec in specs.ALL:
        schema = dag.params.get_param(spec.name).schema
        assert {k: v for k, v in schema.items() if k not in ("description",)} == spec.schema(), spec.name
        assert dag.params[spec.name] == spec.default, spec.name
        if spec.flag:
            action = flags[spec.flag.removeprefix("--").replace("-", "_")]
            assert action.default == spec.default, spec.name
            if spec.choices:
                assert action.type(spec.choices[0]) == spec.choices[0]
            if spec.minimum is not None:
                assert action.type(str(spec.kind(spec.minimum))) == spec.minimum
                with pytest.raises(Exception, match=spec.name):
                    action.type(str(spec.kind(spec.minimum) - 1))
    assert tuple(model.ARCHITECTURES) == specs.ARCHITECTURES == tuple(schema_enum(dag, "architecture"))


def schema_enum(dag, name: str) -> list[str]:
    return dag.params.get_param(name).schema["enum"]


def test_a_deployment_sets_the_defaults_of_runs_without_a_conf(monkeypatch):
    """Nightly and drift-started runs carry no conf: RETRAIN_EPOCHS etc. set what they train with."""
    from retrain.settings import Settings, SettingsError

    settings = Settings.from_env({"RETRAIN_EPOCHS": "2", "RETRAIN_IMAGE_SIZE": "32", "RETRAIN_DRIFT_ALPHA": "0.05"})
    assert (settings.param_defaults["epochs"], settings.param_defaults["image_size"]) == (2, 32)
    assert settings.drift.alpha == 0.05  # the drift monitor's threshold is the same Param's default
    with pytest.raises(SettingsError, match=r"RETRAIN_EPOCHS='0': epochs must be an integer from 1 to 500; got 0"):
        Settings.from_env({"RETRAIN_EPOCHS": "0"})
    with pytest.raises(SettingsError, match="RETRAIN_ARCHITECTURE='vgg16': architecture must be one of resnet18"):
        Settings.from_env({"RETRAIN_ARCHITECTURE": "vgg16"})


@pytest.mark.parametrize("name,value", [("epochs", 0), ("epochs", "ten"), ("learning_rate", 0), ("image_size", 8),
                                        ("min_improvement", -0.1), ("architecture", "vgg16"), ("force_retrain", "yes")])
def test_bad_param_values_are_rejected(dag, name, value):
    params = ParamsDict({k: dag.params.get_param(k) for k in dag.params})
    params[name] = Param(value, **dag.params.get_param(name).schema)
    with pytest.raises(Exception, match=name if name != "force_retrain" else "boolean"):
        params.validate()


class FakeTI:
    """XCom as the upstream stages return it (shape taken from the stages' own results)."""

    results = {
        "prepare_data": {"manifest_uri": "file:///s/datasets/abc/manifest.json", "dataset_version": "abc"},
        "train": {"model_uri": "models:/m-123", "mlflow_run_id": "r123"},
    }

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return self.results[task_ids]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dag_arguments_parse_with_the_stage_parser(dag, stage):
    """The contract: what the DAG passes is what the stage's own argparse parser accepts."""
    op = dag.get_task(stage)
    assert isinstance(op, LocalStageOperator)
    context = {"params": {k: dag.params[k] for k in dag.params}, "dag": dag, "run_id": "manual__x", "ti": FakeTI()}
    rendered = [str(a) for a in op.render_template(op.arguments, context)]
    assert not any("{{" in a for a in rendered), rendered
    module = importlib.import_module(f"embedder.{stage}")
    args = module.get_args_parser().parse_args(rendered)
    assert args.airflow_run_id == "manual__x" and args.airflow_dag_id == "retrain_embedder"
    if stage == "train":
        assert (args.epochs, args.image_size, args.architecture) == (dag.params["epochs"], dag.params["image_size"],
                                                                      dag.params["architecture"])
        assert args.learning_rate == dag.params["learning_rate"] and args.manifest_uri.endswith("manifest.json")
    if stage == "evaluate":
        assert (args.challenger_uri, args.challenger_run_id) == ("models:/m-123", "r123")
