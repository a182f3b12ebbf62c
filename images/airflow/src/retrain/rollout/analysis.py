"""The analysis: is the preview fit to answer clients? Decided on the same requests the active answered.

The active version mirrors a sample of its live requests to the preview, which compares its answers with
the active's and counts the outcome (:data:`retrain_contract.serving.MIRROR_METRICS`). The analysis takes
those counts when it starts and again as traffic comes in, and judges the difference, as Argo Rollouts'
AnalysisTemplates judge Prometheus queries:

- **traffic**: at least ``min_images`` images compared. Live traffic is awaited ``window_s``; if it falls
  short and ``replay`` is on, the deploy step tops it up with the snapshot's held-out test images, each
  sent to the active (``/similar``) and then, with the active's answer, to the preview's ``/mirror``;
- **errors**: the preview's errors per mirrored request at most ``max_error_rate``;
- **latency**: the preview's p95 at most ``max_latency_ratio`` times the active's on the same requests
  (or under ``latency_floor_ms``);
- **embeddings**: the share of preview embeddings that are not unit vectors at most ``max_bad_rate``
  (a wrong width or a non-finite value is an error: a client would have got a 500);
- **agreement**: the label each image's nearest neighbours vote for, each version in its own gallery, agree
  beyond chance: Cohen's kappa at least ``min_label_kappa`` (a collapsed or random embedding space scores
  about 0; a sound model that fixes what drift broke disagrees often, but far from at random).

Counts come from the preview's ``/metrics`` (one preview process, as local mode and a one-replica preview
have), or from Prometheus (``RETRAIN_PROMETHEUS_URL``: every preview pod it scrapes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests

from retrain.settings import AnalysisSettings
from retrain_contract import serving as contract
from retrain_contract.serving import MirrorSource, Pin

log = logging.getLogger(__name__)
REPLAY_NEIGHBOURS = contract.MIRROR_NEIGHBOURS


@dataclass
class Counts:
    """Cumulative counts of the preview's comparisons with one source version."""

    ok: float = 0.0
    errors: float = 0.0
    images: float = 0.0
    bad: dict[str, float] = field(default_factory=dict)
    agree: float = 0.0
    disagree: float = 0.0
    latency: dict[str, dict[float, float]] = field(default_factory=dict)  # side -> {le: cumulative count}
    labels: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> {label: votes}

    def minus(self, base: Counts) -> Counts:
        def nested(mine: dict, theirs: dict) -> dict:
            return {side: {k: n - theirs.get(side, {}).get(k, 0.0) for k, n in inner.items()}
                    for side, inner in mine.items()}

        return Counts(self.ok - base.ok, self.errors - base.errors, self.images - base.images,
                      {k: v - base.bad.get(k, 0.0) for k, v in self.bad.items()}, self.agree - base.agree,
                      self.disagree - base.disagree, nested(self.latency, base.latency), nested(self.labels, base.labels))

    def kappa(self) -> tuple[float, float] | None:
        """(observed agreement, Cohen's kappa) of the two sides' label votes, or None without votes.

        Kappa corrects the agreement for what the two sides' label frequencies would give by chance: a
        collapsed or random embedding space scores about 0, whatever the number of classes; a different but
        sound model (one that fixes what drift broke) scores well above it.
        """
        voted = self.agree + self.disagree
        if voted <= 0:
            return None
        observed = self.agree / voted
        source, preview = self.labels.get("source", {}), self.labels.get("preview", {})
        chance = sum((source.get(label, 0.0) / voted) * (n / voted) for label, n in preview.items())
        return observed, (observed - chance) / (1 - chance) if chance < 1 else (1.0 if observed >= 1 else 0.0)

    @property
    def requests(self) -> float:
        return self.ok + self.errors

    def quantile(self, side: str, q: float) -> float | None:
        """The ``q`` quantile of a side's latency, as Prometheus's ``histogram_quantile`` estimates it."""
        buckets = sorted(self.latency.get(side, {}).items())
        if not buckets or buckets[-1][1] <= 0:
            return None
        rank = q * buckets[-1][1]
        lower_le, lower_n = 0.0, 0.0
        for le, n in buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower_le
                return lower_le + (le - lower_le) * ((rank - lower_n) / (n - lower_n) if n > lower_n else 1.0)
            lower_le, lower_n = le, n
        return buckets[-1][0]


def _labelled(labels: dict[str, str], preview: str, source: str) -> bool:
    return labels.get("model_version") == preview and labels.get("source_version") == source


