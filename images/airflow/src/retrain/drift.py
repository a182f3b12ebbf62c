"""Drift statistics between a reference sample of embeddings and a production window (NumPy only).

The test is a two-sample kernel test: the squared maximum mean discrepancy (MMD², unbiased
estimator) with a Gaussian (RBF) kernel whose bandwidth is the median pairwise distance of the
pooled sample, and a permutation p-value (the share of label permutations whose MMD² is at least the
observed one, with the usual +1 correction, so it is never 0). The shift of the mean embedding (L2
distance between the two means) is reported beside it as an easy-to-read effect size.

A window with fewer than ``min_samples`` production embeddings is *insufficient*: it is recorded as
such and counts neither as drift nor as no drift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

OK, DRIFT, INSUFFICIENT = "ok", "drift", "insufficient"


@dataclass(frozen=True)
class WindowResult:
    status: str  # ok | drift | insufficient
    n_reference: int
    n_production: int
    mmd2: float = math.nan
    p_value: float = math.nan
    mean_shift: float = math.nan
    bandwidth: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d, 0.0, out=d)
    return d


def _mmd2_from_kernel(k: np.ndarray, idx_x: np.ndarray, idx_y: np.ndarray) -> float:
    n, m = len(idx_x), len(idx_y)
    kxx = k[np.ix_(idx_x, idx_x)]
    kyy = k[np.ix_(idx_y, idx_y)]
    kxy = k[np.ix_(idx_x, idx_y)]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def mmd_test(reference: np.ndarray, production: np.ndarray, permutations: int = 500,
             seed: int = 0) -> tuple[float, float, float]:
    """(MMD², permutation p-value, bandwidth) of two samples of row vectors."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(production, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"samples must be 2-d with the same width, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least 2 rows")
    z = np.concatenate([x, y])
    d = _sq_dists(z)
    off_diagonal = d[np.triu_indices(len(z), 1)]
    median = float(np.median(off_diagonal))
    bandwidth = math.sqrt(median / 2.0) if median > 0 else 1.0
    k = np.exp(-d / (2.0 * bandwidth**2))
    n = len(x)
    idx = np.arange(len(z))
    observed = _mmd2_from_kernel(k, idx[:n], idx[n:])
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        perm = rng.permutation(len(z))
        if _mmd2_from_kernel(k, perm[:n], perm[n:]) >= observed:
            exceed += 1
    return observed, (exceed + 1) / (permutations + 1), bandwidth


def compare(reference: np.ndarray, production: np.ndarray, *, alpha: float = 0.01, min_samples: int = 50,
            permutations: int = 500, seed: int = 0) -> WindowResult:
    """Compare one production window with the reference; drift when the p-value is below ``alpha``.

    The comparison is strict (``p < alpha``), so a p-value exactly at ``alpha`` is never drift.
    """
    if 1.0 / (permutations + 1) >= alpha:
        raise ValueError(f"with {permutations} permutations the smallest possible p-value is "
                         f"{1 / (permutations + 1):.4g}, never below alpha={alpha}; use at least "
                         f"{math.ceil(1 / alpha)} permutations")
    reference = np.asarray(reference, dtype=np.float64)
    production = np.asarray(production, dtype=np.float64).reshape(-1, reference.shape[1])  # (0, d) when empty
    if len(production) < min_samples or len(reference) < 2:
        return WindowResult(INSUFFICIENT, len(reference), len(production))
    mmd2, p_value, bandwidth = mmd_test(reference, production, permutations, seed)
    shift = float(np.linalg.norm(reference.mean(axis=0) - production.mean(axis=0)))
    status = DRIFT if p_value < alpha else OK
    return WindowResult(status, len(reference), len(production), mmd2, p_value, shift, bandwidth)
