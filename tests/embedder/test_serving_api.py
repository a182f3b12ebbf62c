"""The serving API's answers to bad input: always a 4xx JSON error that names the problem, never a 5xx.

The app runs in-process (FastAPI's TestClient) around a real, untrained ResNet-18 embedder.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from embedder import model, serve


@pytest.fixture(scope="module")
def client():
    torch.manual_seed(0)
    net = model.build("resnet18", 3)
    net.eval()
    loaded = model.LoadedModel(uri="models:/m/1", embedder=net.embedder, head_weight=torch.eye(3, 512),
                               head_scale=16.0, metadata={"image_size": 32, "embedding_dim": 512,
                                                          "classes": ["a", "b", "c"]})
    holder = serve.ModelHolder()
    holder.current = serve.Serving(serve.Desired("m", "1"), loaded, "d1", "r1")
    with TestClient(serve.create_app(holder, max_pixels=1_000_000)) as test_client:
        yield test_client


def image_bytes(mode: str, size=(40, 30), fmt: str = "PNG") -> bytes:
    color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 128), "L": 128, "CMYK": (0, 255, 0, 0), "P": 3}[mode]
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")])
def test_every_image_mode_gives_a_unit_embedding_of_the_model_dimension(client, mode, fmt):
    resp = client.post("/embed", files={"file": (f"x.{fmt.lower()}", image_bytes(mode, fmt=fmt), f"image/{fmt.lower()}")})
    assert resp.status_code == 200, resp.text
    vector = np.array(resp.json()["embedding"])
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5


TRUNCATED = image_bytes("RGB", size=(64, 64))[:60]


@pytest.mark.parametrize(("files", "kwargs", "status", "message"), [
    ({"file": ("notes.txt", b"hello, not an image", "image/png")}, {}, 400, "notes.txt: not a decodable image"),
    ({"file": ("cut.png", TRUNCATED, "image/png")}, {}, 400, "cut.png: not a decodable image"),
    ({"file": ("empty.png", b"", "image/png")}, {}, 400, "empty.png is empty (0 bytes)"),
    ({"file": ("huge.png", image_bytes("L", size=(2000, 1000)), "image/png")}, {}, 413,
     "huge.png: decompression bomb guard: 2000x1000 = 2000000 pixels, over the limit of 1000000"),
    ({"file": ("big.png", b"\x89PNG" + b"\x00" * (serve.MAX_UPLOAD_BYTES + 10), "image/png")}, {}, 413,
     f"big.png is larger than the limit of {serve.MAX_UPLOAD_BYTES} bytes"),
    ({"file": ("doc.pdf", b"%PDF-1.7", "application/pdf")}, {}, 415, "doc.pdf was sent as application/pdf"),
    (None, {"json": {"image": "aGVsbG8="}}, 415, "send the image as multipart/form-data in the field 'file'"),
    ({"other": ("x.png", image_bytes("RGB"), "image/png")}, {}, 422, "missing form field(s): file"),
])
def test_bad_input_gets_a_4xx_json_error_naming_the_problem(client, files, kwargs, status, message):
    resp = client.post("/embed", files=files, **kwargs) if files else client.post("/embed", **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert message in resp.json()["detail"]


def test_random_bytes_never_give_a_5xx(client):
    rng = np.random.default_rng(0)
    seeds = [image_bytes("RGB"), image_bytes("P"), image_bytes("CMYK", fmt="JPEG")]
    for i in range(60):  # mutated real images: flipped bytes, cut tails, random junk
        data = bytearray(seeds[i % len(seeds)])
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
            data[pos] = int(rng.integers(0, 256))
        data = bytes(data[: int(rng.integers(1, len(data) + 1))]) if i % 2 else bytes(data)
        resp = client.post("/embed", files={"file": ("x.png", data, "image/png")})
        assert resp.status_code in (200, 400, 413), (i, resp.status_code, resp.text)
