"""An S3 that does not answer is named as such, and stays a retryable error (not the stages' bad input)."""

from __future__ import annotations

import socket

import pytest

from retrain_contract import storage


@pytest.fixture
def dead_s3(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
                       "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                       "EMBEDDER_S3_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    storage._s3_client.cache_clear()
    yield f"http://127.0.0.1:{port}"
    storage._s3_client.cache_clear()


@pytest.mark.parametrize("call", [
    lambda: storage.list_files("s3://retrain/data"),
    lambda: storage.read_bytes("s3://retrain/x.json"),
    lambda: storage.write_bytes("s3://retrain/x.json", b"{}"),
    lambda: storage.exists("s3://retrain/x.json"),
    lambda: storage.delete("s3://retrain/x.json"),
], ids=["list_files", "read_bytes", "write_bytes", "exists", "delete"])
def test_unreachable_s3_names_s3_its_endpoint_and_the_uri(dead_s3, call):
    with pytest.raises(storage.StorageUnavailable) as raised:
        call()
    message = str(raised.value)
    assert message.startswith(f"S3 is unreachable at {dead_s3} (") and "s3://retrain/" in message
    assert not isinstance(raised.value, storage.StorageError)  # StorageError is bad input: no retry


def test_local_errors_are_unchanged(tmp_path):
    with pytest.raises(storage.StorageError):
        storage.read_bytes((tmp_path / "missing").as_uri())
