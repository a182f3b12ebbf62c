"""The s3-ceph image (images/s3-ceph) is a real S3 server: boto3 from outside the container, through a
published port, as the stack's services use it.

The container is started the way compose starts it (credentials and buckets from the environment only)
and awaited through the image's own healthcheck, then: the buckets from S3_BUCKETS exist; put, get and a
listing forced into pages; a multipart upload; a presigned GET with no credentials; wrong or unknown
credentials and anonymous reads are refused with 403; a clean restart keeps the objects; a killed
container comes back serving the same user and buckets (the in-memory OSD's objects are gone).

Needs Docker and the image: ``docker build -f images/s3-ceph/Dockerfile -t retrain/s3-ceph:dev .``
(``RETRAIN_S3_CEPH_IMAGE`` names another tag).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from retrain.waiting import poll

pytestmark = pytest.mark.containers

IMAGE = os.environ.get("RETRAIN_S3_CEPH_IMAGE", "retrain/s3-ceph:dev")
BUCKETS = ("retrain", "mlflow")
STARTUP_LIMIT_S = 60  # the whole cluster, user and buckets; it is a few seconds in practice


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


@dataclass
class S3Ceph:
    container: str
    access_key: str
    secret_key: str
    startup_s: float = 0.0  # from `docker run` to the healthcheck's first pass

    def logs(self) -> str:
        proc = docker("logs", self.container, check=False)
        return proc.stdout + proc.stderr

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.container).stdout)

    @property
    def endpoint(self) -> str:
        # an ephemeral host port chosen by Docker (no race for a free port); a restart may change it
        host_port = docker("port", self.container, "9000/tcp").stdout.splitlines()[0].strip()
        return f"http://{host_port}"

    def wait_healthy(self, timeout_s: float = STARTUP_LIMIT_S) -> float:
        """Seconds until the image's healthcheck passes; fails at once if the container stops."""
        started = time.monotonic()

        def healthy() -> bool:
            state = self.state()
            if not state["Running"]:
                pytest.fail(f"the container exited ({state['ExitCode']}):\n{self.logs()}")
            return state.get("Health", {}).get("Status") == "healthy"

        poll(healthy, timeout_s=timeout_s, interval_s=0.2,
             on_timeout=lambda: AssertionError(f"not healthy after {timeout_s} s:\n{self.logs()}"))
        return time.monotonic() - started

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}, signature_version="s3v4"),
        )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Ceph]:
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("needs a Docker engine: .ci/docker-engine installs and starts one")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"needs the image {IMAGE}: docker build -f images/s3-ceph/Dockerfile -t {IMAGE} .")
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    started = time.monotonic()
    container = docker(
        "run", "-d", "-p", "127.0.0.1::9000",
        "-e", f"S3_ACCESS_KEY={access_key}", "-e", f"S3_SECRET_KEY={secret_key}", "-e", f"S3_BUCKETS={' '.join(BUCKETS)}",
        # the image's healthcheck command, probed more often than its 5 s interval so the test starts sooner
        "--health-interval", "1s", IMAGE,
    ).stdout.strip()
    server = S3Ceph(container, access_key, secret_key)
    try:
        server.wait_healthy()
        server.startup_s = time.monotonic() - started
        yield server
    finally:
        docker("rm", "-f", "-v", container, check=False)


def test_starts_healthy_quickly_as_a_non_root_user(s3):
    assert s3.startup_s < STARTUP_LIMIT_S
    ready = re.search(r"s3-ceph: ready after ([\d.]+)s", s3.logs())
    assert ready, s3.logs()
    config = json.loads(docker("inspect", "--format", "{{json .Config}}", s3.container).stdout)
    assert config["User"] == "ceph"
    assert config["Healthcheck"]["Test"] == ["CMD", "s3-ceph-healthcheck"]
    assert docker("exec", s3.container, "id", "-u").stdout.strip() != "0"
    # nothing secret in the image or its configuration: the keys exist only in this container's environment
    assert s3.secret_key not in json.dumps(json.loads(docker("image", "inspect", IMAGE).stdout))
    print(f"\ns3-ceph healthy {s3.startup_s:.1f} s after docker run (entrypoint ready after {ready[1]} s)")


def test_buckets_from_the_environment_exist(s3):
    names = {bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]}
    assert names == set(BUCKETS)


def test_put_get_and_paginated_list(s3):
    client = s3.client()
    keys = [f"data/part-{i}.bin" for i in range(5)]
    bodies = {key: secrets.token_bytes(1000 + i) for i, key in enumerate(keys)}
    for key, body in bodies.items():
        client.put_object(Bucket="retrain", Key=key, Body=body)
    client.put_object(Bucket="retrain", Key="elsewhere/x", Body=b"x")

    for key, body in bodies.items():
        got = client.get_object(Bucket="retrain", Key=key)
        assert got["Body"].read() == body
        assert got["ContentLength"] == len(body)

    # MaxKeys=2 forces ListObjectsV2 into pages: 2 + 2 + 1, each continuing from the last
    listed, pages, token = [], 0, None
    while True:
        kwargs = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket="retrain", Prefix="data/", MaxKeys=2, **kwargs)
        pages += 1
        listed += [item["Key"] for item in page.get("Contents", [])]
        assert len(page.get("Contents", [])) <= 2
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert pages == 3
    assert listed == sorted(keys)

    # boto3's paginator (what the project's storage code uses), and delimiter listing
    paginator = client.get_paginator("list_objects_v2")
    paged = [item["Key"] for page in paginator.paginate(Bucket="retrain", PaginationConfig={"PageSize": 2})
             for item in page.get("Contents", [])]
    assert paged == sorted([*keys, "elsewhere/x"])
    top = client.list_objects_v2(Bucket="retrain", Delimiter="/")
    assert sorted(p["Prefix"] for p in top["CommonPrefixes"]) == ["data/", "elsewhere/"]

    client.delete_object(Bucket="retrain", Key="elsewhere/x")
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket="retrain", Key="elsewhere/x")


