"""The app factory: :func:`create_app` composes the model holder, the runtime, the metrics and the request
limits into the FastAPI app; the routes are the small functions below, which reach the app's
:class:`~embedder.serving.runtime.Runtime` through ``request.app.state.runtime``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from embedder.serving.batching import Overloaded
from embedder.serving.inputs import BodyLimit, BodyTooLarge, Limits
from embedder.serving.metrics import Metrics, MetricsMiddleware
from embedder.serving.model import ModelHolder
from embedder.serving.runtime import Runtime
from embedder.serving.sampling import EmbeddingSampler
from embedder.serving.schemas import EmbedResponse, SimilarResponse, error_responses, image_input

# The API's description in its OpenAPI schema (and, first line, the command's).
DESCRIPTION = """Serving API: embeddings and similarity search from the model version pinned in a desired-state record.

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
(:mod:`embedder.serving.batching`) into one forward pass; torch's threads fit the container's CPU limit.
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
IMAGE_ERRORS = (400, 413, 415, 422, 503)


def create_app(holder: ModelHolder, poll_interval: float = 1.0, sampler: EmbeddingSampler | None = None,
               limits: Limits | None = None, micro_batching: bool = True,
               max_batch: int = 32, batch_wait_s: float = 0.005, max_queued: int = 256,
               workers: int | None = None) -> FastAPI:
    """The serving app around ``holder``; ``micro_batching=False`` runs each request's forward pass on its own."""
    limits = limits or Limits()
    metrics = Metrics()
    app = FastAPI(title="embedder", summary="Image embeddings and similarity search", version="1",
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.runtime = Runtime(holder, metrics, limits, sampler, poll_interval, micro_batching, max_batch,
                                batch_wait_s, max_queued, workers)
    app.state.metrics = metrics
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(Overloaded, overloaded)

    app.get("/healthz", summary="Liveness: the process answers")(healthz)
    app.get("/readyz", summary="Readiness: a model version is loaded and warmed up",
            responses={503: {"description": "not ready: loading, or the pinned version failed to load"}})(readyz)
    app.get("/metadata", summary="The model being served: name, version, dataset version, run, gallery")(metadata)
    app.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})(prometheus)
    app.post("/embed", summary="Unit embeddings of one image or a batch", response_model=EmbedResponse,
             openapi_extra=image_input(limits), responses=error_responses(*IMAGE_ERRORS))(embed)
    app.post("/similar", summary="The k nearest training images of each image, with their labels",
             response_model=SimilarResponse, openapi_extra=image_input(limits),
             responses=error_responses(*IMAGE_ERRORS))(similar_route(limits.max_k))

    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       routes={r.path for r in app.routes if not r.path.startswith(("/docs", "/redoc"))})
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.runtime.start()
    yield
    app.state.runtime.stop()


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request of the wrong shape gets a 422 that says what was wrong, not only a schema dump."""
    errors = exc.errors()
    detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": detail or "invalid request", "errors": jsonable_encoder(errors)}, status_code=422)


async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=413)


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": f"overloaded, retry shortly: {exc}"}, status_code=503, headers={"Retry-After": "1"})


def healthz() -> dict[str, str]:
    return {"status": "ok"}


def readyz(request: Request):
    holder = runtime_of(request).holder
    cur = holder.current
    if cur is None:
        reason = holder.last_error or ("no model version pinned yet" if holder.desired is None else "loading")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    return {"status": "ready", "model_version": cur.desired.model_version}


def metadata(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    holder = runtime.holder
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
        "limits": runtime.limits.__dict__,
        "micro_batching": {"enabled": runtime.micro_batching, "max_batch": runtime.max_batch,
                           "max_wait_s": runtime.batch_wait_s},
    }


def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    runtime = runtime_of(request)
    return Response(runtime.metrics.render(runtime.holder, runtime.batcher), media_type=CONTENT_TYPE_LATEST)


async def embed(request: Request) -> Response:
    runtime = runtime_of(request)
    cur = runtime.current()
    vectors, batch = await runtime.embed(request, cur, "/embed")
    body: dict[str, Any] = {"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                            "dim": int(vectors.shape[1]), "count": int(vectors.shape[0])}
    body["embeddings" if batch else "embedding"] = vectors.tolist() if batch else vectors[0].tolist()
    return JSONResponse(body)


def similar_route(max_k: int):
    """The /similar route, its ``k`` bounded by the app's limit (a bound FastAPI reads from the signature)."""

    async def similar(request: Request, k: int = Query(5, ge=1, le=max_k, description="neighbours per image")
                      ) -> Response:
        return await find_similar(request, k)

    return similar


async def find_similar(request: Request, k: int) -> Response:
    runtime = runtime_of(request)
    cur = runtime.current()
    found = cur.gallery
    if found is None:
        raise HTTPException(503, f"model version {cur.desired.model_version} has no gallery (evaluate logs one "
                                 "with each model); /embed still works")
    vectors, _ = await runtime.embed(request, cur, "/similar")
    scores, indices = found.search(vectors, k)
    for value in scores[:, 0].tolist():
        runtime.metrics.top1.observe(value)
    results = [{"label": label, "neighbors": [
        {"item": found.items[i], "label": found.labels[i], "score": round(s, 6)}
        for s, i in zip(row_s, row_i, strict=True)]}
        for label, row_s, row_i in zip(found.vote(scores, indices), scores.tolist(), indices.tolist(), strict=True)]
    return JSONResponse({"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                         "k": int(indices.shape[1]), "gallery_size": len(found),
                         "gallery_dataset_version": found.dataset_version, "results": results})