def counts_from_samples(samples: Iterable[tuple[str, dict[str, str], float]], preview: str, source: str) -> Counts:
    """Counts from Prometheus samples ``(name, labels, value)`` of the preview's mirror metrics."""
    c = Counts()
    for name, labels, value in samples:
        if not _labelled(labels, preview, source):
            continue
        if name == f"{contract.MIRROR_REQUESTS}_total":
            if labels.get("outcome") == "ok":
                c.ok += value
            else:
                c.errors += value
        elif name == f"{contract.MIRROR_IMAGES}_total":
            c.images += value
        elif name == f"{contract.MIRROR_BAD}_total":
            c.bad[labels["reason"]] = c.bad.get(labels["reason"], 0.0) + value
        elif name == f"{contract.MIRROR_VOTES}_total":
            if labels.get("agree") == "true":
                c.agree += value
            else:
                c.disagree += value
        elif name == f"{contract.MIRROR_LABELS}_total":
            side = c.labels.setdefault(labels["side"], {})
            side[labels["label"]] = side.get(labels["label"], 0.0) + value
        elif name == f"{contract.MIRROR_LATENCY}_bucket":
            side = c.latency.setdefault(labels["side"], {})
            le = float(labels["le"])
            side[le] = side.get(le, 0.0) + value
    return c


class ScrapedCounts:
    """The preview's own ``/metrics`` (one process holds every count: local mode, or a one-replica preview)."""

    def __init__(self, preview_url: str):
        self.url = f"{preview_url}/metrics"

    def __call__(self, preview: str, source: str) -> Counts:
        from prometheus_client.parser import text_string_to_metric_families

        resp = requests.get(self.url, timeout=10)
        resp.raise_for_status()
        samples = ((s.name, s.labels, s.value) for family in text_string_to_metric_families(resp.text)
                   for s in family.samples)
        return counts_from_samples(samples, preview, source)


class PrometheusCounts:
    """The same counts summed over every preview pod Prometheus scrapes (instant queries of its HTTP API)."""

    def __init__(self, url: str):
        self.url = f"{url}/api/v1/query"

    def __call__(self, preview: str, source: str) -> Counts:
        selector = f'model_version="{preview}",source_version="{source}"'
        samples: list[tuple[str, dict[str, str], float]] = []
        for metric, by in ((f"{contract.MIRROR_REQUESTS}_total", "outcome"), (f"{contract.MIRROR_IMAGES}_total", ""),
                           (f"{contract.MIRROR_BAD}_total", "reason"), (f"{contract.MIRROR_VOTES}_total", "agree"),
                           (f"{contract.MIRROR_LABELS}_total", "side, label"),
                           (f"{contract.MIRROR_LATENCY}_bucket", "side, le")):
            query = f"sum by (model_version, source_version{', ' + by if by else ''}) ({metric}{{{selector}}})"
            resp = requests.get(self.url, params={"query": query}, timeout=10)
            resp.raise_for_status()
            doc = resp.json()
            if doc.get("status") != "success":
                raise RuntimeError(f"Prometheus at {self.url} refused {query!r}: {doc.get('error')}")
            samples += [(metric, r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]
        return counts_from_samples(samples, preview, source)


def counts_reader(cfg: AnalysisSettings, preview_url: str) -> Callable[[str, str], Counts]:
    return PrometheusCounts(cfg.prometheus_url) if cfg.prometheus_url else ScrapedCounts(preview_url)


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    observed: float | None
    threshold: float
    detail: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    gates: tuple[Gate, ...]
    requests: int
    images: int
    replayed: int
    source: str  # where the counts came from
    reason: str

    @property
    def failed(self) -> Gate | None:
        return next((g for g in self.gates if not g.passed), None)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "requests": self.requests, "images": self.images,
                "replayed": self.replayed, "source": self.source,
                "gates": [{"name": g.name, "passed": g.passed, "observed": g.observed, "threshold": g.threshold,
                           "detail": g.detail} for g in self.gates]}


