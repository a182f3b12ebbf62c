"""Request parsing: the images of a request, in either encoding, within the request limits.

- ``multipart/form-data``: field ``file`` (one image) or ``files`` repeated (a batch);
- ``application/json``: ``{"image": <base64>}`` or ``{"images": [<base64>, ...]}`` (data URLs too).

Bad input gets a 4xx naming the problem (:class:`fastapi.HTTPException`, JSON ``{"detail": ...}``).
Memory is bounded before anything is decoded: :class:`BodyLimit` refuses a body over the request
limit (declared or streamed), no more than the image limit is read of one part, and the pixel limit
is checked from the image header (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass

import torch
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedder import images

MAX_UPLOAD_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may carry; everything past these gets a 413 before it costs memory."""

    max_image_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    max_batch_images: int = 64  # images per request
    max_request_bytes: int = 64 * 1024 * 1024  # the whole body (base64 JSON is 4/3 of the images)
    max_k: int = 100


class BodyTooLarge(Exception):
    """A streamed body went over the limit (the app answers 413 with this message)."""


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 413, declared (Content-Length) or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": self.message(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.message(seen))
            return message

        await self.app(scope, limited, send)

    def message(self, size: int) -> str:
        return (f"the request body ({size} bytes or more) is over the limit of {self.limit} bytes: "
                f"send fewer or smaller images per request")


def media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


async def read_images(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    """The request's images as (name, bytes), and whether they came as a batch; 4xx for anything else."""
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        return await _read_multipart(request, limits)
    if kind == "application/json":
        return await _read_json(request, limits)
    raise HTTPException(415, "send the image as multipart/form-data in the field 'file' ('files' for a batch), "
                             "or as application/json {\"image\": <base64>} ({\"images\": [...]} for a batch); "
                             f"got content type {kind or 'none'}")


def _too_many(n: int | str, limits: Limits) -> HTTPException:
    return HTTPException(413, f"batch too large: {n} images, the limit is {limits.max_batch_images} per request; "
                              "split it into several requests")


def _too_big(name: str, limits: Limits) -> HTTPException:
    return HTTPException(413, f"{name} is larger than the limit of {limits.max_image_bytes} bytes")


async def _read_multipart(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    try:
        form = await request.form(max_files=limits.max_batch_images + 1, max_fields=limits.max_batch_images + 16)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise _too_many(f"more than {limits.max_batch_images}", limits) from None
        raise HTTPException(400, f"malformed multipart/form-data body: {exc.detail}") from None
    try:
        singles, many = form.getlist("file"), form.getlist("files")
        if singles and many:
            raise HTTPException(422, "send one image in the field 'file' or a batch in 'files', not both")
        if len(singles) > 1:
            raise HTTPException(422, f"the field 'file' takes one image, got {len(singles)}: send a batch in 'files'")
        field_name, parts = ("file", singles) if singles else ("files", many)
        if not parts:
            sent = ", ".join(sorted(set(form.keys()))) or "none"
            raise HTTPException(422, f"missing form field(s): file (one image) or files (a batch); got: {sent}")
        if len(parts) > limits.max_batch_images:
            raise _too_many(len(parts), limits)
        items = []
        for i, part in enumerate(parts):
            label = field_name if field_name == "file" else f"files[{i}]"
            if not isinstance(part, UploadFile):
                raise HTTPException(422, f"form field {label} is text, not a file: upload the image as a file")
            name = part.filename or label
            kind = media_type(part.content_type) or "application/octet-stream"
            if not (kind.startswith("image/") or kind == "application/octet-stream"):
                raise HTTPException(415, f"{name} was sent as {kind}; send an image file (image/png, image/jpeg, ...)")
            data = await part.read(limits.max_image_bytes + 1)  # never more than the limit in memory
            if len(data) > limits.max_image_bytes:
                raise _too_big(name, limits)
            items.append((name, data))
        return items, field_name == "files"
    finally:
        await form.close()


async def _read_json(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], bool]:
    body = await request.body()  # bounded by BodyLimit
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # thousands of nested brackets: valid JSON, never a request of ours
        raise HTTPException(400, "the JSON body is nested too deeply: send {\"image\": <base64>} or "
                                 "{\"images\": [<base64>, ...]}") from None
    shape = "send {\"image\": <base64>} for one image or {\"images\": [<base64>, ...]} for a batch"
    if not isinstance(doc, dict):
        raise HTTPException(422, f"the JSON body must be an object: {shape}")
    unknown = sorted(set(doc) - {"image", "images"})
    if unknown:
        raise HTTPException(422, f"unknown field(s) {', '.join(map(repr, unknown))}: {shape}")
    if ("image" in doc) == ("images" in doc):
        raise HTTPException(422, f"exactly one of 'image' and 'images' is needed: {shape}")
    batch = "images" in doc
    values = doc["images"] if batch else [doc["image"]]
    if not isinstance(values, list):
        raise HTTPException(422, f"'images' must be a list of base64 strings, got {type(values).__name__}")
    if not values:
        raise HTTPException(400, "empty batch: 'images' holds no images; send at least one")
    if len(values) > limits.max_batch_images:
        raise _too_many(len(values), limits)
    max_chars = 4 * (limits.max_image_bytes // 3 + 1)
    items = []
    for i, value in enumerate(values):
        name = f"images[{i}]" if batch else "image"
        if not isinstance(value, str):
            raise HTTPException(422, f"{name} must be a base64 string, got {type(value).__name__}")
        if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
            value = value.split(",", 1)[1]
        if len(value) > max_chars:
            raise _too_big(name, limits)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(400, f"{name} is not valid base64: {exc}") from None
        if len(data) > limits.max_image_bytes:
            raise _too_big(name, limits)
        items.append((name, data))
    return items, batch


def preprocess(items: list[tuple[str, bytes]], image_size: int, max_pixels: int) -> torch.Tensor:
    """Decode and transform every image, or raise the 4xx naming the first bad one."""
    transform = images.eval_transform(image_size)
    tensors = []
    for name, data in items:
        if not data:
            raise HTTPException(400, f"{name} is empty (0 bytes): send an image file")
        try:
            image, _ = images.decode(data, max_pixels=max_pixels)
        except images.ImageRejected as exc:
            raise HTTPException(413 if "decompression bomb" in str(exc) else 400, f"{name}: {exc}") from None
        tensors.append(transform(image))
    return torch.stack(tensors)


def encode_multipart(items: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """``items`` as a ``multipart/form-data`` body in the field ``files`` (what :func:`read_images` reads back),
    and its content type: how a mirrored request carries the client's images to the preview."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in items:
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{safe}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
