"""The app factory: :func:`create_app` composes the model holder, the runtime, the metrics and the request
limits into the FastAPI app; the routes are the small functions below, which reach the app's
:class:`~embedder.serving.runtime.Runtime` through ``request.app.state.runtime``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from embedder.serving.batching import Overloaded
from embedder.serving.inputs import BodyLimit, BodyTooLarge, Limits, read_images
from embedder.serving.metrics import Metrics, MetricsMiddleware
from embedder.serving.mirror import Mirror
from embedder.serving.model import ModelHolder, Serving
from embedder.serving.runtime import Runtime
from embedder.serving.sampling import EmbeddingSampler
from embedder.serving.schemas import EmbedResponse, SimilarResponse, error_responses, image_input
from retrain_contract.serving import MIRROR_HEADER, MIRROR_ROUTE, PREVIEW_PREFIX, REPLAY_HEADER, MirrorSource

# The API's description in its OpenAPI schema (and, first line, the command's).
DESCRIPTION = """Serving API: embeddings and similarity search from the model version pinned in a desired-state record.

The process reconciles to the record the way a Deployment's pods follow their template: a
background thread reads the record (``--state-uri``), and when it names a version other than the
one loaded it loads ``models:/<name>/<version>`` from MLflow with the version's ``/similar``
gallery, warms it up, and swaps it in. A version that fails to load leaves the old one serving and
is reported in ``/metadata``. On Kubernetes the record is replaced by the ``MODEL_NAME``/
``MODEL_VERSION`` environment variables of the pod template, and the process loads that version
once at start.

One version answers clients at a time. When the record names a preview, the process loads it beside the
active version; the preview answers no client, only the deploy step (under ``/preview``: ``readyz``,
``metadata``, ``embed``, ``similar``, ``mirror``, ``metrics``) and a sample of the active's requests,
which the active mirrors to it (``--mirror-rate``) and which it compares with the active's answers. When
the record switches to the preview, every request from then on is answered by it; the old version stays
warm until the record's ``warm_until``, so that a switch back is instant. On Kubernetes, where each
version has pods of its own, the active's pods mirror to ``--mirror-url`` (the preview Service), whose
pods take mirrored requests on ``POST /mirror``.

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
Pick = Callable[[Runtime], Serving]


def create_app(holder: ModelHolder, poll_interval: float = 1.0, sampler: EmbeddingSampler | None = None,
               limits: Limits | None = None, micro_batching: bool = True,
               max_batch: int = 32, batch_wait_s: float = 0.005, max_queued: int = 256,
               workers: int | None = None, mirror: Mirror | None = None, docs: bool = False) -> FastAPI:
    """The serving app around ``holder``; ``micro_batching=False`` runs each request's forward pass on its own.

    ``docs`` serves the interactive API pages (``/docs``, ``/redoc``): off unless asked for (local mode asks), as
    KServe's model server has it; the schema stays at ``/openapi.json``.
    """
    limits = limits or Limits()
    metrics = Metrics()
    app = FastAPI(title="embedder", summary="Image embeddings and similarity search", version="1",
                  description=DESCRIPTION, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None)
    app.state.runtime = Runtime(holder, metrics, limits, sampler, poll_interval, micro_batching, max_batch,
                                batch_wait_s, max_queued, workers, mirror)
    app.state.metrics = metrics
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(Overloaded, overloaded)

    app.get("/healthz", summary="Liveness: the process answers")(healthz)
    add_version_routes(app, "", Runtime.current, clients=True)
    add_version_routes(app, PREVIEW_PREFIX, Runtime.previewed, clients=False)

    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       routes={r.path for r in app.routes if not r.path.startswith(("/docs", "/redoc"))})
    return app


def add_version_routes(app: FastAPI, prefix: str, pick: Pick, clients: bool) -> None:
    """The routes of one version: the active's at the root (``clients``), the preview's under ``prefix``.

    Only the active's requests are sampled for the drift monitor and mirrored to a preview.
    """
    limits: Limits = app.state.runtime.limits
    role = "the active version" if clients else "the preview (local mode: answers no client)"
    app.get(f"{prefix}/readyz", summary=f"Readiness of {role}: loaded and warmed up",
            responses={503: {"description": "not ready: loading, or the pinned version failed to load"}},
            include_in_schema=clients)(readyz_route(pick))
    app.get(f"{prefix}/metadata", summary=f"The model of {role}: name, version, dataset version, run, gallery",
            include_in_schema=clients)(metadata_route(pick))
    app.get(f"{prefix}/metrics", summary="Prometheus metrics", response_class=Response, include_in_schema=clients,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})(prometheus)
    app.post(f"{prefix}/embed", summary=f"Unit embeddings of one image or a batch, by {role}",
             response_model=EmbedResponse, openapi_extra=image_input(limits), include_in_schema=clients,
             responses=error_responses(*IMAGE_ERRORS))(embed_route(pick, clients))
    app.post(f"{prefix}/similar", summary=f"The k nearest training images of each image, by {role}",
             response_model=SimilarResponse, openapi_extra=image_input(limits), include_in_schema=clients,
             responses=error_responses(*IMAGE_ERRORS))(similar_route(pick, clients, limits.max_k))
    app.post(f"{prefix}{MIRROR_ROUTE}", summary=f"Compare {role} with the version that mirrored this request",
             include_in_schema=False)(mirror_route(pick))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.runtime.start()
    yield
    if app.state.runtime.mirror is not None:
        await app.state.runtime.mirror.close()
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