def test_multipart_upload(s3):
    client = s3.client()
    parts = [secrets.token_bytes(5 * 1024 * 1024), secrets.token_bytes(123_457)]  # every part but the last >= 5 MiB
    upload = client.create_multipart_upload(Bucket="mlflow", Key="artifacts/model.bin")
    etags = []
    for number, body in enumerate(parts, start=1):
        etags.append(client.upload_part(Bucket="mlflow", Key="artifacts/model.bin", UploadId=upload["UploadId"],
                                        PartNumber=number, Body=body)["ETag"])
    assert [p["PartNumber"] for p in client.list_parts(Bucket="mlflow", Key="artifacts/model.bin",
                                                       UploadId=upload["UploadId"])["Parts"]] == [1, 2]
    done = client.complete_multipart_upload(
        Bucket="mlflow", Key="artifacts/model.bin", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]})
    # a multipart object's ETag is "<md5 of the parts' md5s>-<parts>" (radosgw 16 leaves it out of the
    # completion's body; HEAD has it)
    assert done["Key"] == "artifacts/model.bin"
    assert client.head_object(Bucket="mlflow", Key="artifacts/model.bin")["ETag"].strip('"').endswith("-2")
    got = client.get_object(Bucket="mlflow", Key="artifacts/model.bin")["Body"].read()
    assert got == b"".join(parts)
    # a ranged read across the part boundary
    boundary = len(parts[0])
    ranged = client.get_object(Bucket="mlflow", Key="artifacts/model.bin", Range=f"bytes={boundary - 10}-{boundary + 9}")
    assert ranged["Body"].read() == parts[0][-10:] + parts[1][:10]

    # boto3's managed transfer (what upload_file does above its threshold) goes the same way
    from boto3.s3.transfer import TransferConfig

    blob = secrets.token_bytes(11 * 1024 * 1024)
    client.upload_fileobj(io.BytesIO(blob), "mlflow", "artifacts/managed.bin",
                          Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024))
    assert client.head_object(Bucket="mlflow", Key="artifacts/managed.bin")["ContentLength"] == len(blob)


def test_presigned_get_and_anonymous_refusal(s3):
    client = s3.client()
    client.put_object(Bucket="retrain", Key="shared/report.txt", Body=b"presigned hello")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "retrain", "Key": "shared/report.txt"},
                                        ExpiresIn=300)
    with urllib.request.urlopen(url, timeout=10) as resp:  # no credentials: the signature in the URL only
        assert resp.status == 200
        assert resp.read() == b"presigned hello"

    # the same object without the signature, and the URL with its signature altered: refused
    forged = re.sub(r"X-Amz-Signature=[0-9a-f]+", "X-Amz-Signature=" + "0" * 64, url)
    assert forged != url
    for bad in (url.split("?", 1)[0], forged):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 403


def test_wrong_credentials_are_refused(s3):
    from botocore.exceptions import ClientError

    cases = {
        "SignatureDoesNotMatch": s3.client(secret_key=s3.secret_key + "x"),
        "InvalidAccessKeyId": s3.client(access_key="AKNOSUCHKEY0000000", secret_key=s3.secret_key),
    }
    for code, client in cases.items():
        for call in (lambda client=client: client.list_objects_v2(Bucket="retrain"),
                     lambda client=client: client.put_object(Bucket="retrain", Key="intruder", Body=b"x"),
                     client.list_buckets):
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
            assert refused.value.response["Error"]["Code"] == code
    with pytest.raises(s3.client().exceptions.NoSuchKey):
        s3.client().get_object(Bucket="retrain", Key="intruder")


def test_a_clean_restart_keeps_the_objects(s3):
    s3.client().put_object(Bucket="retrain", Key="kept/after-restart", Body=b"still here")
    docker("stop", s3.container)  # SIGTERM: the gateway, the OSD (which saves its memory) and the monitor stop
    assert s3.state()["ExitCode"] == 0, s3.logs()
    docker("start", s3.container)
    s3.wait_healthy()
    client = s3.client()
    assert client.get_object(Bucket="retrain", Key="kept/after-restart")["Body"].read() == b"still here"
    assert client.head_object(Bucket="mlflow", Key="artifacts/model.bin")["ContentLength"] == 5 * 1024 * 1024 + 123_457
    assert "restarting the cluster" in s3.logs()


def test_a_killed_container_comes_back_with_its_user_and_buckets_but_not_its_objects(s3):
    docker("kill", s3.container)  # no clean stop: the in-memory OSD could not save
    docker("start", s3.container)
    s3.wait_healthy()
    assert "the last stop was not clean" in s3.logs()
    client = s3.client()
    assert {bucket["Name"] for bucket in client.list_buckets()["Buckets"]} == set(BUCKETS)
    assert client.list_objects_v2(Bucket="retrain").get("KeyCount") == 0
    client.put_object(Bucket="retrain", Key="fresh", Body=b"new")
    assert client.get_object(Bucket="retrain", Key="fresh")["Body"].read() == b"new"
