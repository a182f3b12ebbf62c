"""The deploy step's smoke test: the serving API checked the way a client sees it, through the Service."""

from __future__ import annotations

import logging
import math
import struct
import time
import zlib
from typing import Any

import requests

from retrain.rollout.targets import RolloutFailed

log = logging.getLogger(__name__)


def tiny_png(side: int = 32) -> bytes:
    """A valid grayscale PNG (a diagonal gradient) built with the standard library: the smoke test's image."""
    raw = b"".join(b"\x00" + bytes((x + y) * 255 // (2 * side) for x in range(side)) for y in range(side))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def smoke_test(url: str, model_name: str, version: str, expected_dim: int | None, max_latency_s: float) -> dict[str, Any]:
    """Check the serving API the way a client sees it (through the Service); raise RolloutFailed naming what failed.

    ``/readyz`` answers 200; ``/metadata`` reports ``model_name`` and ``version``; ``/embed`` of a small
    image returns an L2-normalised embedding of ``expected_dim`` floats within ``max_latency_s``.
    """
    def fail(what: str) -> RolloutFailed:
        return RolloutFailed(f"smoke test against {url} failed: {what}")

    try:
        ready = requests.get(f"{url}/readyz", timeout=10)
        if ready.status_code != 200:
            raise fail(f"/readyz answered {ready.status_code}: {ready.text[:200]}")
        meta = requests.get(f"{url}/metadata", timeout=10).json()
        if (meta.get("model_name"), str(meta.get("model_version"))) != (model_name, str(version)):
            raise fail(f"/metadata reports {meta.get('model_name')} version {meta.get('model_version')}, "
                       f"expected {model_name} version {version}")
        started = time.perf_counter()
        resp = requests.post(f"{url}/embed", files={"file": ("smoke.png", tiny_png(), "image/png")},
                             timeout=max(10.0, 3 * max_latency_s))
        latency = time.perf_counter() - started
    except requests.RequestException as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise fail(f"/metadata is not JSON ({exc})") from None
    if resp.status_code != 200:
        raise fail(f"/embed answered {resp.status_code}: {resp.text[:200]}")
    vector = resp.json().get("embedding") or []
    if expected_dim is not None and len(vector) != expected_dim:
        raise fail(f"/embed returned {len(vector)} values, model version {version} has {expected_dim}")
    norm = math.sqrt(sum(v * v for v in vector))
    if not vector or abs(norm - 1.0) > 1e-3:
        raise fail(f"/embed returned an embedding of norm {norm:.4f}, expected 1 (L2-normalised)")
    if latency > max_latency_s:
        raise fail(f"/embed took {latency * 1000:.0f} ms, the bound is {max_latency_s * 1000:.0f} ms")
    log.info("smoke test passed: %s version %s ready, /embed %d-d in %.0f ms", model_name, version, len(vector),
             latency * 1000)
    return {"embedding_dim": len(vector), "embed_latency_ms": round(latency * 1000, 1)}