def readyz_route(pick: Pick):
    def readyz(request: Request):
        try:
            cur = pick(runtime_of(request))
        except HTTPException as exc:
            return JSONResponse({"status": "not ready", "reason": exc.detail}, status_code=503)
        return {"status": "ready", "model_version": cur.desired.model_version}

    return readyz


def metadata_route(pick: Pick):
    def metadata(request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
        holder = runtime.holder
        preview = pick is Runtime.previewed
        cur = holder.preview if preview else holder.current
        desired = holder.desired_preview if preview else holder.desired
        return {
            "model_name": cur.desired.model_name if cur else (desired.model_name if desired else None),
            "model_version": cur.desired.model_version if cur else None,
            "revision": cur.desired.revision if cur and not preview else None,
            "dataset_version": cur.dataset_version if cur else None,
            "run_id": cur.run_id if cur else None,
            "embedding_dim": cur.loaded.embedding_dim if cur else None,
            "image_size": cur.loaded.image_size if cur else None,
            "gallery_size": len(cur.gallery) if cur and cur.gallery else 0,
            "loaded_at": cur.loaded_at if cur else None,
            "desired_version": desired.model_version if desired else None,
            "ready": cur is not None,
            "last_error": holder.preview_error if preview else holder.last_error,
            "role": "preview" if preview else "active",
            "preview_version": holder.preview.desired.model_version if holder.preview and not preview else None,
            "warm_version": holder.warm.desired.model_version if holder.warm and not preview else None,
            "limits": runtime.limits.__dict__,
            "micro_batching": {"enabled": runtime.micro_batching, "max_batch": runtime.max_batch,
                               "max_wait_s": runtime.batch_wait_s},
        }

    return metadata


def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    runtime = runtime_of(request)
    return Response(runtime.metrics.render(runtime.holder, runtime.batcher), media_type=CONTENT_TYPE_LATEST)


async def answer(request: Request, pick: Pick, clients: bool,
                 respond: Callable[[Runtime, Serving], Awaitable[dict[str, Any]]]) -> Response:
    """One image request answered by one version: a client's by the active version (admitted, so that no
    client gets the old version after another got the new one), the deploy step's by the preview."""
    runtime = runtime_of(request)
    if not clients:
        return JSONResponse(await respond(runtime, pick(runtime)))
    cur = await runtime.admit()
    try:
        body = await respond(runtime, cur)
    except BaseException:
        runtime.release(cur)
        raise
    return JSONResponse(body, background=BackgroundTask(runtime.release, cur))  # released once the response is sent


def embed_route(pick: Pick, clients: bool):
    async def embed(request: Request) -> Response:
        async def respond(runtime: Runtime, cur: Serving) -> dict[str, Any]:
            vectors, batch = await runtime.embed(request, cur, "/embed", clients=clients and not replayed(request))
            body: dict[str, Any] = {"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                                    "dim": int(vectors.shape[1]), "count": int(vectors.shape[0])}
            body["embeddings" if batch else "embedding"] = vectors.tolist() if batch else vectors[0].tolist()
            return body

        return await answer(request, pick, clients, respond)

    return embed


def similar_route(pick: Pick, clients: bool, max_k: int):
    """The /similar route, its ``k`` bounded by the app's limit (a bound FastAPI reads from the signature)."""

    async def similar(request: Request, k: int = Query(5, ge=1, le=max_k, description="neighbours per image")
                      ) -> Response:
        return await answer(request, pick, clients, lambda runtime, cur: find_similar(request, cur, k, clients))

    return similar


async def find_similar(request: Request, cur: Serving, k: int, clients: bool) -> dict[str, Any]:
    runtime = runtime_of(request)
    found = cur.gallery
    if found is None:
        raise HTTPException(503, f"model version {cur.desired.model_version} has no gallery (evaluate logs one "
                                 "with each model); /embed still works")
    vectors, _ = await runtime.embed(request, cur, "/similar", clients=clients and not replayed(request))
    scores, indices = found.search(vectors, k)
    for value in scores[:, 0].tolist():
        runtime.metrics.top1.observe(value)
    results = [{"label": label, "neighbors": [
        {"item": found.items[i], "label": found.labels[i], "score": round(s, 6)}
        for s, i in zip(row_s, row_i, strict=True)]}
        for label, row_s, row_i in zip(found.vote(scores, indices), scores.tolist(), indices.tolist(), strict=True)]
    return {"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
            "k": int(indices.shape[1]), "gallery_size": len(found), "gallery_dataset_version": found.dataset_version,
            "results": results}


def replayed(request: Request) -> bool:
    """The deploy step's replay of a held-out image: answered, but not sampled for drift nor mirrored."""
    return REPLAY_HEADER in request.headers


def mirror_route(pick: Pick):
    async def mirror(request: Request) -> Response:
        """A request another version answered and mirrored here: compare, count, answer with the comparison."""
        runtime = runtime_of(request)
        cur = pick(runtime)
        header = request.headers.get(MIRROR_HEADER)
        if not header:
            raise HTTPException(400, f"a mirrored request carries the source's answer in {MIRROR_HEADER}")
        try:
            source = MirrorSource.decode(header)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if source.is_from(cur.desired.pin):  # no preview beside it: it would compare with itself
            raise HTTPException(409, f"version {source.model_version} mirrored to itself: there is no preview")
        items, _ = await read_images(request, runtime.limits)
        result = await runtime.compare(cur, items, source)
        return JSONResponse({"model_version": cur.desired.model_version, "source_version": source.model_version,
                             **{k: v for k, v in result.items() if k != "bad"}, "bad": result.get("bad")})

    return mirror
