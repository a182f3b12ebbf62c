"""Embedding samples for the drift tests: unit vectors and sample windows written as the serving API writes them."""

from __future__ import annotations

import io

import numpy as np

MODEL = "image-embedder"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_window(settings, start: int, rows: np.ndarray, replica: str = "a") -> None:
    from retrain_contract import storage

    buffer = io.BytesIO()
    np.save(buffer, rows.astype(np.float32))
    storage.write_bytes(storage.join(settings.drift.sample_uri, MODEL, "v1", f"window={start}", f"{replica}.npy"),
                        buffer.getvalue())


def serve(settings, version: str, model: str = MODEL) -> None:
    """What a finished deploy leaves in local mode: ``version`` serves (the record), marked as the system's act."""
    import time

    from retrain.rollout.targets import SWITCHED, LocalServing, Mark
    from retrain_contract.serving import Pin

    target = LocalServing(settings.serving_state_uri, settings.serving_url, settings.rollout.preview_url)
    target.switch(Pin(model, version), "set up by the test",
                  Mark(model, version, "setup", SWITCHED, time.time(), recorded=True), warm_s=0)
