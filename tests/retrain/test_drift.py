"""The drift statistic: calibrated under no drift, powerful under a real shift, deterministic at the threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrain import drift

DIM = 64
N_REF, N_PROD = 200, 100  # the sample sizes the demo uses


def embeddings(rng: np.random.Generator, n: int, centers: np.ndarray, weights: np.ndarray | None = None,
               noise: float = 0.6) -> np.ndarray:
    """Unit vectors around class centres, like a classifier's normalised embeddings."""
    labels = rng.choice(len(centers), size=n, p=weights)
    x = centers[labels] + noise * rng.standard_normal((n, centers.shape[1])) / math.sqrt(centers.shape[1])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def centers():
    rng = np.random.default_rng(1234)
    c = rng.standard_normal((10, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def test_same_distribution_p_values_are_above_005_in_at_least_90_percent_of_seeds(centers):
    p_values = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        result = drift.compare(embeddings(rng, N_REF, centers), embeddings(rng, N_PROD, centers),
                               permutations=200, seed=seed)
        p_values.append(result.p_value)
    share = np.mean(np.array(p_values) > 0.05)
    assert share >= 0.9, (share, sorted(p_values)[:10])
    assert 0.2 < np.median(p_values) < 0.8  # roughly uniform, not stuck near 1 (an over-conservative test)


@pytest.mark.parametrize("shift", ["class_mix", "new_look"])
def test_a_real_shift_is_detected_at_the_demo_sample_sizes(centers, shift):
    detected = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        reference = embeddings(rng, N_REF, centers)
        if shift == "class_mix":  # traffic concentrates on three classes
            weights = np.array([0.3, 0.3, 0.3] + [0.1 / 7] * 7)
            production = embeddings(rng, N_PROD, centers, weights)
        else:  # the same classes, seen differently: every embedding moves a little
            moved = centers + 0.5 * rng.standard_normal(centers.shape) / math.sqrt(DIM)
            production = embeddings(rng, N_PROD, moved / np.linalg.norm(moved, axis=1, keepdims=True))
        result = drift.compare(reference, production, alpha=0.01, permutations=200, seed=seed)
        detected += result.status == drift.DRIFT
        assert result.mean_shift > 0
    assert detected >= 19


def test_too_few_samples_is_insufficient_not_drift(centers):
    rng = np.random.default_rng(0)
    result = drift.compare(embeddings(rng, N_REF, centers), embeddings(rng, 10, centers), min_samples=50)
    assert result.status == drift.INSUFFICIENT and result.n_production == 10 and math.isnan(result.p_value)
    empty = drift.compare(embeddings(rng, N_REF, centers), np.zeros((0, DIM)), min_samples=50)
    assert empty.status == drift.INSUFFICIENT and empty.n_production == 0


def test_the_threshold_is_strict_and_the_result_deterministic(centers):
    rng = np.random.default_rng(7)
    x, y = embeddings(rng, N_REF, centers), embeddings(rng, N_PROD, centers)
    first = drift.compare(x, y, alpha=0.05, permutations=99, seed=3)
    assert drift.compare(x, y, alpha=0.05, permutations=99, seed=3) == first  # same inputs, same answer
    # A p-value exactly at alpha is not drift, every time.
    at = drift.compare(x, y, alpha=first.p_value, permutations=99, seed=3)
    assert at.p_value == first.p_value and at.status == drift.OK
    just_above = drift.compare(x, y, alpha=np.nextafter(first.p_value, 1.0), permutations=99, seed=3)
    assert just_above.status == drift.DRIFT


def test_too_few_permutations_for_alpha_are_refused(centers):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="smallest possible p-value is 0.01, never below alpha=0.01; use at least 100"):
        drift.compare(embeddings(rng, N_REF, centers), embeddings(rng, N_PROD, centers), alpha=0.01, permutations=99)


def test_mismatched_widths_are_refused():
    with pytest.raises(ValueError, match="same width"):
        drift.mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))