def judge(c: Counts, cfg: AnalysisSettings, replayed: int, source: str) -> Verdict:
    """The gates, in the order they are reported; the first that failed is the verdict's reason."""
    gates = [Gate("traffic", c.images >= cfg.min_images, c.images, cfg.min_images,
                  f"{c.images:.0f} images compared (at least {cfg.min_images} needed; {replayed} of them replayed)")]
    error_rate = c.errors / c.requests if c.requests else 0.0
    gates.append(Gate("errors", error_rate <= cfg.max_error_rate, error_rate, cfg.max_error_rate,
                      f"{c.errors:.0f} of {c.requests:.0f} mirrored requests failed on the preview "
                      f"({error_rate:.1%}; at most {cfg.max_error_rate:.1%})"))
    preview_p95, source_p95 = c.quantile("preview", 0.95), c.quantile("source", 0.95)
    if preview_p95 is None or source_p95 is None:
        gates.append(Gate("latency", c.requests == 0 or c.ok == 0, None, cfg.max_latency_ratio,
                          "no latency to compare (no request succeeded on the preview)"))
    else:
        ratio = preview_p95 / source_p95 if source_p95 > 0 else math.inf
        ok = ratio <= cfg.max_latency_ratio or preview_p95 * 1000 <= cfg.latency_floor_ms
        gates.append(Gate("latency", ok, ratio, cfg.max_latency_ratio,
                          f"p95 {preview_p95 * 1000:.0f} ms on the preview vs {source_p95 * 1000:.0f} ms on the active "
                          f"(ratio {ratio:.2f}; at most {cfg.max_latency_ratio:g}, or under {cfg.latency_floor_ms:g} ms)"))
    bad = sum(c.bad.values())
    bad_rate = bad / c.images if c.images else 0.0
    reasons = ", ".join(f"{n:.0f} {k}" for k, n in sorted(c.bad.items()) if n) or "none"
    gates.append(Gate("embeddings", bad_rate <= cfg.max_bad_rate, bad_rate, cfg.max_bad_rate,
                      f"{bad:.0f} of {c.images:.0f} preview embeddings are not unit vectors ({reasons}; at most "
                      f"{cfg.max_bad_rate:.1%})"))
    agreement = c.kappa()
    if agreement is not None:
        observed, kappa = agreement
        gates.append(Gate("agreement", kappa >= cfg.min_label_kappa, kappa, cfg.min_label_kappa,
                          f"the neighbours' labels agree on {c.agree:.0f} of {c.agree + c.disagree:.0f} images "
                          f"({observed:.1%}), kappa {kappa:.2f} after chance (at least {cfg.min_label_kappa:g}), each "
                          "version voting in its own gallery"))
    else:
        gates.append(Gate("agreement", True, None, cfg.min_label_kappa,
                          "not judged: a version without a gallery cannot vote"))
    failed = next((g for g in gates if not g.passed), None)
    reason = (f"{failed.name} gate failed: {failed.detail}" if failed else
              f"every gate passed on {c.images:.0f} images ({replayed} replayed)")
    return Verdict(failed is None, tuple(gates), int(c.requests), int(c.images), replayed, source, reason)


def replay(images: list[tuple[str, bytes]], active_url: str, preview_url: str, active: Pin) -> int:
    """Send each image to the active (``/similar``), then with its answer to the preview's ``/mirror``; returns how
    many the preview compared. What a request mirrored by the active carries, sent by the deploy step instead."""
    done = 0
    for name, data in images:
        started = time.perf_counter()
        resp = requests.post(f"{active_url}/similar", params={"k": REPLAY_NEIGHBOURS}, files={"file": (name, data)},
                             headers={contract.REPLAY_HEADER: "1"}, timeout=30)
        latency = time.perf_counter() - started
        labels = None
        if resp.status_code == 200:
            labels = tuple(r["label"] for r in resp.json()["results"])
        elif resp.status_code != 503:  # 503: the active has no gallery; it is compared without votes
            log.warning("replay: the active answered %s with %d; skipped", name, resp.status_code)
            continue
        source = MirrorSource(active.model_version, latency, labels, active.model_name)
        mirrored = requests.post(f"{preview_url}{contract.MIRROR_ROUTE}", files={"files": (name, data)},
                                 headers={contract.MIRROR_HEADER: source.encode()}, timeout=60)
        done += mirrored.status_code == 200
    return done


def analyse(cfg: AnalysisSettings, preview_url: str, active_url: str, preview: Pin, active: Pin,
            replay_images: Callable[[int], list[tuple[str, bytes]]] | None, read: Callable[[str, str], Counts] | None = None,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Verdict:
    """Wait for ``min_images`` mirrored images (up to ``window_s``), top up by replay, then judge."""
    read = read or counts_reader(cfg, preview_url)
    source = f"Prometheus at {cfg.prometheus_url}" if cfg.prometheus_url else f"{preview_url}/metrics"
    base = read(preview.model_version, active.model_version)
    deadline = clock() + cfg.window_s
    seen = Counts()
    while True:
        seen = read(preview.model_version, active.model_version).minus(base)
        if seen.images >= cfg.min_images or clock() >= deadline:
            break
        sleep(cfg.poll_s)
    live = int(seen.images)
    log.info("analysis of %s against %s: %d images of live traffic compared in %.0f s", preview, active, live,
             cfg.window_s)
    replayed = 0
    if seen.images < cfg.min_images and cfg.replay and replay_images is not None:
        wanted = int(cfg.min_images - seen.images)
        images = replay_images(wanted)
        if images:
            replayed = replay(images, active_url, preview_url, active)
            log.info("analysis: %d held-out images replayed to both versions", replayed)
            for _ in range(30):  # Prometheus sees them at its next scrape
                seen = read(preview.model_version, active.model_version).minus(base)
                if seen.images >= live + replayed or not cfg.prometheus_url:
                    break
                sleep(cfg.poll_s)
    return judge(seen, cfg, replayed, source)
