"""The Airflow plugin's pieces: one-line Param errors, run notes, extra links (each through its real entry point)."""

from __future__ import annotations

import json

import pytest

from retrain import links, param_errors, run_notes
from retrain.settings import Settings


def airflow_detail(name: str, message: str, schema: dict, instance: object) -> str:
    """What Airflow 3.3's API server answers: ``str(jsonschema.ValidationError)`` behind the param name."""
    import jsonschema

    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError as exc:
        assert exc.message == message
        return f"Invalid input for param {name}: {exc}"
    raise AssertionError("the instance is valid")


@pytest.mark.parametrize(("name", "schema", "value", "expected"), [
    ("epochs", {"type": "integer", "minimum": 1, "maximum": 500, "title": "Epochs"}, 2.5,
     "Param 'epochs' (Epochs) must be an integer from 1 to 500; got 2.5"),
    ("learning_rate", {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "title": "Learning rate"}, 0,
     "Param 'learning_rate' (Learning rate) must be a number above 0 and at most 1; got 0"),
    ("architecture", {"type": "string", "enum": ["resnet18", "resnet50"], "title": "Architecture"}, "vgg",
     "Param 'architecture' (Architecture) must be one of resnet18, resnet50; got 'vgg'"),
    ("drift_cooldown_h", {"type": "number", "minimum": 0, "title": "Drift cooldown (hours)"}, -1,
     "Param 'drift_cooldown_h' (Drift cooldown (hours)) must be a number of at least 0; got -1"),
])
def test_airflows_multi_line_param_error_becomes_one_line(name, schema, value, expected):
    from jsonschema import Draft202012Validator

    message = next(Draft202012Validator(schema).iter_errors(value)).message
    detail = airflow_detail(name, message, schema, value)
    assert "\n" in detail  # what Airflow sends: the message, the schema, the instance
    assert param_errors.one_line(detail) == expected
    assert param_errors.one_line("DAG with dag_id: 'x' not found") is None


def test_the_middleware_rewrites_only_a_refused_trigger():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    schema = {"type": "integer", "minimum": 1, "maximum": 500, "title": "Epochs"}
    detail = airflow_detail("epochs", "0 is less than the minimum of 1", schema, 0)

    async def trigger(request):
        return JSONResponse({"detail": detail}, status_code=400)

    async def other(request):
        return JSONResponse({"detail": detail}, status_code=400)

    app = Starlette(routes=[Route("/api/v2/dags/{dag_id}/dagRuns", trigger, methods=["POST"]),
                            Route("/api/v2/other", other, methods=["POST"])])
    client = TestClient(param_errors.ParamErrorMiddleware(app))
    resp = client.post("/api/v2/dags/retrain_embedder/dagRuns", json={})
    assert resp.status_code == 400
    assert resp.json() == {"detail": "Param 'epochs' (Epochs) must be an integer from 1 to 500; got 0"}
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert client.post("/api/v2/other", json={}).json()["detail"] == detail


def test_a_run_note_says_why_a_run_skipped_or_what_it_trained():
    skip = {"retrain": False, "reason": "champion version 2 is serving and no drift"}
    assert run_notes.note_for(skip, None, "success") == "No retrain: champion version 2 is serving and no drift"
    trained = {"retrain": True, "reason": "drift confirmed for champion version 2"}
    promotion = {"promoted": True, "version": "3", "reason": "challenger recall_at_1 0.93 beats champion 0.78"}
    assert run_notes.note_for(trained, promotion, "success") == (
        "Retrained (drift confirmed for champion version 2). Promoted: version 3: "
        "challenger recall_at_1 0.93 beats champion 0.78")
    assert run_notes.note_for(trained, None, "failed").endswith("The run failed before promotion.")
    vetoed = {"model_version": "1", "changed": False, "note": "version 2 is not put into service: vetoed"}
    assert run_notes.note_for(trained, promotion, "success", vetoed).endswith(
        "Serving: version 1 (unchanged). version 2 is not put into service: vetoed")
    assert run_notes.note_for(trained, promotion, "failed").endswith("Serving did not change (the deploy task says why).")
    assert run_notes.note_for(None, None, "failed") is None
    assert len(run_notes.note_for({"retrain": False, "reason": "x" * 5000}, None, "success")) == run_notes.MAX_NOTE


def test_extra_links_are_built_from_each_tasks_result():
    settings = Settings.from_env({"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000",
                                  "RETRAIN_MLFLOW_UI_URL": "https://mlflow.example.com/",
                                  "RETRAIN_SERVING_URL": "http://127.0.0.1:8080"})
    train = {"mlflow_run_id": "abc", "mlflow_experiment_id": "3"}
    assert links.MLFLOW_RUN.url(settings, train) == "https://mlflow.example.com/#/experiments/3/runs/abc"
    assert links.MODEL_VERSION.url(settings, {"model_name": "image embedder", "version": "7"}) == (
        "https://mlflow.example.com/#/models/image%20embedder/versions/7")
    deploy = {"model_version": "7", "serving_run_id": "r9", "serving_experiment_id": "5"}
    assert links.SERVING.url(settings, deploy) == "http://127.0.0.1:8080/metadata"
    assert links.ROLLOUT_RECORD.url(settings, deploy) == "https://mlflow.example.com/#/experiments/5/runs/r9"
    for link in links.ALL:  # a task without the ids (failed early, skipped) gets no link
        assert link.url(settings, {}) is None
    assert json.loads(json.dumps([link.name for link in links.ALL]))  # names are what the UI shows
