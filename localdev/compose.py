"""docker-compose.yaml tooling: write a ``.env`` with random secrets, and check the file without Docker.

``python -m localdev.compose env`` writes ``.env`` from ``.env.example`` with every ``change-me``
replaced by a fresh random secret (the Fernet key in its required format); it never overwrites an
existing ``.env``.

``python -m localdev.compose check`` is what ``docker compose config`` would catch, and what this
project requires on top, for machines without Docker:

- variables interpolated the way Compose does (``$$``, ``${VAR}``, ``${VAR:-default}``,
  ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``) from the env file; a
  required one that is unset is an error;
- the result parsed by the Compose Specification's strict parser (the ``compose-spec`` package:
  unknown keys, wrong types, bad durations and ports are errors);
- references: ``depends_on`` services exist, ``service_healthy`` targets have a healthcheck,
  ``service_completed_successfully`` targets are one-shot, named volumes are declared;
- every service is built from ``images/`` (the Dockerfile and its target exist) or pinned to an
  upstream image by a version tag (not ``latest``) or a digest;
- every long-running service has a healthcheck;
- no secret-looking environment value is a literal: it comes from the env file;
- the env file documents exactly the variables the compose file uses.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|FERNET", re.I)
PATH_NAME = re.compile(r"_(FILE|PATH|DIR)$", re.I)  # where a secret lives is not a secret
VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)
MOVING_TAGS = {"latest", "stable", "main", "master", "edge", "nightly"}


class ComposeError(ValueError):
    pass


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ComposeError(f"{path}:{number}: expected NAME=value, got {line!r}")
        name, value = line.split("=", 1)
        env[name.strip()] = value.strip().strip("'\"")
    return env


def interpolate(value: str, env: Mapping[str, str], used: set[str], problems: list[str], where: str) -> str:
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") if match.group("braced") is not None else match.group("plain")
        parsed = BRACED.match(expr)
        if not parsed or "${" in (parsed.group("arg") or ""):
            problems.append(f"{where}: cannot interpolate ${{{expr}}} (nested or malformed)")
            return ""
        name, op, arg = parsed.group("name"), parsed.group("op"), parsed.group("arg") or ""
        used.add(name)
        present, current = name in env, env.get(name)
        if op in (":-", "-"):
            return current if (present and (op == "-" or current)) else arg
        if op in (":?", "?"):
            if not present or (op == ":?" and not current):
                problems.append(f"{where}: {name} is required: {arg or 'set it in the env file'}")
                return ""
            return current or ""
        if op in (":+", "+"):
            return arg if (present and (op == "+" or current)) else ""
        if not present:
            problems.append(f"{where}: {name} is not set and has no default")
        return current or ""

    return VARIABLE.sub(replace, value)


def resolve(node: Any, env: Mapping[str, str], used: set[str], problems: list[str], where: str = "") -> Any:
    if isinstance(node, str):
        return interpolate(node, env, used, problems, where or "(top)")
    if isinstance(node, dict):
        return {k: resolve(v, env, used, problems, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env, used, problems, f"{where}[{i}]") for i, v in enumerate(node)]
    return node


def _env_items(service: dict) -> list[tuple[str, Any]]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return [tuple(item.split("=", 1)) if "=" in item else (item, None) for item in env]
    return list(env.items())


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in MOVING_TAGS and any(c.isdigit() for c in tag)


def check(compose_file: Path, env_file: Path, repo: Path = REPO) -> list[str]:
    """Everything wrong with ``compose_file`` given ``env_file``: an empty list when it is fine."""
    problems: list[str] = []
    raw = yaml.safe_load(compose_file.read_text())  # YAML merge keys (<<) are resolved here
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        return [f"{compose_file}: no services"]
    env = read_env_file(env_file)
    used: set[str] = set()
    doc = resolve(raw, env, used, problems)

    try:
        from compose_spec import PyCompose

        PyCompose.from_yaml(yaml.safe_dump(doc, sort_keys=False)).validate()
    except ValueError as exc:
        problems.append(f"compose specification: {exc}")

    services: dict[str, dict] = doc["services"]
    declared_volumes = set(doc.get("volumes") or {})
    for name, service in services.items():
        where = f"services.{name}"
        depends = service.get("depends_on") or {}
        for target, spec in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            if target not in services:
                problems.append(f"{where}.depends_on: no service {target!r}")
                continue
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy" and not services[target].get("healthcheck"):
                problems.append(f"{where}.depends_on.{target}: service_healthy, but {target} has no healthcheck")
            if condition == "service_completed_successfully" and services[target].get("restart", "no") != "no":
                problems.append(f"{where}.depends_on.{target}: waits for completion, but {target} restarts")
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0] if isinstance(mount, str) else (mount.get("source") or "")
            if source and not source.startswith((".", "/", "~")) and source not in declared_volumes:
                problems.append(f"{where}.volumes: named volume {source!r} is not declared under volumes")
        build = service.get("build")
        if build:
            context = repo / (build.get("context", ".") if isinstance(build, dict) else build)
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{where}.build: {dockerfile} does not exist")
            elif not dockerfile.resolve().is_relative_to((repo / "images").resolve()):
                problems.append(f"{where}.build: {dockerfile} is not under images/")
            elif isinstance(build, dict) and build.get("target") and not re.search(
                    rf"^FROM\s+\S+\s+AS\s+{re.escape(build['target'])}\s*$", dockerfile.read_text(), re.M | re.I):
                problems.append(f"{where}.build: {dockerfile} has no stage {build['target']!r}")
        elif not _image_pinned(str(service.get("image", ""))):
            problems.append(f"{where}.image: {service.get('image')!r} is not built from images/ nor pinned to a "
                            "version tag or digest")
        if service.get("restart", "no") != "no" and not service.get("healthcheck"):
            problems.append(f"{where}: runs continuously (restart: {service['restart']}) but has no healthcheck")

    for name, service in raw["services"].items():  # literals are checked before interpolation
        for key, value in _env_items(service):
            if SECRET_NAME.search(key) and not PATH_NAME.search(key) and value not in (None, "") \
                    and not re.fullmatch(r"\$\{[^}]+\}", str(value)):
                problems.append(f"services.{name}.environment.{key}: a literal; take it from the env file (${{...}})")

    documented = set(env)
    for missing in sorted(used - documented):
        problems.append(f"{env_file.name}: {missing} is used by the compose file but not documented")
    for unused in sorted(documented - used):
        problems.append(f"{env_file.name}: {unused} is not used by the compose file")
    return problems


def write_env(example: Path, target: Path) -> int:
    """``target`` from ``example`` with every change-me replaced by a random secret; never overwrites."""
    if target.exists():
        print(f"{target} exists; left as it is (delete it to generate a new one)")
        return 0
    lines = []
    for line in example.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and value.strip() == PLACEHOLDER:
            if name.strip() == "AIRFLOW_FERNET_KEY":
                value = base64.urlsafe_b64encode(os.urandom(32)).decode()
            elif name.strip().endswith("_USER") or name.strip().endswith("ACCESS_KEY"):
                value = f"{name.strip().lower().replace('_', '-')[:20]}-{secrets.token_hex(4)}"
            else:
                value = secrets.token_urlsafe(24)
            line = f"{name}={value}"
        lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o600)
    print(f"wrote {target} with fresh secrets (mode 600)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.compose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="write .env from .env.example with random secrets")
    checker = sub.add_parser("check", help="check docker-compose.yaml (no Docker needed)")
    checker.add_argument("--file", type=Path, default=REPO / "docker-compose.yaml")
    checker.add_argument("--env-file", type=Path, default=REPO / ".env.example")
    args = parser.parse_args(argv)
    if args.command == "env":
        return write_env(REPO / ".env.example", REPO / ".env")
    problems = check(args.file, args.env_file)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.file.name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
