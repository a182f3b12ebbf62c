"""The serving API: batches in both encodings, /similar, /metrics, and its answers to bad input (always
a 4xx JSON error that names the problem, never a 5xx).

The app runs in-process (FastAPI's TestClient) around a real, untrained ResNet-18 embedder and a
small gallery made of that model's own embeddings.
"""

from __future__ import annotations

import base64
import io
import itertools

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from embedder import gallery
from embedder.images import decode_rgb, eval_transform
from embedder.serving.app import create_app
from embedder.serving.inputs import MAX_UPLOAD_BYTES, Limits
from embedder.serving.model import Desired, ModelHolder, Serving

LIMITS = Limits(max_pixels=1_000_000, max_batch_images=8, max_request_bytes=16 * 1024 * 1024)


def image_bytes(mode: str, size=(40, 30), fmt: str = "PNG") -> bytes:
    color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 128), "L": 128, "CMYK": (0, 255, 0, 0), "P": 3}[mode]
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def striped(seed: int) -> bytes:
    """A distinct RGB picture per seed (random stripes), for gallery tests."""
    rng = np.random.default_rng(seed)
    pixels = np.repeat(rng.integers(0, 256, size=(1, 48, 3), dtype=np.uint8), 48, axis=0)
    buf = io.BytesIO()
    Image.fromarray(pixels if seed % 2 else pixels.transpose(1, 0, 2).copy()).save(buf, "PNG")
    return buf.getvalue()


GALLERY_IMAGES = {f"g/{label}/{i}.png": (label, striped(i)) for i, label in zip(range(6), "aabbcc", strict=True)}


def app_client(loaded, with_gallery: bool = True, **kwargs) -> TestClient:
    holder = ModelHolder()
    found = None
    if with_gallery:
        batch = torch.stack([eval_transform(32)(decode_rgb(data)) for _, data in GALLERY_IMAGES.values()])
        found = gallery.Gallery(loaded.embed(batch), [label for label, _ in GALLERY_IMAGES.values()],
                                list(GALLERY_IMAGES), "d1")
    holder.current = Serving(Desired("m", "1"), loaded, "d1", "r1", found)
    return TestClient(create_app(holder, limits=LIMITS, **kwargs))


