"""The serving benchmark's bare reference: the best of a scan of batch sizes, so it is a true upper bound."""

from __future__ import annotations

import pytest

from embedder.bench_serving import batch_sizes, best_bare


@pytest.mark.parametrize(("max_batch", "expected"), [(32, [1, 2, 4, 8, 16, 32]), (24, [1, 2, 4, 8, 16, 24]),
                                                     (1, [1]), (3, [1, 2, 3])])
def test_the_scan_covers_one_to_the_micro_batch_maximum(max_batch, expected):
    assert batch_sizes(max_batch) == expected


def test_the_reference_is_the_best_of_the_whole_scan():
    # Images/s as on a small CPU: small batches are the fastest, neither 8 nor the maximum is.
    speeds = {1: 30.0, 2: 34.0, 4: 31.0, 8: 21.8, 16: 17.0, 32: 14.1}
    measured: list[int] = []

    def measure(batch_size: int) -> float:
        measured.append(batch_size)
        return speeds[batch_size]

    rates, reference = best_bare(measure, 32)
    assert measured == [1, 2, 4, 8, 16, 32]  # each batch size measured once, smallest first
    assert rates == speeds and list(rates) == measured  # printed in that order
    assert reference == 34.0


def test_a_batch_bound_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        batch_sizes(0)
