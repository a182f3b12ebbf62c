"""Build the project's container images, in order, the same way everywhere but for the base layers.

``python -m localdev.images build`` (``make images``) builds:

| image | Dockerfile (target / build arguments) | on |
|---|---|---|
| ``retrain/base:python`` | images/base (python) | ``PYTHON_BASE`` |
| ``retrain/base:torch`` | images/base (torch) | ``PYTHON_BASE`` + PyTorch |
| ``retrain/embedder-trainer``, ``retrain/embedder-server`` | images/embedder (trainer, server) | base:torch |
| ``retrain/airflow`` | images/airflow (RUNNER=kubernetes) | base:python |
| ``retrain/airflow-compose`` | images/airflow (RUNNER=local) | base:torch |
| ``retrain/mlflow`` | images/mlflow | base:python |
| ``retrain/postgres`` | images/postgres | ``DEBIAN_BASE`` |
| ``retrain/s3-ceph`` (with ``--ceph``) | images/s3-ceph | ``DEBIAN_BASE`` |

``PYTHON_BASE`` and ``DEBIAN_BASE`` are what users pull (pinned by tag and digest in the Dockerfiles).
With ``--local-bases``, which CI uses because no registry can be reached here, they are made from
Debian's own packages instead (``debootstrap --variant=minbase bookworm``, imported as an image, plus
Debian's python3.11): the same distribution and Python minor version; the only other difference is
where PyTorch comes from (``--torch-index-url``; PyTorch's CPU index is not reachable here either).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_DEBIAN = "retrain-local/debian:bookworm"
LOCAL_PYTHON = "retrain-local/python:3.11-bookworm"
PYPI = "https://pypi.org/simple"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's; includes a TLS-intercepting proxy's CA where one is installed


@dataclass(frozen=True)
class Image:
    tag: str
    dockerfile: str
    target: str | None = None
    args: dict[str, str] = field(default_factory=dict)


def images(version: str, ceph: bool) -> list[Image]:
    """Every image, in build order (an image's base is built before it)."""
    built = [
        Image("retrain/base:python", "images/base/Dockerfile", "python"),
        Image("retrain/base:torch", "images/base/Dockerfile", "torch"),
        Image(f"retrain/embedder-trainer:{version}", "images/embedder/Dockerfile", "trainer"),
        Image(f"retrain/embedder-server:{version}", "images/embedder/Dockerfile", "server"),
        Image(f"retrain/airflow:{version}", "images/airflow/Dockerfile"),
        Image(f"retrain/airflow-compose:{version}", "images/airflow/Dockerfile",
              args={"AIRFLOW_BASE": "retrain/base:torch", "RUNNER": "local"}),
        Image(f"retrain/mlflow:{version}", "images/mlflow/Dockerfile"),
        Image(f"retrain/postgres:{version}", "images/postgres/Dockerfile"),
    ]
    if ceph:
        built.append(Image(f"retrain/s3-ceph:{version}", "images/s3-ceph/Dockerfile"))
    return built


def docker_cli() -> str:
    """A Docker client that builds with BuildKit: ``docker`` with its buildx plugin, or a client older than 23
    (which has BuildKit built in, as Debian's docker.io does) when there is no buildx; ``$DOCKER_CLI`` wins."""
    if os.environ.get("DOCKER_CLI"):
        return os.environ["DOCKER_CLI"]
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return "docker"
    for candidate in ("/usr/bin/docker", shutil.which("docker") or "docker"):
        out = subprocess.run([candidate, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().split(".")[0].isdigit() and int(out.stdout.split(".")[0]) < 23:
            return candidate
    raise SystemExit("no Docker client here builds with BuildKit: install the buildx plugin, or set DOCKER_CLI")


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([docker_cli(), *args], check=True, **kwargs)


def image_exists(tag: str) -> bool:
    return subprocess.run([docker_cli(), "image", "inspect", tag], capture_output=True).returncode == 0


def make_local_bases() -> None:
    """The Debian and Python bases, made from Debian's packages (once; reused while they exist)."""
    if not image_exists(LOCAL_DEBIAN):
        with tempfile.TemporaryDirectory(prefix="bookworm-") as root:
            print(f"   debootstrap bookworm (minbase) into {root}", flush=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian"],
                           check=True, stdout=subprocess.DEVNULL)
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            docker("import", "--change", 'CMD ["bash"]', "-", LOCAL_DEBIAN, stdin=tar.stdout, stdout=subprocess.DEVNULL)
            tar.wait()
    if not image_exists(LOCAL_PYTHON):
        dockerfile = (f"FROM {LOCAL_DEBIAN}\n"
                      "RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv "
                      "python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*\n"
                      "ENV LANG=C.UTF-8\n")
        docker("build", "-t", LOCAL_PYTHON, "-", input=dockerfile.encode(), stdout=subprocess.DEVNULL)


def build(version: str, local_bases: bool, torch_index_url: str | None, ceph: bool,
          ca_bundle: str | None = None) -> dict[str, float]:
    """Build every image; returns the seconds each took."""
    common = ["--build-arg", f"CODE_VERSION={code_version()}"]
    if ca_bundle:
        common += ["--secret", f"id=ca,src={ca_bundle}"]
    if local_bases:
        make_local_bases()
        common += ["--build-arg", f"PYTHON_BASE={LOCAL_PYTHON}", "--build-arg", f"DEBIAN_BASE={LOCAL_DEBIAN}"]
    if torch_index_url:
        common += ["--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
    took = {}
    for image in images(version, ceph):
        started = time.monotonic()
        cmd = ["build", "-f", image.dockerfile, "-t", image.tag, *common]
        if image.target:
            cmd += ["--target", image.target]
        for key, value in image.args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        docker(*cmd, str(REPO), env={**os.environ, "DOCKER_BUILDKIT": "1"})
        took[image.tag] = time.monotonic() - started
        print(f"   built {image.tag} in {took[image.tag]:.0f}s ({size_mb(image.tag):.0f} MB)", flush=True)
    return took


def registry_reachable(url: str = "https://registry-1.docker.io/v2/") -> bool:
    """Whether Docker Hub answers (401 without credentials is an answer): decides OFFLINE in ``make images``."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def size_mb(tag: str) -> float:
    out = docker("image", "inspect", "--format", "{{.Size}}", tag, capture_output=True, text=True).stdout
    return int(out.strip()) / 1e6


def code_version() -> str:
    git = shutil.which("git")
    if not git:
        return "unknown"
    proc = subprocess.run([git, "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.images", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "local-bases", "sizes", "registry-reachable"))
    parser.add_argument("--version", default=os.environ.get("RETRAIN_IMAGE_TAG", "dev"), help="tag of the images")
    parser.add_argument("--local-bases", action="store_true",
                        help="make the Debian and Python bases from Debian's packages (no registry needed)")
    parser.add_argument("--torch-index-url", default=None,
                        help=f"where PyTorch comes from (default: the Dockerfile's, PyTorch's CPU index; {PYPI}: CUDA)")
    parser.add_argument("--ceph", action="store_true", help="also build the Ceph S3 server image (offline S3)")
    parser.add_argument("--ca-bundle", default=os.environ.get("PIP_CERT"),
                        help="a CA bundle pip must trust (a TLS-intercepting proxy); passed as a build secret")
    parser.add_argument("--offline", action="store_true",
                        help="no registry and no PyTorch index (CI here): --local-bases --ceph, PyTorch from PyPI, "
                             f"and the host's CA bundle ({HOST_CA_BUNDLE}) trusted")
    args = parser.parse_args(argv)
    if args.offline:
        args.local_bases, args.ceph = True, True
        args.torch_index_url = args.torch_index_url or PYPI
        if not args.ca_bundle and Path(HOST_CA_BUNDLE).is_file():
            args.ca_bundle = HOST_CA_BUNDLE
    if args.action == "registry-reachable":
        return 0 if registry_reachable() else 1
    if args.action == "local-bases":
        make_local_bases()
    elif args.action == "build":
        build(args.version, args.local_bases, args.torch_index_url, args.ceph, args.ca_bundle)
    for image in images(args.version, args.ceph):
        if image_exists(image.tag):
            print(f"{image.tag}: {size_mb(image.tag):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