@pytest.fixture(scope="module")
def client(loaded):
    with app_client(loaded) as test_client:
        yield test_client


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")])
def test_every_image_mode_gives_a_unit_embedding_of_the_model_dimension(client, mode, fmt):
    resp = client.post("/embed", files={"file": (f"x.{fmt.lower()}", image_bytes(mode, fmt=fmt), f"image/{fmt.lower()}")})
    assert resp.status_code == 200, resp.text
    vector = np.array(resp.json()["embedding"])
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_base64_and_multipart_give_the_same_embedding(client):
    png = image_bytes("RGB")
    multipart = client.post("/embed", files={"file": ("x.png", png, "image/png")}).json()
    as_json = client.post("/embed", json={"image": b64(png)}).json()
    data_url = client.post("/embed", json={"image": "data:image/png;base64," + b64(png)}).json()
    assert multipart["count"] == as_json["count"] == 1
    assert np.allclose(multipart["embedding"], as_json["embedding"], atol=1e-6)
    assert np.allclose(multipart["embedding"], data_url["embedding"], atol=1e-6)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_a_batch_gives_one_unit_embedding_per_image_in_order_equal_to_single_requests(client, encoding):
    pictures = [image_bytes(m, fmt=f) for m, f in [("RGB", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")]]
    if encoding == "multipart":
        resp = client.post("/embed", files=[("files", (f"{i}.img", p, "image/png")) for i, p in enumerate(pictures)])
    else:
        resp = client.post("/embed", json={"images": [b64(p) for p in pictures]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    batch = np.array(body["embeddings"])
    assert body["count"] == 4 and batch.shape == (4, 512) and "embedding" not in body
    assert np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    singles = np.array([client.post("/embed", json={"image": b64(p)}).json()["embedding"] for p in pictures])
    assert np.allclose(batch, singles, atol=1e-4)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)  # different images, different embeddings


def test_similar_returns_the_nearest_gallery_items_with_labels(client):
    names = list(GALLERY_IMAGES)
    resp = client.post("/similar?k=3", files=[("files", (n, GALLERY_IMAGES[n][1], "image/png")) for n in names])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["k"], body["gallery_size"], body["gallery_dataset_version"]) == (3, 6, "d1")
    for name, result in zip(names, body["results"], strict=True):
        first = result["neighbors"][0]
        assert first["item"] == name and first["label"] == GALLERY_IMAGES[name][0]  # an item is its own nearest
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [n["score"] for n in result["neighbors"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert client.post("/similar?k=50", json={"image": b64(striped(0))}).json()["k"] == 6  # at most the gallery


def test_similar_without_a_gallery_is_a_503_that_says_so_and_embed_still_works(loaded):
    with app_client(loaded, with_gallery=False) as plain:
        resp = plain.post("/similar", json={"image": b64(image_bytes("RGB"))})
        assert resp.status_code == 503
        assert "model version 1 has no gallery" in resp.json()["detail"]
        assert plain.post("/embed", json={"image": b64(image_bytes("RGB"))}).status_code == 200


TRUNCATED = image_bytes("RGB", size=(64, 64))[:60]
PNG = image_bytes("RGB")


@pytest.mark.parametrize(("request_kwargs", "status", "message"), [
    # not an image, truncated, empty
    ({"files": {"file": ("notes.txt", b"hello, not an image", "image/png")}}, 400, "notes.txt: not a decodable image"),
    ({"files": {"file": ("cut.png", TRUNCATED, "image/png")}}, 400, "cut.png: not a decodable image"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty.png is empty (0 bytes)"),
    ({"json": {"image": b64(b"hello")}}, 400, "image: not a decodable image"),
    ({"json": {"images": [b64(PNG), b64(TRUNCATED)]}}, 400, "images[1]: not a decodable image"),
    ({"json": {"image": "not base64!"}}, 400, "image is not valid base64"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "the body is not valid JSON"),
    ({"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400,
     "the JSON body is nested too deeply"),
    # too many pixels, too many bytes
    ({"files": {"file": ("huge.png", image_bytes("L", size=(2000, 1000)), "image/png")}}, 413,
     "huge.png: decompression bomb guard: 2000x1000 = 2000000 pixels, over the limit of 1000000"),
    ({"files": {"file": ("big.png", b"\x89PNG" + b"\x00" * (MAX_UPLOAD_BYTES + 10), "image/png")}}, 413,
     f"big.png is larger than the limit of {MAX_UPLOAD_BYTES} bytes"),
    ({"json": {"image": "A" * (MAX_UPLOAD_BYTES // 3 * 4 + 8)}}, 413, "image is larger than the limit"),
    ({"content": b"x" * (LIMITS.max_request_bytes + 1), "headers": {"content-type": "application/json"}}, 413,
     f"is over the limit of {LIMITS.max_request_bytes} bytes"),
    # wrong content type
    ({"files": {"file": ("doc.pdf", b"%PDF-1.7", "application/pdf")}}, 415, "doc.pdf was sent as application/pdf"),
    ({"content": PNG, "headers": {"content-type": "image/png"}}, 415,
     "send the image as multipart/form-data in the field 'file'"),
    # empty batch, batch too large
    ({"json": {"images": []}}, 400, "empty batch: 'images' holds no images"),
    ({"json": {"images": [b64(PNG)] * 9}}, 413, "batch too large: 9 images, the limit is 8 per request"),
    ({"files": [("files", ("x.png", PNG, "image/png"))] * 9}, 413, "batch too large: 9 images, the limit is 8"),
    ({"files": [("files", ("x.png", PNG, "image/png"))] * 30}, 413, "batch too large: more than 8 images"),
    # wrong shape
    ({"files": {"other": ("x.png", PNG, "image/png")}}, 422, "missing form field(s): file (one image) or files"),
    ({"data": {"file": "just text"}, "files": {"x": ("x.png", PNG, "image/png")}}, 422, "form field file is text"),
    ({"files": [("file", ("a.png", PNG, "image/png")), ("files", ("b.png", PNG, "image/png"))]}, 422, "not both"),
    ({"json": {"imgs": [b64(PNG)]}}, 422, "unknown field(s) 'imgs'"),
    ({"json": {"images": b64(PNG)}}, 422, "'images' must be a list of base64 strings"),
    ({"json": {"images": [1, 2]}}, 422, "images[0] must be a base64 string, got int"),
    ({"json": [b64(PNG)]}, 422, "the JSON body must be an object"),
])
@pytest.mark.parametrize("route", ["/embed", "/similar"])
def test_bad_input_gets_a_4xx_json_error_naming_the_problem(client, route, request_kwargs, status, message):
    resp = client.post(route, **request_kwargs)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert message in resp.json()["detail"]


def test_out_of_range_k_is_a_422_naming_the_parameter(client):
    resp = client.post("/similar?k=0", json={"image": b64(PNG)})
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("query.k: Input should be greater than or equal to 1")


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


def metric_samples(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_metrics_count_requests_by_route_and_status_and_record_batches_and_norms(loaded):
    with app_client(loaded) as fresh:
        for _ in range(3):
            fresh.post("/embed", json={"image": b64(PNG)})
        fresh.post("/embed", json={"images": [b64(PNG)] * 5})
        fresh.post("/embed", json={"image": b64(b"junk")})
        fresh.post("/similar", json={"image": b64(PNG)})
        samples = metric_samples(fresh)

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("embedder_http_requests_total", route="/embed", method="POST", status="200") == 4
    assert value("embedder_http_requests_total", route="/embed", method="POST", status="400") == 1
    assert value("embedder_http_requests_total", route="/similar", method="POST", status="200") == 1
    assert value("embedder_http_request_duration_seconds_count", route="/embed", method="POST", status="200") == 4
    assert value("embedder_request_images_count", route="/embed") == 5  # the junk one was read too
    assert value("embedder_request_images_sum", route="/embed") == 3 + 5 + 1
    assert value("embedder_forward_batch_size_sum") == 3 + 5 + 1  # every embedded image went through a forward pass
    assert value("embedder_embedding_norm_count") == 9
    assert value("embedder_embedding_norm_bucket", le="0.9999") == 0  # all unit norm
    assert value("embedder_embedding_norm_bucket", le="1.0001") == 9
    assert value("embedder_similar_top1_score_count") == 1
    assert value("embedder_model_info", model_name="m", model_version="1", dataset_version="d1") == 1
    assert value("embedder_ready") == 1


def test_openapi_documents_every_route_and_its_errors(client):
    schema = client.get("/openapi.json").json()
    assert {"/embed", "/similar", "/healthz", "/readyz", "/metadata", "/metrics"} <= schema["paths"].keys()
    for route in ("/embed", "/similar"):
        post = schema["paths"][route]["post"]
        assert {"multipart/form-data", "application/json"} == post["requestBody"]["content"].keys()
        assert {"200", "400", "413", "415", "422", "503"} <= post["responses"].keys()
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]


def test_the_interactive_api_pages_are_off_unless_asked_for(client, loaded):
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    with app_client(loaded, docs=True) as local:  # what local mode's serving process asks for (--docs)
        assert local.get("/docs").status_code == 200 and "swagger" in local.get("/docs").text.lower()


def test_no_micro_batching_gives_the_same_embeddings(client, loaded):
    with app_client(loaded, micro_batching=False) as unbatched:
        pictures = [b64(striped(i)) for i in range(3)]
        a = unbatched.post("/embed", json={"images": pictures}).json()["embeddings"]
    b = client.post("/embed", json={"images": pictures}).json()["embeddings"]
    assert np.allclose(a, b, atol=1e-5)


def test_not_ready_is_a_503_with_retry_after():
    with TestClient(create_app(ModelHolder(), limits=LIMITS)) as empty:
        assert empty.get("/readyz").status_code == 503
        resp = empty.post("/embed", json={"image": b64(PNG)})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
        assert resp.json()["detail"] == "no model version pinned yet: nothing has been deployed"
        assert empty.get("/readyz").json()["reason"] == "no model version pinned yet: nothing has been deployed"


def test_every_pairing_of_route_and_encoding_is_accepted(client):
    for route, single in itertools.product(("/embed", "/similar"), (True, False)):
        body = {"image": b64(PNG)} if single else {"images": [b64(PNG)]}
        assert client.post(route, json=body).status_code == 200


def test_a_streamed_body_without_content_length_is_cut_off_at_the_limit(loaded):
    small = Limits(max_request_bytes=100_000)
    holder = ModelHolder()
    holder.current = Serving(Desired("m", "1"), loaded, "d1", "r1")

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(50):
            yield b"x" * 10_000
        yield b"\r\n--b--\r\n"

    with TestClient(create_app(holder, limits=small)) as c:
        resp = c.post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert "content-length" not in resp.request.headers  # sent chunked
    assert resp.status_code == 413
    assert "is over the limit of 100000 bytes" in resp.json()["detail"]
