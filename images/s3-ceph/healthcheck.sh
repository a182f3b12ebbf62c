#!/bin/sh
# The compose healthcheck: 0 once the entrypoint is ready and every bucket in $S3_BUCKETS answers a signed HEAD.
exec python3 /usr/local/lib/s3-ceph/s3ctl.py health
