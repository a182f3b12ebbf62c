"""``make bench``'s switch benchmark runs (small sizes) and reports what it measured: a rollback to a warm version is
a switch, a rollback to a version the process no longer holds loads it first."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.scenario]


def test_the_switch_benchmark_measures_warm_and_cold_rollbacks_side_by_side():
    out = subprocess.run([sys.executable, "-m", "localdev.bench_switch", "--architecture", "resnet18", "--image-size",
                          "32", "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    times = {name: float(ms) for name, ms in re.findall(r"  (switch|rollback, warm|rollback, cold)\b.*?(\d+) ms",
                                                        out.stdout)}
    assert set(times) == {"switch", "rollback, warm", "rollback, cold"}, out.stdout
    ratio = float(re.search(r"ratio cold / warm: ([\d.]+)", out.stdout).group(1))
    assert ratio == pytest.approx(times["rollback, cold"] / times["rollback, warm"], rel=0.05)
    assert times["rollback, cold"] > times["rollback, warm"]  # loading a version costs more than switching to it
