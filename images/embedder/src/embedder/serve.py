"""Serving API: embeddings from the model version pinned in a desired-state record.

The process reconciles to the record the way a Deployment's pods follow their template: a
background thread reads the record (``--state-uri``), and when it names a version other than the
one loaded it loads ``models:/<name>/<version>`` from MLflow, warms it up, and swaps it in. A
version that fails to load leaves the old one serving and is reported in ``/metadata``.
On Kubernetes the record is replaced by the ``MODEL_NAME``/``MODEL_VERSION`` environment
variables of the pod template, and the process loads that version once at start.

Routes: ``POST /embed`` (image upload), ``GET /healthz``, ``GET /readyz``, ``GET /metadata``.

With ``--sample-uri`` the server keeps a random share (``--sample-rate``) of the embeddings it
serves and writes them per time window (``--window-seconds``) to storage, at most
``--max-per-window`` per window and process, for the drift monitor. Requests only append to a
bounded in-memory buffer; a background thread writes closed windows, so sampling never waits on
storage. Files are ``<sample uri>/<model>/v<version>/window=<start epoch s>/<host>-<pid>.npy``:
every replica writes its own, and the monitor reads them all.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from embedder import images, model, storage

log = logging.getLogger("embedder.serve")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
RETRY_FAILED_AFTER_S = 30.0


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

    def __init__(self, state_uri: str | None = None, fixed: Desired | None = None):
        self.state_uri = state_uri
        self.fixed = fixed
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
        log.info("serving %s (dataset %s)", uri, serving.dataset_version)

    @staticmethod
    def _load(desired: Desired, uri: str) -> Serving:
        from mlflow import MlflowClient

        loaded = model.load(uri)
        mv = MlflowClient().get_model_version(desired.model_name, desired.model_version)
        size = loaded.image_size
        out = loaded.embed(torch.zeros(1, 3, size, size))  # warm-up, and a check that it runs at all
        if out.shape != (1, loaded.embedding_dim):
            raise ValueError(f"warm-up produced shape {tuple(out.shape)}, expected (1, {loaded.embedding_dim})")
        dataset_version = mv.tags.get("dataset_version", loaded.metadata.get("dataset_version", ""))
        return Serving(desired, loaded, dataset_version, mv.run_id or "")

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile failed")
            stop.wait(interval)


def create_app(holder: ModelHolder, poll_interval: float = 1.0, sampler: EmbeddingSampler | None = None,
               max_pixels: int = images.DEFAULT_MAX_PIXELS) -> FastAPI:
    stop = threading.Event()

    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=holder.run_forever, args=(poll_interval, stop), daemon=True, name="reconcile")
        thread.start()
        writer = None
        if sampler:
            writer = threading.Thread(target=sampler.run_forever, args=(stop,), daemon=True, name="sample-writer")
            writer.start()
        yield
        stop.set()
        if writer:
            writer.join(30)

    app = FastAPI(title="embedder", summary="Image embeddings for similarity search", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A request of the wrong shape gets a 4xx that says what to send, not a schema dump."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.url.path == "/embed" and kind != "multipart/form-data":
            return JSONResponse({"detail": f"send the image as multipart/form-data in the field 'file' "
                                           f"(got content type {kind or 'none'})"}, status_code=415)
        missing = [".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors() if e.get("type") == "missing"]
        detail = f"missing form field(s): {', '.join(missing)}" if missing else "invalid request"
        return JSONResponse({"detail": detail, "errors": jsonable_encoder(exc.errors())}, status_code=422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        cur = holder.current
        if cur is None:
            reason = holder.last_error or ("no model version pinned yet" if holder.desired is None else "loading")
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return {"status": "ready", "model_version": cur.desired.model_version}

    @app.get("/metadata")
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
            "loaded_at": cur.loaded_at if cur else None,
            "desired_version": desired.model_version if desired else None,
            "ready": cur is not None,
            "last_error": holder.last_error,
        }

    @app.post("/embed")
    def embed(file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, ...)")]) -> dict[str, Any]:
        cur = holder.current
        if cur is None:
            raise HTTPException(503, "no model loaded yet")
        name = file.filename or "upload"
        kind = (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise HTTPException(415, f"{name} was sent as {kind}; send an image file (image/png, image/jpeg, ...)")
        payload = file.file.read(MAX_UPLOAD_BYTES + 1)  # never more than the limit in memory
        if len(payload) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{name} is larger than the limit of {MAX_UPLOAD_BYTES} bytes")
        if not payload:
            raise HTTPException(400, f"{name} is empty (0 bytes): send an image file in the 'file' form field")
        try:
            image, _ = images.decode(payload, max_pixels=max_pixels)
        except images.ImageRejected as exc:
            too_big = "decompression bomb" in str(exc)
            raise HTTPException(413 if too_big else 400, f"{name}: {exc}") from None
        batch = images.eval_transform(cur.loaded.image_size)(image).unsqueeze(0)
        vector = cur.loaded.embed(batch)[0]
        if sampler:
            sampler.offer(cur.desired.model_name, cur.desired.model_version, vector)
        return {"model_name": cur.desired.model_name, "model_version": cur.desired.model_version,
                "dim": int(vector.shape[0]), "embedding": vector.tolist()}

    return app


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--state-uri", default=os.environ.get("SERVING_STATE_URI", ""),
                        help="desired-state record to follow (local mode)")
    parser.add_argument("--model-name", default=os.environ.get("MODEL_NAME", ""), help="fixed model (Kubernetes mode)")
    parser.add_argument("--model-version", default=os.environ.get("MODEL_VERSION", ""), help="fixed version (Kubernetes mode)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between reads of the record")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPU budget)")
    parser.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="larger images are refused with 413 before they are decoded (decompression bombs)")
    group = parser.add_argument_group("embedding sample for the drift monitor")
    group.add_argument("--sample-uri", default=os.environ.get("SAMPLE_URI", ""),
                       help="storage prefix for sampled embeddings (file:// or s3://); empty: no sampling")
    group.add_argument("--sample-rate", type=float, default=float(os.environ.get("SAMPLE_RATE", "0.1")),
                       help="share of served embeddings kept")
    group.add_argument("--window-seconds", type=float, default=float(os.environ.get("SAMPLE_WINDOW_S", "3600")),
                       help="length of a sample window")
    group.add_argument("--max-per-window", type=int, default=int(os.environ.get("SAMPLE_MAX_PER_WINDOW", "2000")),
                       help="embeddings kept per window and process (bounds memory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if bool(args.model_name) != bool(args.model_version) or not (args.state_uri or args.model_name):
        print("give either --state-uri, or both --model-name and --model-version", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or model.cpu_budget())
    fixed = Desired(args.model_name, args.model_version) if args.model_name else None
    holder = ModelHolder(state_uri=args.state_uri or None, fixed=fixed)
    try:
        sampler = EmbeddingSampler(args.sample_uri, args.sample_rate, args.window_seconds, args.max_per_window) \
            if args.sample_uri else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    uvicorn.run(create_app(holder, args.poll_interval, sampler, args.max_pixels), host=args.host, port=args.port,
                log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
