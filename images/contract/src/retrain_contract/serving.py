"""What serves, in the words the deploy step, the serving process and the manifests share.

Serving follows the blue-green vocabulary of Argo Rollouts:

- the **active** version answers the serving Service: every client request;
- a **preview** version is started beside it, answers no client, and receives a sample of the
  active's requests, **mirrored** (the active's response goes to the client, the preview's is
  discarded); the preview compares its answer with the active's on the same request and counts the
  outcome in its metrics (:data:`MIRROR_METRICS`), which the deploy step's analysis reads;
- the **switch** moves every client request at once to the preview's version; the version that served
  before stays **warm** until ``warm_until``, so that a rollback is a switch back, not a new rollout.

Two versions never answer clients at the same time. Where the pieces live:

- local mode and the compose stack: one serving process follows a :class:`ServingRecord` that the deploy
  step writes; it holds the active, the preview and the warm version side by side and switches between
  them in memory (its preview answers under ``/preview``);
- Kubernetes: the serving Deployment (``track: stable``) and its preview Deployment (``track: preview``)
  pin one version each in ``MODEL_NAME``/``MODEL_VERSION``; the serving Service selects one track, the
  preview Service the other; the switch is one change of the serving Service's selector.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

# -- Kubernetes: the pod label that a Service selects, and the environment of a serving container -------
TRACK_LABEL = "retrain/track"
STABLE, PREVIEW = "stable", "preview"
MODEL_NAME_ENV, MODEL_VERSION_ENV = "MODEL_NAME", "MODEL_VERSION"
MIRROR_URL_ENV, MIRROR_RATE_ENV = "SERVING_MIRROR_URL", "SERVING_MIRROR_RATE"
PREVIEW_PREFIX = "/preview"  # local mode: the preview's routes, beside the active's, in the same process

# -- mirrored requests: the route a preview takes them on and the header that carries the active's answer ---
MIRROR_ROUTE = "/mirror"
MIRROR_HEADER = "X-Embedder-Mirror"
MIRROR_NEIGHBOURS = 5  # k of the label vote both versions cast, each in its own gallery
# On a client route: the deploy step's replay of a held-out image, answered but neither sampled for the drift
# monitor nor mirrored (the deploy step sends it to the preview itself, with this answer).
REPLAY_HEADER = "X-Embedder-Replay"


@dataclass(frozen=True)
class MirrorSource:
    """What the active version answered to a request it mirrors: its version, how long it took, its votes.

    ``labels`` is the label each image's nearest neighbours vote for in the active's own gallery
    (None when the active has no gallery).
    """

    model_version: str
    latency_s: float
    labels: tuple[str, ...] | None = None
    model_name: str = ""  # empty from a sender that did not say (then only the version identifies the source)

    def encode(self) -> str:
        doc = {"v": self.model_version, "t": round(self.latency_s, 6), "l": list(self.labels) if self.labels else None,
               "n": self.model_name}
        return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> MirrorSource:
        """The header's value; ValueError naming the header and what is wrong with it."""
        try:
            doc = json.loads(base64.urlsafe_b64decode(text.encode()))
            version, latency, labels, name = str(doc["v"]), float(doc["t"]), doc.get("l"), str(doc.get("n") or "")
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{MIRROR_HEADER}: not a mirrored request's source ({type(exc).__name__})") from None
        if not math.isfinite(latency) or latency < 0 or not version:
            raise ValueError(f"{MIRROR_HEADER}: a latency of {latency} s for version {version!r}")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"{MIRROR_HEADER}: labels must be a list of strings")
        return cls(version, latency, tuple(labels) if labels is not None else None, name)

    def is_from(self, pin: Pin) -> bool:
        """Whether ``pin`` answered it: a mirrored request that would compare a version with itself."""
        return self.model_version == pin.model_version and self.model_name in ("", pin.model_name)


# -- what a preview counts of mirrored requests (Prometheus names; labels model_version and source_version) --
MIRROR_REQUESTS = "embedder_mirror_requests"  # counter; outcome: ok | error
MIRROR_IMAGES = "embedder_mirror_images"  # counter: images compared
MIRROR_LATENCY = "embedder_mirror_latency_seconds"  # histogram per request; side: preview | source
MIRROR_BAD = "embedder_mirror_bad_embeddings"  # counter; reason: dim | norm | nonfinite
MIRROR_VOTES = "embedder_mirror_label_votes"  # counter per image both versions voted on; agree: true | false
MIRROR_LABELS = "embedder_mirror_labels"  # counter of those votes by side (preview | source) and label: the marginals
MIRROR_METRICS = (MIRROR_REQUESTS, MIRROR_IMAGES, MIRROR_LATENCY, MIRROR_BAD, MIRROR_VOTES, MIRROR_LABELS)
MIRROR_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 5.0,
                          10.0)
NORM_TOLERANCE = 1e-3  # an embedding is a unit vector within this


# -- local mode: the record the deploy step writes and the serving process follows ----------------------
RECORD_FORMAT = 2


@dataclass(frozen=True)
class Pin:
    """One model version, as a slot of serving pins it (never an alias)."""

    model_name: str
    model_version: str

    def to_json(self) -> dict[str, str]:
        return {"model_name": self.model_name, "model_version": self.model_version}

    @classmethod
    def from_json(cls, doc: Any) -> Pin | None:
        if not doc:
            return None
        return cls(str(doc["model_name"]), str(doc["model_version"]))

    def __str__(self) -> str:
        return f"{self.model_name} version {self.model_version}"


@dataclass(frozen=True)
class ServingRecord:
    """Local mode's serving state: what answers clients, what is previewed, what is kept warm.

    ``revision`` counts the changes of ``active`` (as a Deployment's revisions do), ``change_cause`` says
    why the current one was made. ``mark`` and ``history`` belong to the deploy step (what it last did,
    and the revisions before this one); the serving process reads only the pins and ``warm_until``.
    """

    active: Pin | None
    revision: int = 0
    change_cause: str = ""
    updated_at: str = ""
    preview: Pin | None = None
    warm: Pin | None = None
    warm_until: float = 0.0  # epoch seconds; past it the serving process unloads the warm version
    mark: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        active = self.active.to_json() if self.active else {"model_name": None, "model_version": None}
        return {"format": RECORD_FORMAT, **active, "revision": self.revision, "change_cause": self.change_cause,
                "updated_at": self.updated_at, "preview": self.preview.to_json() if self.preview else None,
                "warm": self.warm.to_json() if self.warm else None, "warm_until": self.warm_until,
                "mark": self.mark, "history": list(self.history)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ServingRecord:
        """A record of this format, or of format 1 (one pinned version, no preview), which reads the same."""
        active = Pin(str(doc["model_name"]), str(doc["model_version"])) if doc.get("model_version") else None
        return cls(active=active, revision=int(doc.get("revision", 0)), change_cause=doc.get("change_cause", ""),
                   updated_at=doc.get("updated_at", ""), preview=Pin.from_json(doc.get("preview")),
                   warm=Pin.from_json(doc.get("warm")), warm_until=float(doc.get("warm_until") or 0.0),
                   mark=dict(doc.get("mark") or {}), history=tuple(doc.get("history") or ()))
