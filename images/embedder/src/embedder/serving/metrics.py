"""Prometheus metrics of the serving API, one registry per app (so several apps can live in one process).

Requests by route template, method and status (count and latency, from :class:`MetricsMiddleware`);
client batch sizes; forward-pass batch sizes and durations; embedding norms and refused non-finite
embeddings; ``/similar`` top-1 scores; and, set when scraped, queue depth, readiness and model info.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedder.serving.batching import MicroBatcher
    from embedder.serving.model import ModelHolder


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        labels = ["route", "method", "status"]
        self.requests = Counter("embedder_http_requests", "HTTP requests by route and status", labels, registry=r)
        self.latency = Histogram("embedder_http_request_duration_seconds", "HTTP request latency by route and status",
                                 labels, registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.request_images = Histogram("embedder_request_images", "images per request (client batch size)",
                                        ["route"], buckets=self.SIZE_BUCKETS, registry=r)
        self.batch_size = Histogram("embedder_forward_batch_size", "images per forward pass (micro-batch size)",
                                    buckets=self.SIZE_BUCKETS, registry=r)
        self.forward_seconds = Histogram("embedder_forward_duration_seconds", "time of one forward pass",
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.norm = Histogram("embedder_embedding_norm",
                              "L2 norm of returned embeddings: 1 for a healthy model, anything else is a fault",
                              buckets=(0.5, 0.9, 0.99, 0.999, 0.9999, 1.0001, 1.001, 1.01, 1.1, 2), registry=r)
        self.nonfinite = Counter("embedder_embedding_nonfinite", "embeddings with NaN or infinite values (refused)",
                                 registry=r)
        self.top1 = Histogram("embedder_similar_top1_score", "cosine similarity of each /similar query's nearest "
                              "gallery item (a drop means traffic unlike the training data)",
                              buckets=tuple(i / 10 for i in range(-10, 11)), registry=r)
        self.queue = Gauge("embedder_queue_images", "images waiting for a forward pass", registry=r)
        self.ready = Gauge("embedder_ready", "1 when a model is loaded and warmed up", registry=r)
        self.info = Gauge("embedder_model_info", "the model version being served (value 1)",
                          ["model_name", "model_version", "dataset_version"], registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)

    def render(self, holder: ModelHolder, batcher: MicroBatcher | None) -> bytes:
        from prometheus_client import generate_latest

        cur = holder.current
        self.ready.set(1 if cur else 0)
        self.info.clear()
        if cur:
            self.info.labels(cur.desired.model_name, cur.desired.model_version, cur.dataset_version).set(1)
        self.queue.set(batcher.queued_images if batcher else 0)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: count and time every request by route template (bounded label values) and status."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            labels = (route, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
