"""Mirrored traffic: the active version sends a sample of its requests to the preview, which compares answers.

The active side (:class:`Mirror`) keeps a random share of the requests it answered (``--mirror-rate``)
and, after the client has its response, hands each one to the preview with its own answer
(:class:`~retrain_contract.serving.MirrorSource`: its version, neighbour votes and latency, which it
measures on the mirror's thread the way the preview measures its own: :func:`source_sync`). The
preview is in this process (local mode: the holder's preview) or behind a URL (Kubernetes: the preview
Service, ``--mirror-url``, route :data:`~retrain_contract.serving.MIRROR_ROUTE`, the source in the
:data:`~retrain_contract.serving.MIRROR_HEADER` header). Mirroring never costs a client anything: at
most ``max_in_flight`` mirrored requests at a time (more are shed), their work runs on a thread of its
own, and a preview that is down or slow only makes the active count the failure.

The preview side (:func:`compare_sync`) embeds the images with the previewed version, checks each
embedding (dimension, unit norm, finite), lets its own gallery vote on each image's label, and counts
the outcome against the source's answer in :class:`MirrorStats`: requests (ok or error), latencies of
both sides, bad embeddings, and the label votes (how often they agree, and each side's labels, from
which the analysis corrects the agreement for chance). The deploy step's analysis reads those counters.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from embedder.serving.inputs import encode_multipart, preprocess
from retrain_contract import serving as contract
from retrain_contract.serving import MirrorSource

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from embedder.serving.model import Serving

log = logging.getLogger(__name__)
DEFAULT_MAX_IN_FLIGHT = 2
DEFAULT_TIMEOUT_S = 30.0
UNREACHABLE_BACKOFF_S = 2.0  # after the preview URL refused a connection, how long the active does not try it
SAME_VERSION_BACKOFF_S = 10.0  # after it led back to this version (Argo points the preview Service at the active)


class MirrorStats:
    """The preview's counts of mirrored requests, labelled by its version and the source's."""

    def __init__(self, registry: CollectorRegistry):
        from prometheus_client import Counter, Histogram

        labels = ["model_version", "source_version"]
        self.requests = Counter(contract.MIRROR_REQUESTS, "mirrored requests compared, by outcome of the preview",
                                [*labels, "outcome"], registry=registry)
        self.images = Counter(contract.MIRROR_IMAGES, "images of mirrored requests compared", labels, registry=registry)
        self.latency = Histogram(contract.MIRROR_LATENCY, "latency of a mirrored request on each side",
                                 [*labels, "side"], buckets=contract.MIRROR_LATENCY_BUCKETS, registry=registry)
        self.bad = Counter(contract.MIRROR_BAD, "preview embeddings that are not unit vectors of the model's width",
                           [*labels, "reason"], registry=registry)
        self.votes = Counter(contract.MIRROR_VOTES, "images both versions voted on, by whether the labels agree",
                             [*labels, "agree"], registry=registry)
        self.labels = Counter(contract.MIRROR_LABELS, "the labels each side voted for on those images",
                              [*labels, "side", "label"], registry=registry)

    def record(self, version: str, source: MirrorSource, result: dict[str, Any]) -> None:
        labels = (version, source.model_version)
        self.requests.labels(*labels, result["outcome"]).inc()
        self.latency.labels(*labels, "source").observe(source.latency_s)
        if result["outcome"] != "ok":
            return
        self.images.labels(*labels).inc(result["images"])
        self.latency.labels(*labels, "preview").observe(result["latency_s"])
        for reason, count in result["bad"].items():
            if count:
                self.bad.labels(*labels, reason).inc(count)
        if result.get("agree") is not None:
            agree, votes = result["agree"], result["votes"]
            self.votes.labels(*labels, "true").inc(agree)
            self.votes.labels(*labels, "false").inc(votes - agree)
            for side, voted in (("preview", result["labels"]), ("source", source.labels or ())):
                for label in voted:
                    self.labels.labels(*labels, side, label).inc()


def sanity(vectors: torch.Tensor, dim: int) -> dict[str, int]:
    """Embeddings of the wrong width, with a non-finite value, or not of unit norm (counted once each, in that order)."""
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        return {"dim": len(vectors), "nonfinite": 0, "norm": 0}
    finite = torch.isfinite(vectors).all(dim=1)
    unit = (vectors.norm(dim=1) - 1).abs() <= contract.NORM_TOLERANCE
    return {"dim": 0, "nonfinite": int((~finite).sum()), "norm": int((finite & ~unit).sum())}


def votes(serving: Serving, vectors: torch.Tensor) -> list[str] | None:
    """Each image's label, voted by its nearest neighbours in the version's own gallery (None: no gallery)."""
    found = serving.gallery
    if found is None or not torch.isfinite(vectors).all():
        return None
    scores, indices = found.search(vectors, contract.MIRROR_NEIGHBOURS)
    return found.vote(scores, indices)


def source_sync(cur: Serving, items: list[tuple[str, bytes]], max_pixels: int) -> MirrorSource:
    """The active's answer to a request it mirrors, timed as the preview times its own (preprocessing and one
    unbatched forward pass on the mirror's thread), so that the two latencies compare the versions, not the load."""
    started = time.perf_counter()
    vectors = cur.loaded.embed(preprocess(items, cur.loaded.image_size, max_pixels))
    latency = time.perf_counter() - started
    labels = votes(cur, vectors)
    return MirrorSource(cur.desired.model_version, latency, tuple(labels) if labels is not None else None,
                        cur.desired.model_name)


