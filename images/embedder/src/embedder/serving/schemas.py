"""The API's documented shapes: response models, the OpenAPI request body of the image routes, the error responses.

The image routes read their bodies by hand (two content types, bounded reads: :mod:`embedder.serving.inputs`),
so their request body is declared to OpenAPI here rather than derived from a model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from embedder.serving.inputs import Limits


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong with the request, and what to send instead")


class EmbedResponse(BaseModel):
    model_name: str
    model_version: str
    dim: int = Field(description="embedding dimension of the model version")
    count: int = Field(description="number of images embedded")
    embedding: list[float] | None = Field(None, description="the unit embedding (one image: field 'file' or 'image')")
    embeddings: list[list[float]] | None = Field(
        None, description="one unit embedding per image, in request order (a batch: field 'files' or 'images')")


class Neighbor(BaseModel):
    item: str = Field(description="the gallery item (path of the training image in the data set)")
    label: str
    score: float = Field(description="cosine similarity to the query, in [-1, 1]")


class Match(BaseModel):
    label: str = Field(description="the label with the largest summed similarity among the neighbours")
    neighbors: list[Neighbor] = Field(description="the k nearest gallery items, nearest first")


class SimilarResponse(BaseModel):
    model_name: str
    model_version: str
    k: int
    gallery_size: int
    gallery_dataset_version: str
    results: list[Match] = Field(description="one result per image, in request order")


def image_input(limits: Limits) -> dict[str, Any]:
    """The OpenAPI request body of /embed and /similar (read by hand: two content types, bounded reads)."""
    n = limits.max_batch_images
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary", "description": "one image (PNG, JPEG, ...)"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                      "maxItems": n, "description": f"a batch of 1 to {n} images"},
        }}},
        "application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
            "image": {"type": "string", "contentEncoding": "base64", "description": "one base64-encoded image"},
            "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}, "minItems": 1,
                       "maxItems": n, "description": f"a batch of 1 to {n} base64-encoded images"},
        }}},
    }}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "not an image, truncated or empty image, invalid base64 or JSON, empty batch, malformed multipart",
        413: "an image over the byte or pixel limit, a batch over the image limit, a body over the size limit",
        415: "a content type other than multipart/form-data or application/json, or a part that is not an image",
        422: "a missing or misnamed field, a wrong type, a query parameter out of range",
        503: "no model loaded yet, no gallery for this model version, or the queue is full (see Retry-After)",
    }
    return {code: {"model": ErrorBody, "description": what[code]} for code in codes}
