"""The one settings object of the control plane, read from the environment when asked for.

Every field has an environment variable and an embedded local-mode default, so that with nothing
set the system runs on one machine: MLflow at 127.0.0.1:5000 with SQLite, data and storage under
``RETRAIN_HOME``, and a local serving process at 127.0.0.1:8080.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

RUNNERS = ("local", "kubernetes")


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    runner: str
    home: Path
    tracking_uri: str
    data_uri: str
    storage_uri: str
    experiment: str
    model_name: str
    serving_url: str
    serving_state_uri: str
    deploy_timeout_s: float
    deploy_poll_s: float
    local_python: str
    alert_file: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("RETRAIN_HOME") or Path.home() / ".retrain").expanduser().resolve()
        runner = env.get("RETRAIN_RUNNER", "local")
        if runner not in RUNNERS:
            raise SettingsError(f"RETRAIN_RUNNER={runner!r} is not a runner; set it to one of {', '.join(RUNNERS)}")
        return cls(
            runner=runner,
            home=home,
            tracking_uri=env.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
            data_uri=env.get("RETRAIN_DATA_URI", (home / "data").as_uri()),
            storage_uri=env.get("RETRAIN_STORAGE_URI", (home / "storage").as_uri()),
            experiment=env.get("RETRAIN_EXPERIMENT", "image-embedder"),
            model_name=env.get("RETRAIN_MODEL_NAME", "image-embedder"),
            serving_url=env.get("RETRAIN_SERVING_URL", "http://127.0.0.1:8080").rstrip("/"),
            serving_state_uri=env.get("RETRAIN_SERVING_STATE_URI", (home / "serving" / "desired.json").as_uri()),
            deploy_timeout_s=_number(env, "RETRAIN_DEPLOY_TIMEOUT_S", 300.0),
            deploy_poll_s=_number(env, "RETRAIN_DEPLOY_POLL_S", 1.0),
            local_python=env.get("RETRAIN_LOCAL_PYTHON", sys.executable),
            alert_file=env.get("RETRAIN_ALERT_FILE", str(home / "alerts.jsonl")),
        )

    def stage_env(self) -> dict[str, str]:
        """Environment every stage process needs (beyond its flags)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value