def compare_sync(target: Serving, items: list[tuple[str, bytes]], source: MirrorSource, max_pixels: int) -> dict[str, Any]:
    """The preview's side of one mirrored request: embed, check, vote, and compare with the source's votes."""
    started = time.perf_counter()
    try:
        tensors = preprocess(items, target.loaded.image_size, max_pixels)
        vectors = target.loaded.embed(tensors)
        bad = sanity(vectors, target.loaded.embedding_dim)
        labels = votes(target, vectors)
    except Exception as exc:  # what the preview would have answered a client: an error
        return {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
    if bad["dim"] or bad["nonfinite"]:  # a client would have got a 500 for these
        return {"outcome": "error", "error": f"bad embeddings: {bad}", "bad": bad}
    result: dict[str, Any] = {"outcome": "ok", "images": len(items), "latency_s": time.perf_counter() - started,
                              "bad": bad, "agree": None, "votes": 0}
    if labels is not None and source.labels is not None and len(source.labels) == len(labels):
        result["agree"] = sum(a == b for a, b in zip(labels, source.labels, strict=True))
        result["votes"] = len(labels)
        result["labels"] = labels
    return result


class Mirror:
    """The active side: sample requests and hand them, with the active's answer, to the preview."""

    def __init__(self, rate: float, url: str = "", max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 timeout_s: float = DEFAULT_TIMEOUT_S, seed: int | None = None):
        if not 0 <= rate <= 1:
            raise ValueError(f"--mirror-rate must be from 0 to 1, got {rate}")
        self.rate, self.url, self.max_in_flight, self.timeout_s = rate, url.rstrip("/"), max_in_flight, timeout_s
        self._random = random.Random(seed)
        self._in_flight = 0
        self._unreachable_until = 0.0
        self._client: Any = None
        self._tasks: set[asyncio.Task] = set()
        self.sent: Any = None  # a Counter, once bound to the app's registry

    def bind(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.sent = Counter("embedder_mirror_sent", "requests this version mirrored to a preview, by outcome",
                            ["outcome"], registry=registry)

    def offer(self, items: list[tuple[str, bytes]], cur: Serving, local_preview: Callable[[], Serving | None],
              measure: Callable[..., Any], compare_local: Callable[..., Any]) -> None:
        """Maybe mirror one answered request: to the in-process preview if there is one, else to the preview URL."""
        if not self.rate or self._random.random() >= self.rate:
            return
        preview = local_preview()
        if preview is None and (not self.url or time.monotonic() < self._unreachable_until):
            return
        if preview is not None and preview.pin == cur.pin:
            return
        if self._in_flight >= self.max_in_flight:
            self._count("shed")
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(items, cur, preview, measure, compare_local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, items, cur: Serving, preview: Serving | None, measure, compare_local) -> None:
        try:
            source = await measure(cur, items)
            if preview is not None:
                result = await compare_local(preview, items, source)
                self._count("ok" if result["outcome"] == "ok" else "error")
            else:
                self._count(await self._post(items, source))
        except Exception:  # mirroring must never reach a client
            log.exception("mirroring a request failed")
            self._count("error")
        finally:
            self._in_flight -= 1

    async def _post(self, items, source: MirrorSource) -> str:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        body, content_type = encode_multipart(items)
        try:
            resp = await self._client.post(f"{self.url}{contract.MIRROR_ROUTE}", content=body, headers={
                "Content-Type": content_type, contract.MIRROR_HEADER: source.encode()})
        except httpx.ConnectError:
            self._unreachable_until = time.monotonic() + UNREACHABLE_BACKOFF_S
            return "unreachable"
        except httpx.TimeoutException:
            return "timeout"
        if resp.status_code == 409:  # the preview address leads back to this version (no preview now)
            self._unreachable_until = time.monotonic() + SAME_VERSION_BACKOFF_S
            return "same_version"
        return "ok" if resp.status_code == 200 and resp.json().get("outcome") == "ok" else "error"

    def _count(self, outcome: str) -> None:
        if self.sent is not None:
            self.sent.labels(outcome).inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()


def compare_pool() -> ThreadPoolExecutor:
    """The one thread a preview's mirrored work runs on: it never takes a client's preprocessing worker."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror")
