"""The command, ``python -m embedder.serving``: flags (each with an environment default for the pod),
the app built from them, and uvicorn, which on SIGTERM stops accepting connections, finishes the
requests in flight (``--shutdown-timeout``) and then runs the app's shutdown.

Exit status 2 for a bad invocation: a malformed environment default (the message names the
variable), both ``--state-uri`` and a pinned version, a version without a model name, or a limit out of
range. With no version pinned at all (a fresh install), the server starts and stays not ready, saying why.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from embedder import images
from embedder.model import cpu_budget
from embedder.serving.app import DESCRIPTION, create_app
from embedder.serving.inputs import MAX_UPLOAD_BYTES, Limits
from embedder.serving.mirror import Mirror
from embedder.serving.model import Desired, ModelHolder, configure_threads
from embedder.serving.sampling import EmbeddingSampler
from retrain_contract.serving import MIRROR_RATE_ENV, MIRROR_URL_ENV, MODEL_NAME_ENV, MODEL_VERSION_ENV

log = logging.getLogger(__name__)


def _env(name: str, kind: type, default: str):
    """A flag's default from the environment; a value of the wrong type stops with a message naming it."""
    value = os.environ.get(name, default)
    try:
        return kind(value)
    except ValueError:
        print(f"environment variable {name}={value!r} is not a valid {kind.__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def _env_option(group, flag: str, env: str, kind: type, default: str, help: str) -> None:
    """A typed flag whose default comes from the environment variable ``env`` (``default`` without it)."""
    group.add_argument(flag, type=kind, default=_env(env, kind, default), help=help)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedder.serving", description=DESCRIPTION.splitlines()[0])
    parser.add_argument("--state-uri", default=os.environ.get("SERVING_STATE_URI", ""),
                        help="desired-state record to follow (local mode)")
    parser.add_argument("--model-name", default=os.environ.get(MODEL_NAME_ENV, ""), help="fixed model (Kubernetes mode)")
    parser.add_argument("--model-version", default=os.environ.get(MODEL_VERSION_ENV, ""),
                        help="fixed version (Kubernetes mode); without one the server waits, not ready, saying why")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between reads of the record")
    parser.add_argument("--docs", action="store_true", default=os.environ.get("SERVING_DOCS", "") == "true",
                        help="serve the interactive API pages /docs and /redoc (SERVING_DOCS=true; off by default)")
    _env_option(parser, "--threads", "SERVING_THREADS", int, "0", "torch intra-op threads and preprocessing workers "
                "(0: the CPU budget, i.e. the container's CPU limit)")
    group = parser.add_argument_group("throughput")
    _env_option(group, "--max-batch", "SERVING_MAX_BATCH", int, "32", "images per forward pass (micro-batch bound)")
    _env_option(group, "--batch-wait-ms", "SERVING_BATCH_WAIT_MS", float, "5",
                "longest a request waits for others to share its forward pass")
    _env_option(group, "--max-queued", "SERVING_MAX_QUEUED", int, "256",
                "images waiting for a forward pass before requests get 503 + Retry-After")
    group.add_argument("--no-micro-batching", action="store_true", help="one forward pass per request")
    _env_option(group, "--limit-concurrency", "SERVING_LIMIT_CONCURRENCY", int, "128",
                "connections served at once; more get 503 (with the limits below, bounds memory)")
    _env_option(group, "--shutdown-timeout", "SERVING_SHUTDOWN_TIMEOUT_S", float, "25",
                "on SIGTERM, seconds to finish the requests in flight (keep below the pod's grace period)")
    group = parser.add_argument_group("request limits (413 past them)")
    group.add_argument("--max-image-bytes", type=int, default=MAX_UPLOAD_BYTES, help="bytes per image")
    group.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                       help="pixels per image, checked before decoding (decompression bombs)")
    group.add_argument("--max-batch-images", type=int, default=Limits.max_batch_images, help="images per request")
    group.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes, help="bytes per request body")
    group = parser.add_argument_group("mirrored requests for a preview (see the module's description)")
    _env_option(group, "--mirror-rate", MIRROR_RATE_ENV, float, "0.1",
                "share of answered requests mirrored to the preview while there is one (0 to 1)")
    group.add_argument("--mirror-url", default=os.environ.get(MIRROR_URL_ENV, ""),
                       help="where a preview of another process takes mirrored requests (Kubernetes: the preview "
                            "Service); local mode mirrors to the preview in this process")
    group = parser.add_argument_group("embedding sample for the drift monitor")
    group.add_argument("--sample-uri", default=os.environ.get("SAMPLE_URI", ""),
                       help="storage prefix for sampled embeddings (file:// or s3://); empty: no sampling")
    _env_option(group, "--sample-rate", "SAMPLE_RATE", float, "0.1", "share of served embeddings kept")
    _env_option(group, "--window-seconds", "SAMPLE_WINDOW_S", float, "3600", "length of a sample window")
    _env_option(group, "--max-per-window", "SAMPLE_MAX_PER_WINDOW", int, "2000",
                "embeddings kept per window and process (bounds memory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if args.state_uri and args.model_version:
        print("give either --state-uri (local mode) or --model-name and --model-version (a pinned version), "
              "not both", file=sys.stderr)
        return 2
    if bool(args.model_version) != bool(args.model_name) and args.model_version:
        print("--model-version needs --model-name (Kubernetes: MODEL_NAME and MODEL_VERSION, which the deploy step "
              "sets together)", file=sys.stderr)
        return 2
    if not args.state_uri and not args.model_version:
        log.warning("no model version pinned (neither --state-uri nor MODEL_NAME/MODEL_VERSION): serving nothing, "
                    "not ready, until the deploy step pins one")
    try:
        limits = Limits(args.max_image_bytes, args.max_pixels, args.max_batch_images, args.max_request_bytes)
        if min(limits.max_image_bytes, limits.max_pixels, limits.max_batch_images, limits.max_request_bytes) < 1:
            raise ValueError("--max-image-bytes, --max-pixels, --max-batch-images and --max-request-bytes must be positive")
        sampler = EmbeddingSampler(args.sample_uri, args.sample_rate, args.window_seconds, args.max_per_window) \
            if args.sample_uri else None
        threads = configure_threads(args.threads or cpu_budget())
        fixed = Desired(args.model_name, args.model_version) if args.model_version else None
        holder = ModelHolder(state_uri=args.state_uri or None, fixed=fixed,
                             warmup_batch=1 if args.no_micro_batching else args.max_batch)
        mirror = Mirror(args.mirror_rate, args.mirror_url) if args.mirror_rate else None
        app = create_app(holder, args.poll_interval, sampler, limits=limits, micro_batching=not args.no_micro_batching,
                         max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000, max_queued=args.max_queued,
                         workers=threads, mirror=mirror, docs=args.docs)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    log.info("torch threads %d (CPU budget %d), micro-batching %s", threads, cpu_budget(),
             "off" if args.no_micro_batching else f"up to {args.max_batch} images, {args.batch_wait_ms} ms wait")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.limit_concurrency,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
