"""docker-compose.yaml, checked without Docker (tests/containers runs the real `docker compose config`):
Compose interpolation from .env.example, the Compose Specification's strict parser (compose-spec),
references, image pinning, healthchecks, no literal secrets. And each check fails on a file broken the
way it guards against."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from localdev import compose

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
ENV = REPO / ".env.example"
REQUIRED = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-init",
            "postgres", "mlflow", "s3", "serving"}


def test_the_compose_file_passes_every_check():
    assert compose.check(COMPOSE, ENV) == []


def test_it_has_the_whole_stack_built_from_images_or_pinned():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert services.keys() >= REQUIRED
    built = {name for name, s in services.items() if "build" in s}
    assert built == {"postgres", "mlflow", "serving", *{n for n in services if n.startswith("airflow-")}}
    for name in services.keys() - built:
        assert compose._image_pinned(services[name]["image"]), name
    assert services["airflow-scheduler"]["command"] == "scheduler"
    assert services["airflow-apiserver"]["build"]["args"] == {"AIRFLOW_BASE": "retrain/base:torch", "RUNNER": "local"}


def broken(tmp_path: Path, edit) -> list[str]:
    doc = yaml.safe_load(COMPOSE.read_text())
    env = compose.read_env_file(ENV)
    edit(doc, env)
    (tmp_path / "docker-compose.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return compose.check(tmp_path / "docker-compose.yaml", tmp_path / ".env", repo=REPO)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d, e: d["services"]["s3"].update(helthcheck={"test": ["CMD", "true"]}),
     "compose specification: services.s3: extension key `helthcheck`"),
    (lambda d, e: d["services"]["postgres"]["healthcheck"].update(interval="10q"),
     "`q` is not a valid duration unit"),
    (lambda d, e: d["services"]["serving"]["depends_on"].update(mlfow={"condition": "service_healthy"}),
     "services.serving.depends_on: no service 'mlfow'"),
    (lambda d, e: d["services"]["serving"].pop("healthcheck"),
     "services.serving: runs continuously (restart: always) but has no healthcheck"),
    (lambda d, e: d["services"]["s3"].update(image="minio/minio:latest"),
     "services.s3.image: 'minio/minio:latest' is not built from images/ nor pinned"),
    (lambda d, e: d["services"]["s3"].update(image="minio/minio"), "is not built from images/ nor pinned"),
    (lambda d, e: d["services"]["mlflow"]["build"].update(dockerfile="images/mlflow/Dockerfile.nope"),
     "Dockerfile.nope does not exist"),
    (lambda d, e: d["services"]["serving"]["build"].update(target="servr"), "has no stage 'servr'"),
    (lambda d, e: d["services"]["serving"]["volumes"].append("cache:/cache"),
     "named volume 'cache' is not declared"),
    (lambda d, e: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"),
     "services.postgres.environment.POSTGRES_PASSWORD: a literal"),
    (lambda d, e: e.pop("MLFLOW_DB_PASSWORD"), "MLFLOW_DB_PASSWORD is required: set MLFLOW_DB_PASSWORD in .env"),
    (lambda d, e: e.update(UNUSED_SETTING="1"), ".env: UNUSED_SETTING is not used by the compose file"),
    (lambda d, e: d["services"]["serving"]["environment"].update(X="${NOT_DOCUMENTED}"),
     "NOT_DOCUMENTED is not set and has no default"),
    (lambda d, e: d["services"]["mlflow"]["depends_on"].update(postgres={"condition": "service_completed_successfully"}),
     "services.mlflow.depends_on.postgres: waits for completion, but postgres restarts"),
])
def test_each_check_catches_what_it_guards_against(tmp_path, edit, expected):
    problems = broken(tmp_path, edit)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("a-${X}-b", {"X": "1"}, "a-1-b"),
    ("$X/$$X", {"X": "1"}, "1/$X"),
    ("${X:-d}", {"X": ""}, "d"),
    ("${X-d}", {"X": ""}, ""),
    ("${X-d}", {}, "d"),
    ("${X:+alt}", {"X": "1"}, "alt"),
    ("${X:+alt}", {}, ""),
    ("${X:?needed}", {"X": "v"}, "v"),
])
def test_interpolation_follows_compose(text, env, expected):
    problems: list[str] = []
    assert compose.interpolate(text, env, set(), problems, "t") == expected and problems == []


def test_env_generates_fresh_secrets_and_never_overwrites(tmp_path):
    target = tmp_path / ".env"
    assert compose.write_env(ENV, target) == 0
    env = compose.read_env_file(target)
    assert compose.PLACEHOLDER not in env.values()
    import base64

    assert len(base64.urlsafe_b64decode(env["AIRFLOW_FERNET_KEY"])) == 32
    assert env["POSTGRES_PASSWORD"] != env["MLFLOW_DB_PASSWORD"]
    assert target.stat().st_mode & 0o777 == 0o600
    assert compose.write_env(ENV, target) == 0 and compose.read_env_file(target) == env
    assert compose.check(COMPOSE, target) == []
