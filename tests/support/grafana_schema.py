"""Grafana's dashboard schema, as the ``grafana-foundation-sdk`` package publishes it, used as a validator.

No Grafana server can be installed here (Debian does not package it, PyPI carries no server binary), so a
dashboard is checked against the typed models Grafana Labs generates from Grafana's own schema (the
package's ``11.6`` line: the dashboard schema of Grafana 11.6; later Grafanas read it and migrate it).
:func:`problems` decodes the dashboard with those models (the dashboard, each panel type's options and
field config, each Prometheus query), encodes it back and reports:

- every key the schema does not know (the round trip drops it),
- every value the round trip changes,
- every value whose type is not the one the schema declares (enums by their values),
- a panel type or a query the SDK has no model for.

Keys the round trip adds are the schema's defaults for fields the file leaves out: not problems.
"""

from __future__ import annotations

import enum
import functools
import json
import types
import typing
from typing import Any


@functools.cache
def _sdk():
    from grafana_foundation_sdk.cog import plugins, runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard, prometheus

    plugins.register_default_plugins()
    return dashboard, prometheus, runtime, JSONEncoder


def problems(doc: dict[str, Any]) -> list[str]:
    """Everything in ``doc`` (a dashboard's JSON model) that Grafana's schema does not accept; [] when valid."""
    dashboard, prometheus, runtime, encoder = _sdk()
    found: list[str] = []
    model = dashboard.Dashboard.from_json(doc)
    again = json.loads(json.dumps(model, cls=encoder))
    _compare(doc, again, "dashboard", found)
    _check_types(model, "dashboard", found)
    for panel in model.panels or []:
        where = f"panel {getattr(panel, 'id_val', None)} ({getattr(panel, 'title', '')!r})"
        if isinstance(panel, dashboard.Panel):
            if runtime.panelcfg_config(panel.type_val) is None:
                found.append(f"{where}: no schema for panel type {panel.type_val!r}")
            for target in panel.targets or []:
                if not isinstance(target, prometheus.Dataquery):
                    found.append(f"{where}: a query that is not a Prometheus query ({type(target).__name__})")
    return found


def _compare(given: Any, encoded: Any, path: str, found: list[str]) -> None:
    if isinstance(given, dict) and isinstance(encoded, dict):
        for key, value in given.items():
            if key not in encoded:
                found.append(f"{path}.{key}: not in Grafana's schema")
            else:
                _compare(value, encoded[key], f"{path}.{key}", found)
    elif isinstance(given, list) and isinstance(encoded, list) and len(given) == len(encoded):
        for i, (a, b) in enumerate(zip(given, encoded, strict=True)):
            _compare(a, b, f"{path}[{i}]", found)
    elif given != encoded or type(given) is not type(encoded):
        found.append(f"{path}: {given!r} reads back as {encoded!r}")


def _check_types(obj: Any, path: str, found: list[str]) -> None:
    """Each attribute of an SDK model against the type its constructor declares, recursively."""
    try:
        hints = typing.get_type_hints(type(obj).__init__)
    except (NameError, TypeError):
        return
    for name, value in vars(obj).items():
        if name in hints and value is not None:
            _check_value(value, hints[name], f"{path}.{name}", found)


def _check_value(value: Any, hint: Any, path: str, found: list[str]) -> None:
    if not _fits(value, hint):
        found.append(f"{path}: {value!r} is not of the declared type {hint}")
        return
    hint = _member_for(value, hint)
    if hasattr(value, "to_json"):
        _check_types(value, path, found)
    elif isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            _check_value(v, _member_for(v, item), f"{path}[{i}]", found)
    elif isinstance(value, dict):
        args = typing.get_args(hint)
        for k, v in value.items():
            _check_value(v, _member_for(v, args[1] if len(args) == 2 else Any), f"{path}.{k}", found)


def _member_for(value: Any, hint: Any) -> Any:
    """The member of a union ``hint`` that ``value`` fits (the hint itself when it is no union)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((h for h in typing.get_args(hint) if h is not type(None) and _fits(value, h)), hint)
    return hint


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, dict):
        return isinstance(value, origin)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True
