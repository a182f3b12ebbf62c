"""Local mode's Deployment (a desired-state record) has the Kubernetes Deployment's semantics."""

from __future__ import annotations

from retrain.rollout import LocalDeployment


def test_apply_is_idempotent_and_records_revisions_with_their_run(tmp_path):
    deployment = LocalDeployment((tmp_path / "desired.json").as_uri(), "http://127.0.0.1:9")
    first, changed = deployment.apply("m", "1", "model m version 1 from Airflow run r1", "r1")
    assert changed and first["revision"] == 1 and first["applied_by_run"] == "r1"
    again, changed = deployment.apply("m", "1", "ignored", "r9")
    assert not changed and again["revision"] == 1
    second, changed = deployment.apply("m", "2", "model m version 2 from Airflow run r2", "r2")
    assert changed and second["revision"] == 2
    assert [(h["revision"], h["model_version"], h["applied_by_run"]) for h in second["history"]] == [(1, "1", "r1")]


def test_the_run_that_made_the_revision_knows_what_to_restore_on_a_retry(tmp_path):
    deployment = LocalDeployment((tmp_path / "desired.json").as_uri(), "http://127.0.0.1:9")
    assert deployment.rollback_target("r1") is None  # nothing pinned yet
    deployment.apply("m", "1", "v1", "r1")
    assert deployment.rollback_target("r1") is None  # the first revision has nothing before it
    deployment.apply("m", "2", "v2", "r2")
    target = deployment.rollback_target("r2")
    assert (target["model_version"], target["revision"]) == ("1", 1)
    assert deployment.rollback_target("r3") is None  # another run did not make it: no rollback on its failure
