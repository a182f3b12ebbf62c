"""Every Param of a ``retrain_embedder`` run, declared once.

A :class:`ParamSpec` says a Param's name, type, default and bounds, its title and description in
the Trigger form, the stage flag it becomes (``--epochs``) and the environment variable with which
a deployment sets its default (``RETRAIN_EPOCHS``: what nightly and drift-started runs, which carry
no conf, train with). From that one declaration:

- the DAG makes its Airflow ``Param`` (:meth:`ParamSpec.schema` is its JSON schema);
- the stage adds its argparse flag (:meth:`ParamSpec.add_argument`), with the same default and bounds;
- the settings read the deployment's default (:meth:`ParamSpec.from_env`), checked against the bounds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision ResNets
_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "an object"}


def describe(schema: Mapping[str, Any]) -> str:
    """What a JSON schema accepts, in words: ``an integer from 1 to 500``, ``one of a, b``, ``a number above 0``."""
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if "enum" in schema:
        words = "one of " + ", ".join(str(v) for v in schema["enum"] if v is not None)
    else:
        words = " or ".join(_WORDS.get(k, k) for k in kinds if k != "null") or "a value"
        low = ("from", schema["minimum"]) if "minimum" in schema else ("above", schema.get("exclusiveMinimum"))
        high = ("to", schema["maximum"]) if "maximum" in schema else ("below", schema.get("exclusiveMaximum"))
        if low[1] is not None and high[1] is not None:
            if (low[0], high[0]) == ("from", "to"):
                words += f" from {low[1]:g} to {high[1]:g}"
            else:
                words += f" {low[0]} {low[1]:g} and {'at most' if high[0] == 'to' else 'below'} {high[1]:g}"
        elif low[1] is not None:
            words += f" of at least {low[1]:g}" if low[0] == "from" else f" above {low[1]:g}"
        elif high[1] is not None:
            words += f" of at most {high[1]:g}" if high[0] == "to" else f" below {high[1]:g}"
    if "null" in kinds:
        words += ", or empty"
    return words


class ParamError(ValueError):
    """A value a Param does not accept; the message names the Param, what it accepts and what it got."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # bool, int, float or str
    default: Any
    title: str
    description: str
    flag: str | None = None  # the stage flag it becomes; None: the control plane reads it
    env: str | None = None  # the variable that sets a deployment's default
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False  # may be left empty (None): the form shows it as optional
    extra: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the Airflow Param (what the Trigger form and the API server check)."""
        kind = _TYPES[self.kind]
        schema: dict[str, Any] = {"type": ["null", kind] if self.optional else kind, "title": self.title}
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum),
                           ("exclusiveMinimum", self.exclusive_minimum)):
            if value is not None:
                schema[key] = value
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema | self.extra

    def check(self, value: Any) -> Any:
        """``value`` when this Param accepts it; ParamError naming the Param and its bounds otherwise."""
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if ok and self.kind in (int, float):
            ok = math.isfinite(value) and not (
                (self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)
                or (self.exclusive_minimum is not None and value <= self.exclusive_minimum))
        if ok and self.choices:
            ok = value in self.choices
        if not ok:
            raise ParamError(f"{self.name} must be {describe(self.schema())}; got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """A value from its text (a flag's argument, an environment variable), checked."""
        text = text.strip()
        if text == "" and self.optional:
            return None
        try:
            if self.kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                value: Any = text.lower() == "true"
            else:
                value = self.kind(text)
        except ValueError:
            raise ParamError(f"{self.name} must be {describe(self.schema())}; got {text!r}") from None
        return self.check(value)

    def from_env(self, env: Mapping[str, str]) -> Any:
        """The deployment's default: ``env[self.env]`` when set (checked), else the declared default."""
        raw = env.get(self.env) if self.env else None
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ParamError as exc:
            raise ParamError(f"{self.env}={raw!r}: {exc}") from None

    def add_argument(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """The stage's flag: same default and bounds; a bad value is a usage error naming the flag."""
        if self.flag is None:
            raise ValueError(f"Param {self.name} is not a stage flag")

        def parse(text: str) -> Any:
            try:
                return self.parse(text)
            except ParamError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        parser.add_argument(self.flag, type=parse, default=self.default,
                            help=f"{self.description} ({describe(self.schema())}; default {self.default!r})")


FORCE_RETRAIN = ParamSpec("force_retrain", bool, False, "Force retrain",
                          "Train even when the champion is serving and no drift is confirmed.")
EPOCHS = ParamSpec("epochs", int, 10, "Epochs", "Passes over the training split.", flag="--epochs",
                   env="RETRAIN_EPOCHS", minimum=1, maximum=500)
LEARNING_RATE = ParamSpec("learning_rate", float, 0.001, "Learning rate", "AdamW learning rate (cosine-annealed to zero).",
                          flag="--learning-rate", env="RETRAIN_LEARNING_RATE", exclusive_minimum=0, maximum=1)
BATCH_SIZE = ParamSpec("batch_size", int, 64, "Batch size",
                       "Images per optimisation step on each training process (one per GPU); a step trains on this "
                       "times the number of processes.", flag="--batch-size",
                       env="RETRAIN_BATCH_SIZE", minimum=1, maximum=4096)
IMAGE_SIZE = ParamSpec("image_size", int, 224, "Image size",
                       "Images are resized to this square side (pixels) for training and serving.",
                       flag="--image-size", env="RETRAIN_IMAGE_SIZE", minimum=32, maximum=1024)
ARCHITECTURE = ParamSpec("architecture", str, "resnet50", "Architecture",
                         "torchvision ResNet; resnet50 gives 2048-d embeddings.", flag="--architecture",
                         env="RETRAIN_ARCHITECTURE", choices=ARCHITECTURES)
PRETRAINED_WEIGHTS = ParamSpec("pretrained_weights", str, None, "Pretrained weights",
                               "Optional torchvision state dict to start from (file:// or s3://). "
                               "Empty: train from scratch.", flag="--pretrained-weights",
                               env="RETRAIN_PRETRAINED_WEIGHTS", optional=True)
DRIFT_ALPHA = ParamSpec("drift_alpha", float, 0.01, "Drift p-value threshold",
                        "A monitoring window drifts when its permutation p-value is below this.",
                        env="RETRAIN_DRIFT_ALPHA", exclusive_minimum=0, maximum=1)
DRIFT_WINDOWS = ParamSpec("drift_windows", int, 3, "Drift windows (K)",
                          "Drift is confirmed after this many consecutive drifted windows.",
                          env="RETRAIN_DRIFT_WINDOWS", minimum=1, maximum=100)
DRIFT_COOLDOWN_H = ParamSpec("drift_cooldown_h", float, 24.0, "Drift cooldown (hours)",
                             "No drift-triggered retrain this soon after the last training.",
                             env="RETRAIN_DRIFT_COOLDOWN_H", minimum=0)
MAX_CHAMPION_AGE_DAYS = ParamSpec("max_champion_age_days", float, 30.0, "Maximum champion age (days)",
                                  "Retrain when the champion is older than this, drift or not.",
                                  env="RETRAIN_MAX_CHAMPION_AGE_DAYS", exclusive_minimum=0)
MIN_IMPROVEMENT = ParamSpec("min_improvement", float, 0.0, "Minimum improvement",
                            "Recall@1 gain over the champion (same data) required to promote.",
                            env="RETRAIN_MIN_IMPROVEMENT", minimum=0, maximum=1)

LIFT_VETO = ParamSpec("lift_veto", bool, False, "Lift an operator's veto",
                      "An operator took a version out of service by hand (kubectl rollout undo, a switch back, an "
                      "edit); the system keeps it out until a new champion is promoted. Set this to retrain with that "
                      "version as the champion again: it serves after this run unless the challenger beats it.")

TRAINING = (EPOCHS, LEARNING_RATE, BATCH_SIZE, IMAGE_SIZE, ARCHITECTURE, PRETRAINED_WEIGHTS)
DRIFT = (DRIFT_ALPHA, DRIFT_WINDOWS, DRIFT_COOLDOWN_H, MAX_CHAMPION_AGE_DAYS)
ALL = (FORCE_RETRAIN, *TRAINING, *DRIFT, MIN_IMPROVEMENT, LIFT_VETO)  # the order of the Trigger form
