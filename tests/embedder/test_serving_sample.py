"""The serving API's embedding sample for the drift monitor: random share, windows, bounds, storage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from embedder.serving.sampling import EmbeddingSampler
from retrain_contract import storage


def read(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)))


def test_closed_windows_are_written_per_model_version_and_window(tmp_path):
    sampler = EmbeddingSampler(tmp_path.as_uri(), rate=1.0, window_s=60, max_per_window=1000, seed=0)
    for i in range(5):
        sampler.offer("m", "3", torch.full((4,), float(i)), now=120 + i)  # window 120
    sampler.offer("m", "3", torch.ones(4), now=185)  # window 180, still open at 190
    assert sampler.flush(now=179) == []  # window 120 closes at 180
    [written] = sampler.flush(now=190)
    assert written.startswith((tmp_path / "m" / "v3" / "window=120").as_uri() + "/") and written.endswith(".npy")
    rows = read(written)
    assert rows.dtype == np.float32 and rows.shape == (5, 4) and rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert len(sampler.flush(now=190, everything=True)) == 1  # shutdown writes the open window too


def test_the_rate_samples_a_share_and_the_window_is_bounded(tmp_path):
    sampler = EmbeddingSampler(tmp_path.as_uri(), rate=0.25, window_s=60, max_per_window=100, seed=1)
    for i in range(2000):
        sampler.offer("m", "1", torch.zeros(2), now=i % 60)
    [written] = sampler.flush(now=61)
    assert len(read(written)) == 100  # bounded
    assert 400 < 100 + sampler.dropped < 600  # about a quarter of 2000 were sampled
    none = EmbeddingSampler(tmp_path.as_uri(), rate=0.0, window_s=60, max_per_window=100)
    none.offer("m", "1", torch.zeros(2), now=0)
    assert none.flush(now=61) == []


def test_a_storage_failure_loses_the_sample_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sampler = EmbeddingSampler(blocker.as_uri(), rate=1.0, window_s=1, max_per_window=10)
    sampler.offer("m", "1", torch.zeros(2), now=0)
    assert sampler.flush(now=5) == []


@pytest.mark.parametrize(("rate", "window", "bound"), [(1.5, 60, 10), (0.1, 0, 10), (0.1, 60, 0)])
def test_bad_settings_are_refused(tmp_path, rate, window, bound):
    with pytest.raises(ValueError):
        EmbeddingSampler(tmp_path.as_uri(), rate=rate, window_s=window, max_per_window=bound)
