"""The S3 side of the s3-ceph image, with Python's standard library only (no boto3 in the image).

    s3ctl.py ping            exit 0 once the gateway answers HTTP on :9000
    s3ctl.py create-buckets  create $S3_BUCKETS for $S3_ACCESS_KEY (existing ones are kept)
    s3ctl.py health          exit 0 when the entrypoint said ready and every bucket in $S3_BUCKETS
                             answers a signed HEAD with 200 (the compose healthcheck)

Requests are signed with AWS Signature Version 4, as any S3 client signs them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import sys
import urllib.error
import urllib.request

ENDPOINT = "http://127.0.0.1:9000"
REGION = "us-east-1"
READY = "/var/lib/ceph/run/ready"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def request(method: str, path: str) -> int:
    """A SigV4-signed request with an empty body; returns the HTTP status."""
    access, secret = os.environ["S3_ACCESS_KEY"], os.environ["S3_SECRET_KEY"]
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    host = ENDPOINT.split("://", 1)[1]
    headers = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, EMPTY_SHA256])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), day), REGION), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, Signature={signature}"
    del headers["host"]
    req = urllib.request.Request(ENDPOINT + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def buckets() -> list[str]:
    return os.environ.get("S3_BUCKETS", "").split()


def ping() -> int:
    try:
        with urllib.request.urlopen(ENDPOINT + "/", timeout=2) as resp:
            resp.read()
            return 0
    except urllib.error.HTTPError:
        return 0  # any HTTP answer: the gateway is serving
    except OSError:
        return 1


def create_buckets() -> int:
    for bucket in buckets():
        status = request("PUT", f"/{bucket}")
        if status == 409 and request("HEAD", f"/{bucket}") == 200:
            status = 200  # ours already (BucketAlreadyOwnedByYou)
        if status != 200:
            print(f"s3-ceph: creating bucket {bucket} failed: HTTP {status}", file=sys.stderr)
            return 1
    return 0


def health() -> int:
    if not os.path.exists(READY):
        return 1
    try:
        return 0 if all(request("HEAD", f"/{bucket}") == 200 for bucket in buckets()) and ping() == 0 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    actions = {"ping": ping, "create-buckets": create_buckets, "health": health}
    if len(sys.argv) != 2 or sys.argv[1] not in actions:
        sys.exit(f"usage: s3ctl.py {{{'|'.join(actions)}}}")
    sys.exit(actions[sys.argv[1]]())
