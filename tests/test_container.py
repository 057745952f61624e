"""Issue #11: the Dockerfile builds with Debian's Docker Engine, runs as a non-root user, reports healthy
through its HEALTHCHECK, serves a pull to a real Docker daemon, and drains on SIGTERM.

No registry is needed for the base: `debootstrap --variant=minbase bookworm` from the Debian mirror apt
already uses, then `docker import` as debian:bookworm-slim. The tarball is cached between runs
(MIRROR_TEST_CACHE, default /var/cache/mirror-tests), so only the first run pays for debootstrap. The
building daemon uses overlay2: with vfs every build step copies the whole file system (7 minutes here,
against under one with overlay2).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.dockerd import DockerDaemon
from tests.support.fixtures import DockerDaemonFactory, RegistryFactory
from tests.support.images import BuiltImage
from tests.support.procs import free_port, require_tool, run, wait_http
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MIRROR_TEST_CACHE", "/var/cache/mirror-tests"))
BASE_TAR = CACHE / "debian-bookworm-minbase.tar"
BASE_IMAGE = "debian:bookworm-slim"
IMAGE = "mirror:test"


def debian_mirror() -> str:
    """The Debian mirror apt on this machine already uses (never a host written into the project)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text(errors="replace")
        for match in re.finditer(r"^(?:URIs:\s*(\S+)|deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s)", text, re.M):
            uri = match.group(1) or match.group(2)
            if uri and "security" not in uri and "debian" in uri:
                return uri
    pytest.fail("no Debian mirror found in apt's sources")


def base_tarball() -> Path:
    if BASE_TAR.exists():
        return BASE_TAR
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / "bookworm-minbase"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    run([require_tool("debootstrap"), "--variant=minbase", "bookworm", str(root), debian_mirror()],
        timeout=900, what="debootstrap")
    partial = BASE_TAR.with_suffix(".partial")
    run(["tar", "-C", str(root), "-cf", str(partial), "."], timeout=300, what="tar")
    partial.rename(BASE_TAR)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    return BASE_TAR


def import_base(daemon: DockerDaemon) -> None:
    if daemon.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    with open(base_tarball(), "rb") as tarball:
        subprocess.run([require_tool("docker"), "import", "-", BASE_IMAGE], stdin=tarball, env=daemon.client_env(),
                       check=True, capture_output=True, timeout=600)


def health(daemon: DockerDaemon, container: str) -> str:
    out = daemon.docker("inspect", "--format", "{{json .State}}", container).stdout
    state = json.loads(out)
    return (state.get("Health") or {}).get("Status", "none")


@pytest.mark.needs_tools("dockerd", "docker", "debootstrap", "skopeo", "docker-registry")
def test_the_image_builds_runs_healthy_as_non_root_serves_a_pull_and_drains_on_sigterm(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    docker_daemon_factory: DockerDaemonFactory,
    busybox_image: BuiltImage,
    tmp_path: Path,
) -> None:
    builder = docker_daemon_factory(storage_driver="overlay2")
    import_base(builder)
    # The host's own environment (pip must reach the package index for the wheels), with this daemon.
    env = {**os.environ, "DOCKER_HOST": builder.host}
    run([str(ROOT / "scripts" / "build-image"), IMAGE], env=env, timeout=1200, what="scripts/build-image")

    upstream = registry_factory.token_auth(token_server)
    upstream.push(busybox_image, "library/boxed:1")
    port = free_port()
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "upstreams": [{"name": "docker.io", "url": upstream.url, "default": True}],
    }))
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)  # the image's user owns its volume, as `docker volume` would arrange
    container = "mirror-under-test"
    builder.docker("rm", "-f", container, check=False)
    builder.docker(
        "run", "-d", "--name", container, "--network", "host",
        "-v", f"{config_dir}:/etc/mirror:ro", "-v", f"{data}:/var/lib/mirror/data",
        "-e", "MIRROR_CONFIG=/etc/mirror/config.yaml", IMAGE,
    )
    try:
        deadline = time.monotonic() + 90
        while (status := health(builder, container)) != "healthy":
            assert status in ("starting", "none"), builder.docker("logs", container).stderr.decode()
            assert time.monotonic() < deadline, "the container never became healthy"
            time.sleep(1)
        inspect = json.loads(builder.docker("inspect", IMAGE).stdout)[0]["Config"]
        assert inspect["User"] == "mirror" and "5000/tcp" in inspect["ExposedPorts"]
        assert inspect["Healthcheck"]["Test"][0] == "CMD"  # exec form: no shell in the way
        assert "/var/lib/mirror/data" in inspect["Volumes"]
        uid = builder.docker("exec", container, "id", "-u").stdout.decode().strip()
        assert uid == "10001"
        # The s3 extra is in the image: a cluster node on a bucket runs this same image. A bucket that
        # does not answer is then the complaint, not a missing library.
        (config_dir / "s3.yaml").write_text(yaml.safe_dump({"storage": {"backend": "s3", "s3": {
            "bucket": "mirror-check", "endpoint": f"http://127.0.0.1:{free_port()}",
            "access_key": "k", "secret_key": "s",
        }}}))
        checked = builder.docker("exec", container, "mirror", "check-config", "--config", "/etc/mirror/s3.yaml",
                                 check=False)
        assert b"does not answer" in checked.stderr and b"s3 extra" not in checked.stderr, checked.stderr
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=20, ready=lambda s: s == 200)

        # A second Docker Engine pulls through the container as its registry mirror, and runs the image.
        puller = docker_daemon_factory(f"http://127.0.0.1:{port}")
        puller.docker("pull", "boxed:1", timeout=180)
        assert busybox_image.marker in puller.run_image("boxed:1")
        assert any(p.is_file() for p in (data / "blobs").rglob("*")), "the blobs live on the volume"

        # SIGTERM (docker stop): the server drains and exits 0 within the grace, well before the SIGKILL.
        started = time.monotonic()
        builder.docker("stop", "--time", "20", container, timeout=60)
        assert time.monotonic() - started < 15
        state = json.loads(builder.docker("inspect", "--format", "{{json .State}}", container).stdout)
        assert state["ExitCode"] == 0, builder.docker("logs", container).stderr.decode()[-3000:]
    finally:
        builder.docker("rm", "-f", container, check=False)
