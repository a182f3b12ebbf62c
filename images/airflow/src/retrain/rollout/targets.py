"""What serves, wherever it runs: one protocol, :class:`ServingTarget`, for local mode's serving record and for
Kubernetes (:mod:`retrain.rollout.kubernetes`).

A target holds up to three versions (:mod:`retrain_contract.serving`): the **active** one (clients), a
**preview** beside it (no clients; the deploy step's checks and mirrored traffic) and a **warm** one (the
version before the last switch, kept until ``warm_until``). Beside them it keeps the deploy step's
:class:`Mark`: what the system last made serve, by which run, and what it rejected. Anything else that
changes what serves (``kubectl rollout undo``, a switch back, an edit) leaves the mark behind, which is how
the system tells an operator's hand from its own (:mod:`retrain.rollout.ownership`).

Every operation is idempotent: a retry after any failure reads the state and goes on from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import requests
from airflow.sdk.exceptions import AirflowFailException

from retrain_contract.serving import Pin, ServingRecord

REVISION_HISTORY_LIMIT = 10
SWITCHED, SWITCHED_BACK, REJECTED, ADOPTED = "switched", "switched_back", "rejected", "adopted"


class RolloutFailed(AirflowFailException):
    """The new version did not serve. A verdict: the task fails without retries.

    ``rolled_back_to`` is the version that serves again (None when the new one never served clients);
    ``alerted`` is set once the failure's own alert went out, so the task's failure callback sends no second one.
    """

    def __init__(self, message: str, *, rolled_back_to: Pin | None = None, gate: str | None = None):
        super().__init__(message)
        self.rolled_back_to = rolled_back_to
        self.gate = gate
        self.alerted = False


@dataclass(frozen=True)
class Mark:
    """What the deploy step last made serve, kept beside what serves (the record; the Service's annotation).

    ``version`` is the version the system made active (or, ``adopted``, the one it found serving and took
    as it is; ``vetoed`` then names the version an operator took out); ``rejected`` a version run ``run_id``
    refused (``gate``: which check failed), which no retry of that run puts into service. ``recorded`` and
    ``alerted`` say whether the serving history and the alert of this act are out.
    """

    model_name: str
    version: str
    run_id: str
    action: str
    at: float
    rejected: str | None = None
    vetoed: str | None = None
    gate: str | None = None
    reason: str = ""
    recorded: bool = False
    alerted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Mark | None:
        if not doc or "version" not in doc:
            return None
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    @property
    def pin(self) -> Pin:
        return Pin(self.model_name, self.version)

    def done(self, **changes: Any) -> Mark:
        return replace(self, **changes)


@dataclass(frozen=True)
class ServingState:
    active: Pin | None  # what answers clients
    revision: int  # the active's revision (each change of the active is one)
    change_cause: str
    preview: Pin | None = None
    warm: Pin | None = None
    warm_until: float = 0.0
    mark: Mark | None = None

    @property
    def version(self) -> str | None:
        return self.active.model_version if self.active else None


class ServingTarget(Protocol):
    """What serves, as the deploy step drives it. Each call is idempotent."""

    name: str
    serving_url: str  # what clients call
    preview_url: str  # what the deploy step checks the preview at

    def read(self) -> ServingState: ...

    def start_preview(self, pin: Pin, cause: str, run_id: str) -> None:
        """Start ``pin`` beside the active version, taking no client traffic (replaces any other preview)."""

    def preview_status(self, pin: Pin) -> tuple[bool, str]:
        """(ready, progress in kubectl's words); raises RolloutFailed when it can no longer get ready."""

    def scale_preview(self) -> None:
        """Give the preview as many replicas as the active has, before it takes every request."""

    def switch(self, pin: Pin, cause: str, mark: Mark, warm_s: float) -> None:
        """Every client request to the preview ``pin`` at once; the old active stays warm ``warm_s`` seconds."""

    def switch_back(self, pin: Pin, cause: str, mark: Mark) -> None:
        """Every client request back to ``pin`` (warm: at once); the version switched away from is dropped."""

    def active_status(self, pin: Pin) -> tuple[bool, str]:
        """(clients are answered by ``pin``, progress)."""

    def drop_preview(self) -> None: ...

    def settle(self, pin: Pin, cause: str) -> None:
        """After the warm window: the old version goes, ``pin`` serves from where it will stay."""

    def set_mark(self, mark: Mark) -> None: ...


def _metadata(url: str) -> dict[str, Any] | None:
    try:
        resp = requests.get(f"{url}/metadata", timeout=5)
        return resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def _answered_by(url: str, pin: Pin, what: str) -> tuple[bool, str]:
    meta = _metadata(url)
    if meta is None:
        return False, f"{what}: not reachable at {url}"
    if (meta.get("model_name"), str(meta.get("model_version"))) == (pin.model_name, pin.model_version) and meta.get("ready"):
        return True, f"{what} answers with {pin}"
    detail = f"; last error: {meta['last_error']}" if meta.get("last_error") else ""
    return False, f"{what}: {meta.get('model_version') or 'no version'} ready={meta.get('ready')}, want {pin}{detail}"


class LocalServing:
    """Local mode: the serving record (:class:`~retrain_contract.serving.ServingRecord`) the serving process follows."""

    name = "embedder-serving"

    def __init__(self, state_uri: str, serving_url: str, preview_url: str):
        parsed = urlparse(state_uri)
        if parsed.scheme not in ("", "file"):
            raise ValueError(f"local serving state must be a file:// URI, got {state_uri!r}")
        self.path = Path(parsed.path if parsed.scheme else state_uri)
        self.serving_url, self.preview_url = serving_url, preview_url

    def _record(self) -> ServingRecord:
        try:
            return ServingRecord.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return ServingRecord(active=None)

    def _write(self, record: ServingRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record.to_json(), indent=2))
        tmp.replace(self.path)  # atomic: the serving process reads the old record or the new one

    def read(self) -> ServingState:
        r = self._record()
        return ServingState(r.active, r.revision, r.change_cause, r.preview, r.warm, r.warm_until,
                            Mark.from_json(r.mark))

    def start_preview(self, pin: Pin, cause: str, run_id: str) -> None:
        r = self._record()
        if r.preview != pin:
            self._write(replace(r, preview=pin))

    def preview_status(self, pin: Pin) -> tuple[bool, str]:
        return _answered_by(self.preview_url, pin, "the preview")

    def scale_preview(self) -> None:
        """One process holds both versions: nothing to scale."""

    def _activate(self, r: ServingRecord, pin: Pin, cause: str, mark: Mark, warm: Pin | None,
                  warm_until: float) -> ServingRecord:
        history = list(r.history)
        if r.active:
            history.append({"revision": r.revision, **r.active.to_json(), "change_cause": r.change_cause,
                            "updated_at": r.updated_at})
        return ServingRecord(active=pin, revision=r.revision + 1, change_cause=cause,
                             updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), preview=None, warm=warm,
                             warm_until=warm_until, mark=mark.to_json(), history=tuple(history[-REVISION_HISTORY_LIMIT:]))

    def switch(self, pin: Pin, cause: str, mark: Mark, warm_s: float) -> None:
        r = self._record()
        if r.active == pin:
            self.set_mark(mark)
            return
        self._write(self._activate(r, pin, cause, mark, r.active, time.time() + warm_s if r.active else 0.0))

    def switch_back(self, pin: Pin, cause: str, mark: Mark) -> None:
        r = self._record()
        if r.active == pin:
            self._write(replace(r, preview=None, warm=None, warm_until=0.0, mark=mark.to_json()))
            return
        self._write(self._activate(r, pin, cause, mark, None, 0.0))

    def active_status(self, pin: Pin) -> tuple[bool, str]:
        return _answered_by(self.serving_url, pin, f'deployment "{self.name}"')

    def drop_preview(self) -> None:
        r = self._record()
        if r.preview is not None:
            self._write(replace(r, preview=None))

    def settle(self, pin: Pin, cause: str) -> None:
        r = self._record()
        if r.warm is not None:
            self._write(replace(r, warm=None, warm_until=0.0))

    def set_mark(self, mark: Mark) -> None:
        r = self._record()
        self._write(replace(r, mark=mark.to_json()))
