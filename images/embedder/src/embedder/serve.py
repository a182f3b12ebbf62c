"""Serving API: embeddings and similarity search from the model version pinned in a desired-state record.

The process reconciles to the record the way a Deployment's pods follow their template: a
background thread reads the record (``--state-uri``), and when it names a version other than the
one loaded it loads ``models:/<name>/<version>`` from MLflow with the version's ``/similar``
gallery, warms it up, and swaps it in. A version that fails to load leaves the old one serving and
is reported in ``/metadata``. On Kubernetes the record is replaced by the ``MODEL_NAME``/
``MODEL_VERSION`` environment variables of the pod template, and the process loads that version
once at start.

Routes (the OpenAPI schema at ``/openapi.json`` documents each with its errors):

- ``POST /embed``: one image or a batch, as ``multipart/form-data`` (field ``file``, or ``files``
  repeated) or JSON (``{"image": <base64>}`` or ``{"images": [<base64>, ...]}``); unit embeddings.
- ``POST /similar?k=5``: the same input; the ``k`` nearest training images of each, with labels.
- ``GET /healthz`` (the process runs), ``GET /readyz`` (a model is loaded and warmed up),
  ``GET /metadata`` (model, version, dataset version, run), ``GET /metrics`` (Prometheus).

Throughput: requests are preprocessed on a pool sized to the CPU budget and micro-batched
(:mod:`embedder.batching`) into one forward pass; torch's threads fit the container's CPU limit.
Bad input gets a 4xx JSON ``{"detail": ...}`` naming the problem; memory is bounded by the request
size limit, the batch limit and the bounded queue. On SIGTERM the server stops accepting
connections, finishes the requests in flight (``--shutdown-timeout``), then stops.

With ``--sample-uri`` the server keeps a random share (``--sample-rate``) of the embeddings it
serves and writes them per time window (``--window-seconds``) to storage, at most
``--max-per-window`` per window and process, for the drift monitor. Requests only append to a
bounded in-memory buffer; a background thread writes closed windows, so sampling never waits on
storage. Files are ``<sample uri>/<model>/v<version>/window=<start epoch s>/<host>-<pid>.npy``:
every replica writes its own, and the monitor reads them all.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedder import batching, images, model
from embedder import gallery as gallery_mod
from retrain_contract import storage

log = logging.getLogger("embedder.serve")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
RETRY_FAILED_AFTER_S = 30.0


@dataclass(frozen=True)
class Limits:
    """What one request may carry; everything past these gets a 413 before it costs memory."""

    max_image_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    max_batch_images: int = 64  # images per request
    max_request_bytes: int = 64 * 1024 * 1024  # the whole body (base64 JSON is 4/3 of the images)
    max_k: int = 100


@dataclass
class Desired:
    model_name: str
    model_version: str
    revision: int = 0


@dataclass
class Serving:
    desired: Desired
    loaded: model.LoadedModel
    dataset_version: str
    run_id: str
    gallery: gallery_mod.Gallery | None = None
    loaded_at: float = field(default_factory=time.time)


def read_desired(state_uri: str) -> Desired | None:
    try:
        doc = json.loads(storage.read_bytes(state_uri))
    except storage.StorageError:
        return None
    return Desired(doc["model_name"], str(doc["model_version"]), int(doc.get("revision", 0)))


class EmbeddingSampler:
    """A bounded random sample of served embeddings, written to storage per closed time window."""

    def __init__(self, uri: str, rate: float, window_s: float, max_per_window: int, seed: int | None = None):
        if not 0 <= rate <= 1:
            raise ValueError(f"--sample-rate must be between 0 and 1, got {rate}")
        if window_s <= 0 or max_per_window < 1:
            raise ValueError("--window-seconds must be positive and --max-per-window at least 1")
        self.uri, self.rate, self.window_s, self.max_per_window = uri.rstrip("/"), rate, window_s, max_per_window
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._buffers: dict[tuple[str, str, int], list[np.ndarray]] = {}
        self.dropped = 0  # sampled but over the per-window bound
        self.written: list[str] = []
        self._me = f"{socket.gethostname()}-{os.getpid()}"

    def window_of(self, t: float) -> int:
        return int(t // self.window_s * self.window_s)

    def offer(self, model_name: str, version: str, vector: torch.Tensor, now: float | None = None) -> None:
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return
        key = (model_name, str(version), self.window_of(time.time() if now is None else now))
        row = vector.detach().cpu().numpy().astype(np.float32, copy=True)
        with self._lock:
            buffer = self._buffers.setdefault(key, [])
            if len(buffer) < self.max_per_window:
                buffer.append(row)
            else:
                self.dropped += 1

    def flush(self, now: float | None = None, everything: bool = False) -> list[str]:
        """Write the windows that have closed (all of them with ``everything``, at shutdown)."""
        now = time.time() if now is None else now
        with self._lock:
            due = [k for k in self._buffers if everything or k[2] + self.window_s <= now]
            batches = {k: self._buffers.pop(k) for k in due}
        written = []
        for (name, version, start), rows in batches.items():
            buffer = io.BytesIO()
            np.save(buffer, np.stack(rows))
            uri = storage.join(self.uri, name, f"v{version}", f"window={start}", f"{self._me}.npy")
            try:
                storage.write_bytes(uri, buffer.getvalue())
                written.append(uri)
            except Exception:  # a storage outage loses this window's sample, never a request
                log.exception("could not write the embedding sample %s", uri)
        self.written.extend(written)
        return written

    def run_forever(self, stop: threading.Event) -> None:
        interval = min(5.0, self.window_s / 4)
        while not stop.wait(interval):
            self.flush()
        self.flush(everything=True)


class ModelHolder:
    """The model being served and the reconciliation toward the desired version."""

    def __init__(self, state_uri: str | None = None, fixed: Desired | None = None, warmup_batch: int = 1):
        self.state_uri = state_uri
        self.fixed = fixed
        self.warmup_batch = warmup_batch
        self.current: Serving | None = None
        self.desired: Desired | None = fixed
        self.last_error: str | None = None
        self._failed: tuple[str, float] | None = None  # (version, when)
        self._lock = threading.Lock()

    def reconcile_once(self) -> None:
        desired = self.fixed or (read_desired(self.state_uri) if self.state_uri else None)
        self.desired = desired
        if desired is None:
            return
        cur = self.current
        if cur and (cur.desired.model_name, cur.desired.model_version) == (desired.model_name, desired.model_version):
            return
        if self._failed and self._failed[0] == desired.model_version and time.time() - self._failed[1] < RETRY_FAILED_AFTER_S:
            return
        uri = f"models:/{desired.model_name}/{desired.model_version}"
        log.info("loading %s (revision %d)", uri, desired.revision)
        try:
            serving = self._load(desired, uri)
        except Exception as exc:  # any load failure must leave the old model serving
            self.last_error = f"loading {uri} failed: {type(exc).__name__}: {exc}"
            self._failed = (desired.model_version, time.time())
            log.error("%s; still serving %s", self.last_error, cur.desired.model_version if cur else "nothing")
            return
        with self._lock:
            self.current = serving
        self.last_error, self._failed = None, None
        log.info("serving %s (dataset %s, gallery %s)", uri, serving.dataset_version,
                 f"{len(serving.gallery)} items" if serving.gallery else "none")

    def _load(self, desired: Desired, uri: str) -> Serving:
        from mlflow import MlflowClient

        client = MlflowClient()
        loaded = model.load(uri)
        mv = client.get_model_version(desired.model_name, desired.model_version)
        warm_up(loaded, self.warmup_batch)
        found = gallery_mod.download(client, mv.run_id) if mv.run_id else None
        if found is not None and found.dim != loaded.embedding_dim:
            raise ValueError(f"the gallery of run {mv.run_id} is {found.dim}-d, the model {loaded.embedding_dim}-d")
        dataset_version = mv.tags.get("dataset_version", loaded.metadata.get("dataset_version", ""))
        return Serving(desired, loaded, dataset_version, mv.run_id or "", found)

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile failed")
            stop.wait(interval)


def warm_up(loaded: model.LoadedModel, batch: int) -> None:
    """Run the batch sizes serving will see first, so no request pays for first-call set-up; check the shape."""
    size = loaded.image_size
    for n in sorted({1, batch}):
        out = loaded.embed(torch.zeros(n, 3, size, size))
        if out.shape != (n, loaded.embedding_dim):
            raise ValueError(f"warm-up produced shape {tuple(out.shape)}, expected ({n}, {loaded.embedding_dim})")


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong with the request, and what to send instead")


class EmbedResponse(BaseModel):
    model_name: str
    model_version: str
    dim: int = Field(description="embedding dimension of the model version")
    count: int = Field(description="number of images embedded")
    embedding: list[float] | None = Field(None, description="the unit embedding (one image: field 'file' or 'image')")
    embeddings: list[list[float]] | None = Field(
        None, description="one unit embedding per image, in request order (a batch: field 'files' or 'images')")


class Neighbor(BaseModel):
    item: str = Field(description="the gallery item (path of the training image in the data set)")
    label: str
    score: float = Field(description="cosine similarity to the query, in [-1, 1]")


class Match(BaseModel):
    label: str = Field(description="the label with the largest summed similarity among the neighbours")
    neighbors: list[Neighbor] = Field(description="the k nearest gallery items, nearest first")


class SimilarResponse(BaseModel):
    model_name: str
    model_version: str
    k: int
    gallery_size: int
    gallery_dataset_version: str
    results: list[Match] = Field(description="one result per image, in request order")


def image_input(limits: Limits) -> dict[str, Any]:
    """The OpenAPI request body of /embed and /similar (read by hand: two content types, bounded reads)."""
    n = limits.max_batch_images
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary", "description": "one image (PNG, JPEG, ...)"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                      "maxItems": n, "description": f"a batch of 1 to {n} images"},
        }}},
        "application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
            "image": {"type": "string", "contentEncoding": "base64", "description": "one base64-encoded image"},
            "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}, "minItems": 1,
                       "maxItems": n, "description": f"a batch of 1 to {n} base64-encoded images"},
        }}},
    }}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "not an image, truncated or empty image, invalid base64 or JSON, empty batch, malformed multipart",
        413: "an image over the byte or pixel limit, a batch over the image limit, a body over the size limit",
        415: "a content type other than multipart/form-data or application/json, or a part that is not an image",
        422: "a missing or misnamed field, a wrong type, a query parameter out of range",
        503: "no model loaded yet, no gallery for this model version, or the queue is full (see Retry-After)",
    }
    return {code: {"model": ErrorBody, "description": what[code]} for code in codes}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 413, declared (Content-Length) or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": self.message(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.message(seen))
            return message

        await self.app(scope, limited, send)

    def message(self, size: int) -> str:
        return (f"the request body ({size} bytes or more) is over the limit of {self.limit} bytes: "
                f"send fewer or smaller images per request")


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

    def render(self, holder: ModelHolder, batcher: batching.MicroBatcher | None) -> bytes:
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


def media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


async def read_images(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    """The request's images as (name, bytes), and whether they came as a batch; 4xx for anything else."""
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        return await _read_multipart(request, limits)
    if kind == "application/json":
        return await _read_json(request, limits)
    raise HTTPException(415, "send the image as multipart/form-data in the field 'file' ('files' for a batch), "
                             "or as application/json {\"image\": <base64>} ({\"images\": [...]} for a batch); "
                             f"got content type {kind or 'none'}")


