"""One storage interface for the stages: ``file://`` (or a plain path) and ``s3://`` URIs.

Writes are atomic: locally a temporary file in the same folder followed by ``os.replace``; on S3 a
single ``PutObject``, which S3 makes visible all at once. S3 clients are created on first use with
boto3's standard retry mode, so transient errors (throttling, 5xx, connection resets) are retried.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse


class StorageError(RuntimeError):
    """A storage location is missing, unreadable or malformed; the message names the URI."""


class StorageUnavailable(RuntimeError):
    """S3 did not answer, after the client's own retries: not the input's fault, so a retry of the task may succeed.

    Deliberately not a :class:`StorageError`, which the stages report as bad input (no retry).
    """


def _names_s3(func):
    """Re-raise S3 connection failures as :class:`StorageUnavailable`, naming S3, its endpoint and the URI."""

    @functools.wraps(func)
    def wrapper(uri, *args, **kwargs):
        try:
            return func(uri, *args, **kwargs)
        except Exception as exc:
            if not type(exc).__module__.startswith("botocore"):
                raise
            from botocore.exceptions import ConnectionError as S3ConnectionError

            if not isinstance(exc, S3ConnectionError):
                raise
            raise StorageUnavailable(
                f"S3 is unreachable at {_s3_client().meta.endpoint_url} ({func.__name__} {uri}): {exc}. "
                "Check that the S3 service is up and that AWS_ENDPOINT_URL points at it; a retry resumes."
            ) from exc

    return wrapper


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" or "s3"
    bucket: str  # empty for file
    path: str  # absolute filesystem path for file, key (no leading slash) for s3

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return Path(self.path).as_uri()
        return f"s3://{self.bucket}/{self.path}"


def parse(uri: str | os.PathLike[str]) -> Location:
    """Parse ``file:///abs``, ``s3://bucket/key`` or a plain filesystem path."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        raw = unquote(parsed.path) if parsed.scheme == "file" else text
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: file URIs must be absolute (file:///path), not file://host/path")
        return Location("file", "", str(Path(raw).expanduser().resolve()))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text!r}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    raise StorageError(f"{text!r}: unsupported storage scheme {parsed.scheme!r}; use file:// or s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a storage URI (``/``-separated on every scheme)."""
    loc = parse(uri)
    suffix = "/".join(p.strip("/") for p in parts if p)
    if loc.scheme == "file":
        return Location("file", "", str(Path(loc.path, suffix))).uri
    key = f"{loc.path.rstrip('/')}/{suffix}" if loc.path else suffix
    return Location("s3", loc.bucket, key).uri


@functools.cache
def _s3_client():
    import boto3
    from botocore.config import Config

    # Endpoint, region and credentials come from the standard AWS environment / config chain
    # (AWS_ENDPOINT_URL for MinIO or moto), never from code.
    return boto3.client(
        "s3",
        config=Config(retries={"mode": "standard", "max_attempts": int(os.environ.get("EMBEDDER_S3_MAX_ATTEMPTS", "8"))}),
    )


@_names_s3
def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.path).exists()
    from botocore.exceptions import ClientError

    try:
        _s3_client().head_object(Bucket=loc.bucket, Key=loc.path)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


@_names_s3
def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            return Path(loc.path).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
    from botocore.exceptions import ClientError

    try:
        return _s3_client().get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()
    except ClientError as exc:
        raise StorageError(f"{uri}: {exc.response.get('Error', {}).get('Message', exc)}") from exc


@_names_s3
def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old object or the new one, never a partial one."""
    loc = parse(uri)
    if loc.scheme == "s3":
        _s3_client().put_object(Bucket=loc.bucket, Key=loc.path, Body=data)
        return
    target = Path(loc.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@_names_s3
def delete(uri: str) -> None:
    """Remove one file or object; a missing one is not an error."""
    loc = parse(uri)
    if loc.scheme == "file":
        Path(loc.path).unlink(missing_ok=True)
        return
    _s3_client().delete_object(Bucket=loc.bucket, Key=loc.path)


@_names_s3
def list_files(uri: str) -> list[str]:
    """Every file under ``uri``, as paths relative to it (``/``-separated), sorted.

    Raises StorageError when the location does not exist or holds nothing.
    """
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.path)
        if not root.is_dir():
            raise StorageError(f"{uri}: not a directory (check the data root setting and that the folder exists)")
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    paginator = _s3_client().get_paginator("list_objects_v2")
    pages = {"PageSize": int(os.environ.get("EMBEDDER_S3_PAGE_SIZE", "1000"))}
    keys = [
        obj["Key"][len(prefix) :]
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix, PaginationConfig=pages)
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    if not keys:
        raise StorageError(f"{uri}: no objects under this prefix (check the bucket and prefix)")
    return sorted(keys)
