"""Client traffic for the demo's drift acts: whole sample windows of one kind of traffic, each confirmed written.

The drift monitor scores sample windows (``RETRAIN_DRIFT_WINDOW_S``, aligned to the epoch), and a window
with fewer than ``RETRAIN_DRIFT_MIN_SAMPLES`` embeddings is insufficient: not scored. So that every window
the monitor scores holds one kind of traffic, :func:`send_windows`

- starts each window's traffic at the window's start, never part-way through;
- stops posting ``margin_s`` before the window closes, so nothing spills into the next one (a window
  that could not take all its images in time is reported, and the next window is used as well);
- returns only once the serving process has written each filled window's sample, with at least the
  images it was sent (times the sample rate), and the monitor's grace after the last one has passed
  (:func:`retrain_contract.artifacts.window_complete_at`): a monitor run started then scores exactly
  these windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from retrain.monitor import load_window, sample_windows
from retrain.settings import Settings
from retrain.waiting import poll
from retrain_contract import artifacts


@dataclass(frozen=True)
class Window:
    start: int
    sent: int  # images answered in it
    written: int  # embeddings its sample files hold


def _clock_at(t: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    """Until the wall clock reads ``t`` (windows are wall-clock intervals: this is the event waited for)."""
    while (left := t - clock()) > 0:
        sleep(min(left, 1.0))


def send_windows(settings: Settings, serving_url: str, model_name: str, version: str, images: Sequence[Path],
                 windows: int, per_window: int, margin_s: float = 2.0, timeout_s: float = 300,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] = print) -> list[Window]:
    """Post ``per_window`` of ``images`` to ``/embed`` in each of ``windows`` whole windows; see the module."""
    cfg = settings.drift
    width = cfg.window_s
    if width <= margin_s:
        raise ValueError(f"RETRAIN_DRIFT_WINDOW_S ({width:g} s) must be longer than the traffic margin ({margin_s:g} s)")
    batch = list(images[:per_window])
    need = max(1, math.floor(len(batch) * cfg.sample_rate))  # what a filled window's sample must hold
    if need < cfg.min_samples:
        raise ValueError(f"{len(batch)} images a window at sample rate {cfg.sample_rate:g} cannot reach "
                         f"RETRAIN_DRIFT_MIN_SAMPLES ({cfg.min_samples}): nothing would be scored")
    filled: list[tuple[int, int]] = []
    deadline = clock() + timeout_s
    start = int(math.floor(clock() / width) + 1) * int(width)  # the next window to open
    with requests.Session() as http:
        while len(filled) < windows:
            if clock() > deadline:
                raise TimeoutError(f"{windows} windows of traffic not sent within {timeout_s:g} s "
                                   f"({len(filled)} filled): /embed is too slow for {len(batch)} images in "
                                   f"{width:g} s windows")
            _clock_at(start, clock, sleep)
            sent = 0
            for image in batch:
                if clock() >= start + width - margin_s:
                    break
                resp = http.post(f"{serving_url}/embed", files={"file": (image.name, image.read_bytes(), "image/png")},
                                 timeout=30)
                resp.raise_for_status()
                sent += 1
            stamp = time.strftime("%H:%M:%S", time.gmtime(start))
            if sent == len(batch):
                filled.append((start, sent))
            else:
                say(f"   window {stamp}: only {sent} of {len(batch)} images answered before it closed; "
                    "the next window takes its place")
            start = max(start + int(width), int(math.floor(clock() / width) + 1) * int(width))

    def written() -> list[Window] | None:
        if clock() < artifacts.window_complete_at(filled[-1][0], width):
            return None
        files = sample_windows(settings, model_name, version)
        got = [Window(s, sent, len(load_window(files[s])) if s in files else 0) for s, sent in filled]
        return got if all(w.written >= need for w in got) else None

    done = poll(written, timeout_s=max(60.0, deadline - clock()), interval_s=0.5,
                what=f"the samples of {len(filled)} windows written by the serving process")
    for w in done:
        say(f"   window {time.strftime('%H:%M:%S', time.gmtime(w.start))}: {w.sent} images, "
            f"{w.written} embeddings sampled")
    return done