def _too_many(n: int | str, limits: Limits) -> HTTPException:
    return HTTPException(413, f"batch too large: {n} images, the limit is {limits.max_batch_images} per request; "
                              "split it into several requests")


async def _read_multipart(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    try:
        form = await request.form(max_files=limits.max_batch_images + 1, max_fields=limits.max_batch_images + 16)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise _too_many(f"more than {limits.max_batch_images}", limits) from None
        raise HTTPException(400, f"malformed multipart/form-data body: {exc.detail}") from None
    try:
        singles, many = form.getlist("file"), form.getlist("files")
        if singles and many:
            raise HTTPException(422, "send one image in the field 'file' or a batch in 'files', not both")
        if len(singles) > 1:
            raise HTTPException(422, f"the field 'file' takes one image, got {len(singles)}: send a batch in 'files'")
        field_name, parts = ("file", singles) if singles else ("files", many)
        if not parts:
            sent = ", ".join(sorted(set(form.keys()))) or "none"
            raise HTTPException(422, f"missing form field(s): file (one image) or files (a batch); got: {sent}")
        if len(parts) > limits.max_batch_images:
            raise _too_many(len(parts), limits)
        items = []
        for i, part in enumerate(parts):
            label = field_name if field_name == "file" else f"files[{i}]"
            if not isinstance(part, UploadFile):
                raise HTTPException(422, f"form field {label} is text, not a file: upload the image as a file")
            name = part.filename or label
            kind = media_type(part.content_type) or "application/octet-stream"
            if not (kind.startswith("image/") or kind == "application/octet-stream"):
                raise HTTPException(415, f"{name} was sent as {kind}; send an image file (image/png, image/jpeg, ...)")
            data = await part.read(limits.max_image_bytes + 1)  # never more than the limit in memory
            if len(data) > limits.max_image_bytes:
                raise HTTPException(413, f"{name} is larger than the limit of {limits.max_image_bytes} bytes")
            items.append((name, data))
        return items, field_name == "files"
    finally:
        await form.close()


async def _read_json(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    body = await request.body()  # bounded by BodyLimit
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    shape = "send {\"image\": <base64>} for one image or {\"images\": [<base64>, ...]} for a batch"
    if not isinstance(doc, dict):
        raise HTTPException(422, f"the JSON body must be an object: {shape}")
    unknown = sorted(set(doc) - {"image", "images"})
    if unknown:
        raise HTTPException(422, f"unknown field(s) {', '.join(map(repr, unknown))}: {shape}")
    if ("image" in doc) == ("images" in doc):
        raise HTTPException(422, f"exactly one of 'image' and 'images' is needed: {shape}")
    batch = "images" in doc
    values = doc["images"] if batch else [doc["image"]]
    if not isinstance(values, list):
        raise HTTPException(422, f"'images' must be a list of base64 strings, got {type(values).__name__}")
    if not values:
        raise HTTPException(400, "empty batch: 'images' holds no images; send at least one")
    if len(values) > limits.max_batch_images:
        raise _too_many(len(values), limits)
    max_chars = 4 * (limits.max_image_bytes // 3 + 1)
    items = []
    for i, value in enumerate(values):
        name = f"images[{i}]" if batch else "image"
        if not isinstance(value, str):
            raise HTTPException(422, f"{name} must be a base64 string, got {type(value).__name__}")
        if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
            value = value.split(",", 1)[1]
        if len(value) > max_chars:
            raise HTTPException(413, f"{name} is larger than the limit of {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(400, f"{name} is not valid base64: {exc}") from None
        if len(data) > limits.max_image_bytes:
            raise HTTPException(413, f"{name} is larger than the limit of {limits.max_image_bytes} bytes")
        items.append((name, data))
    return items, batch


def preprocess(items: list[tuple[str, bytes]], image_size: int, max_pixels: int) -> torch.Tensor:
    """Decode and transform every image, or raise the 4xx naming the first bad one."""
    transform = images.eval_transform(image_size)
    tensors = []
    for name, data in items:
        if not data:
            raise HTTPException(400, f"{name} is empty (0 bytes): send an image file")
        try:
            image, _ = images.decode(data, max_pixels=max_pixels)
        except images.ImageRejected as exc:
            raise HTTPException(413 if "decompression bomb" in str(exc) else 400, f"{name}: {exc}") from None
        tensors.append(transform(image))
    return torch.stack(tensors)


def create_app(holder: ModelHolder, poll_interval: float = 1.0, sampler: EmbeddingSampler | None = None,
               limits: Limits | None = None, micro_batching: bool = True,
               max_batch: int = 32, batch_wait_s: float = 0.005, max_queued: int = 256,
               workers: int | None = None) -> FastAPI:
    """The serving app around ``holder``; ``micro_batching=False`` runs each request's forward pass on its own."""
    limits = limits or Limits()
    metrics = Metrics()
    workers = workers or model.cpu_budget()
    state: dict[str, Any] = {}
    stop = threading.Event()

    async def lifespan(app: FastAPI):
        state["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
        if micro_batching:
            state["batcher"] = batching.MicroBatcher(max_batch, batch_wait_s, max_queued, metrics.observe_batch)
            state["batcher"].start()
        thread = threading.Thread(target=holder.run_forever, args=(poll_interval, stop), daemon=True, name="reconcile")
        thread.start()
        writer = None
        if sampler:
            writer = threading.Thread(target=sampler.run_forever, args=(stop,), daemon=True, name="sample-writer")
            writer.start()
        yield
        # Shutdown: uvicorn has stopped accepting and finished the requests in flight (graceful shutdown).
        stop.set()
        if micro_batching:
            state["batcher"].close(timeout=30)
        state["pool"].shutdown(wait=True)
        if writer:
            writer.join(30)
        log.info("stopped")

    app = FastAPI(title="embedder", summary="Image embeddings and similarity search", version="1",
                  description=__doc__, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A request of the wrong shape gets a 422 that says what was wrong, not only a schema dump."""
        errors = exc.errors()
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return JSONResponse({"detail": detail or "invalid request", "errors": jsonable_encoder(errors)},
                            status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(batching.Overloaded)
    async def overloaded(request: Request, exc: batching.Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"overloaded, retry shortly: {exc}"}, status_code=503,
                            headers={"Retry-After": "1"})

    def current() -> Serving:
        cur = holder.current
        if cur is None:
            raise HTTPException(503, holder.last_error or "no model loaded yet", headers={"Retry-After": "5"})
        return cur

    async def embed_images(request: Request, cur: Serving, route: str) -> tuple[torch.Tensor, bool]:
        items, batch = await read_images(request, limits)
        metrics.request_images.labels(route).observe(len(items))
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(state["pool"], preprocess, items, cur.loaded.image_size,
                                             limits.max_pixels)
        if micro_batching:
            vectors = await state["batcher"].embed(cur.loaded, tensors)
        else:
            started = time.perf_counter()
            vectors = await loop.run_in_executor(state["pool"], cur.loaded.embed, tensors)
            metrics.observe_batch(len(tensors), time.perf_counter() - started)
        norms = vectors.norm(dim=1)
        for value in norms.tolist():
            metrics.norm.observe(value)
        if not torch.isfinite(vectors).all():
            metrics.nonfinite.inc()
            raise HTTPException(500, f"model version {cur.desired.model_version} produced a non-finite embedding")
        if sampler:
            for vector in vectors:
                sampler.offer(cur.desired.model_name, cur.desired.model_version, vector)
        return vectors, batch

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model version is loaded and warmed up",
             responses={503: {"description": "not ready: loading, or the pinned version failed to load"}})
    def readyz():
        cur = holder.current
        if cur is None:
            reason = holder.last_error or ("no model version pinned yet" if holder.desired is None else "loading")
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return {"status": "ready", "model_version": cur.desired.model_version}

    @app.get("/metadata", summary="The model being served: name, version, dataset version, run, gallery")
    def metadata() -> dict[str, Any]:
        cur, desired = holder.current, holder.desired
        return {
            "model_name": cur.desired.model_name if cur else (desired.model_name if desired else None),
            "model_version": cur.desired.model_version if cur else None,
            "revision": cur.desired.revision if cur else None,
            "dataset_version": cur.dataset_version if cur else None,
            "run_id": cur.run_id if cur else None,
            "embedding_dim": cur.loaded.embedding_dim if cur else None,
            "image_size": cur.loaded.image_size if cur else None,
            "gallery_size": len(cur.gallery) if cur and cur.gallery else 0,
            "loaded_at": cur.loaded_at if cur else None,
            "desired_version": desired.model_version if desired else None,
            "ready": cur is not None,
            "last_error": holder.last_error,
            "limits": limits.__dict__,
            "micro_batching": {"enabled": micro_batching, "max_batch": max_batch, "max_wait_s": batch_wait_s},
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(holder, state.get("batcher")), media_type=CONTENT_TYPE_LATEST)

    @app.post("/embed", summary="Unit embeddings of one image or a batch", response_model=EmbedResponse,
              openapi_extra=image_input(limits), responses=error_responses(400, 413, 415, 422, 503))
    async def embed(request: Request) -> Response:
        cur = current()
        vectors, batch = await embed_images(request, cur, "/embed")
        body: dict[str, Any] = {"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                                "dim": int(vectors.shape[1]), "count": int(vectors.shape[0])}
        body["embeddings" if batch else "embedding"] = vectors.tolist() if batch else vectors[0].tolist()
        return JSONResponse(body)

    @app.post("/similar", summary="The k nearest training images of each image, with their labels",
              response_model=SimilarResponse, openapi_extra=image_input(limits),
              responses=error_responses(400, 413, 415, 422, 503))
    async def similar(request: Request, k: int = Query(5, ge=1, le=limits.max_k, description="neighbours per image")
                      ) -> Response:
        cur = current()
        found = cur.gallery
        if found is None:
            raise HTTPException(503, f"model version {cur.desired.model_version} has no gallery (evaluate logs one "
                                     "with each model); /embed still works")
        vectors, _ = await embed_images(request, cur, "/similar")
        scores, indices = found.search(vectors, k)
        for value in scores[:, 0].tolist():
            metrics.top1.observe(value)
        results = [{"label": label, "neighbors": [
            {"item": found.items[i], "label": found.labels[i], "score": round(s, 6)}
            for s, i in zip(row_s, row_i, strict=True)]}
            for label, row_s, row_i in zip(found.vote(scores, indices), scores.tolist(), indices.tolist(), strict=True)]
        return JSONResponse({"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                             "k": int(indices.shape[1]), "gallery_size": len(found),
                             "gallery_dataset_version": found.dataset_version, "results": results})

    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       routes={r.path for r in app.routes if not r.path.startswith(("/docs", "/redoc"))})
    app.state.metrics = metrics
    return app


def configure_threads(threads: int) -> int:
    """Fit torch to the CPU budget: ``threads`` intra-op threads (the container's CPU limit), one inter-op."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set (or parallel work already ran) in this process
        torch.set_num_interop_threads(1)
    return threads


def _env(name: str, kind: type, default: str):
    """A flag's default from the environment; a value of the wrong type stops with a message naming it."""
    value = os.environ.get(name, default)
    try:
        return kind(value)
    except ValueError:
        print(f"environment variable {name}={value!r} is not a valid {kind.__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--state-uri", default=os.environ.get("SERVING_STATE_URI", ""),
                        help="desired-state record to follow (local mode)")
    parser.add_argument("--model-name", default=os.environ.get("MODEL_NAME", ""), help="fixed model (Kubernetes mode)")
    parser.add_argument("--model-version", default=os.environ.get("MODEL_VERSION", ""), help="fixed version (Kubernetes mode)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between reads of the record")
    parser.add_argument("--threads", type=int, default=_env("SERVING_THREADS", int, "0"),
                        help="torch intra-op threads and preprocessing workers (0: the CPU budget, i.e. the "
                             "container's CPU limit)")
    group = parser.add_argument_group("throughput")
    group.add_argument("--max-batch", type=int, default=_env("SERVING_MAX_BATCH", int, "32"),
                       help="images per forward pass (micro-batch bound)")
    group.add_argument("--batch-wait-ms", type=float, default=_env("SERVING_BATCH_WAIT_MS", float, "5"),
                       help="longest a request waits for others to share its forward pass")
    group.add_argument("--max-queued", type=int, default=_env("SERVING_MAX_QUEUED", int, "256"),
                       help="images waiting for a forward pass before requests get 503 + Retry-After")
    group.add_argument("--no-micro-batching", action="store_true", help="one forward pass per request")
    group.add_argument("--limit-concurrency", type=int, default=_env("SERVING_LIMIT_CONCURRENCY", int, "128"),
                       help="connections served at once; more get 503 (with the limits below, bounds memory)")
    group.add_argument("--shutdown-timeout", type=float, default=_env("SERVING_SHUTDOWN_TIMEOUT_S", float, "25"),
                       help="on SIGTERM, seconds to finish the requests in flight (keep below the pod's grace period)")
    group = parser.add_argument_group("request limits (413 past them)")
    group.add_argument("--max-image-bytes", type=int, default=MAX_UPLOAD_BYTES, help="bytes per image")
    group.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                       help="pixels per image, checked before decoding (decompression bombs)")
    group.add_argument("--max-batch-images", type=int, default=Limits.max_batch_images, help="images per request")
    group.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes, help="bytes per request body")
    group = parser.add_argument_group("embedding sample for the drift monitor")
    group.add_argument("--sample-uri", default=os.environ.get("SAMPLE_URI", ""),
                       help="storage prefix for sampled embeddings (file:// or s3://); empty: no sampling")
    group.add_argument("--sample-rate", type=float, default=_env("SAMPLE_RATE", float, "0.1"),
                       help="share of served embeddings kept")
    group.add_argument("--window-seconds", type=float, default=_env("SAMPLE_WINDOW_S", float, "3600"),
                       help="length of a sample window")
    group.add_argument("--max-per-window", type=int, default=_env("SAMPLE_MAX_PER_WINDOW", int, "2000"),
                       help="embeddings kept per window and process (bounds memory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if bool(args.model_name) != bool(args.model_version) or not (args.state_uri or args.model_name):
        print("give either --state-uri, or both --model-name and --model-version", file=sys.stderr)
        return 2
    try:
        limits = Limits(args.max_image_bytes, args.max_pixels, args.max_batch_images, args.max_request_bytes)
        if min(limits.max_image_bytes, limits.max_pixels, limits.max_batch_images, limits.max_request_bytes) < 1:
            raise ValueError("--max-image-bytes, --max-pixels, --max-batch-images and --max-request-bytes must be positive")
        sampler = EmbeddingSampler(args.sample_uri, args.sample_rate, args.window_seconds, args.max_per_window) \
            if args.sample_uri else None
        threads = configure_threads(args.threads or model.cpu_budget())
        fixed = Desired(args.model_name, args.model_version) if args.model_name else None
        holder = ModelHolder(state_uri=args.state_uri or None, fixed=fixed,
                             warmup_batch=1 if args.no_micro_batching else args.max_batch)
        app = create_app(holder, args.poll_interval, sampler, limits=limits, micro_batching=not args.no_micro_batching,
                         max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000, max_queued=args.max_queued,
                         workers=threads)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    log.info("torch threads %d (CPU budget %d), micro-batching %s", threads, model.cpu_budget(),
             "off" if args.no_micro_batching else f"up to {args.max_batch} images, {args.batch_wait_ms} ms wait")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.limit_concurrency,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
