"""Client load on a serving address, recording what every response said and when.

:class:`Load` runs ``clients`` threads, each posting images to ``/embed`` one after another; every
response is kept as a :class:`Answer` (send and receive times, status, model version). A test reads
them to check what clients saw across a switch: :func:`interleavings` and :func:`versions_in_order`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass(frozen=True)
class Answer:
    client: int
    sent: float
    received: float
    status: int
    version: str | None
    error: str = ""


class Load:
    def __init__(self, url: str, images: list[Path], clients: int = 4):
        self.url, self.images, self.clients = url, images, clients
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.answers

    def count(self, version: str | None = None) -> int:
        with self._lock:
            return sum(1 for a in self.answers if version is None or a.version == version)

    def _client(self, index: int) -> None:
        session = requests.Session()
        i = index
        while not self._stop.is_set():
            image = self.images[i % len(self.images)]
            i += self.clients
            sent = time.monotonic()
            try:
                resp = session.post(f"{self.url}/embed", files={"file": (image.name, image.read_bytes(), "image/png")},
                                    timeout=30)
                version = resp.json().get("model_version") if resp.status_code == 200 else None
                answer = Answer(index, sent, time.monotonic(), resp.status_code, version,
                                "" if resp.status_code == 200 else resp.text[:200])
            except requests.RequestException as exc:
                answer = Answer(index, sent, time.monotonic(), 0, None, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.answers.append(answer)


def versions_in_order(answers: list[Answer]) -> list[str | None]:
    """The versions of the answers in the order they arrived, consecutive repeats collapsed: ``["1", "2"]``."""
    out: list[str | None] = []
    for a in sorted(answers, key=lambda a: a.received):
        if not out or out[-1] != a.version:
            out.append(a.version)
    return out


def interleavings(answers: list[Answer], old: str, new: str) -> list[tuple[Answer, Answer]]:
    """Pairs where a client got ``old`` for a request sent after some client had already received ``new``."""
    first_new = min((a.received for a in answers if a.version == new), default=None)
    if first_new is None:
        return []
    witness = min((a for a in answers if a.version == new), key=lambda a: a.received)
    return [(witness, a) for a in answers if a.version == old and a.sent > first_new]
