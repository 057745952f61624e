"""Air-gap bundles with real clients: `mirror export` on the connected side (pulling through a token-auth
distribution registry playing Docker Hub), `mirror import` into a mirror process with no upstream at all,
and Docker Engine (registry-mirrors), containerd (hosts.toml, ?ns=) and skopeo (path prefix, oci:,
oci-archive:) on the far side. Docker Hub itself is blackholed by the harness, and the upstream is stopped
before anything is pulled: only the imported copy can answer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.dockerd import DockerDaemon, write_hosts_dir
from tests.support.fixtures import DockerDaemonFactory, ImageFactory, MirrorFactory, RegistryFactory
from tests.support.images import BuiltImage, layout_digests
from tests.support.mirror_proc import REPO_ROOT, MirrorProcess
from tests.support.procs import offline_env
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real]

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def mirror_cli(*args: str | Path, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ...` from this checkout, as an operator runs it."""
    env = offline_env()
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mirror", *map(str, args)], env=env, cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def manifest_status(mirror: MirrorProcess, path: str) -> int:
    request = urllib.request.Request(f"{mirror.url}/v2/{path}", headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def airgapped_mirror(mirror_factory: MirrorFactory, tmp_path: Path) -> MirrorProcess:
    """A mirror with no upstream at all (a plain registry: every name is local)."""
    return mirror_factory({"storage": {"path": str(tmp_path / "airgap-data")}})


@pytest.mark.slow
@pytest.mark.needs_tools("dockerd", "docker", "ctr", "skopeo", "docker-registry")
def test_docker_and_containerd_pull_and_run_an_imported_image_from_a_mirror_without_upstream(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    docker_daemon_factory: DockerDaemonFactory,
    busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
    image_factory: ImageFactory,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    hub = registry_factory.token_auth(token_server)  # plays Docker Hub; stopped before any pull
    single, multi, schema2 = unique_repo("library/bb"), unique_repo("library/multi"), unique_repo("team/dk")
    docker_image = image_factory.busybox(seed=7, media="docker", marker="docker-schema2-stays")
    hub.push(busybox_image, f"{single}:1")
    hub.push(multiarch_image, f"{multi}:1")
    hub.push(docker_image, f"{schema2}:1")
    short_single, short_multi = single.split("/", 1)[1], multi.split("/", 1)[1]

    connected = write_config(tmp_path / "connected.yml", {
        "storage": {"path": str(tmp_path / "connected-data")},
        "upstreams": [{"name": "docker.io", "url": hub.url, "default": True, "timeout": "10s"}],
    })
    bundle = tmp_path / "media" / "bundle.tar"
    exported = mirror_cli("export", "--config", connected, f"{short_single}:1", f"docker.io/{multi}:1",
                          f"{schema2}:1", "--to", bundle, "--split", "1MB")
    assert exported.returncode == 0, exported.stderr
    assert f"docker.io/{single}:1\t{busybox_image.digest}" in exported.stdout
    hub.stop()

    mirror = airgapped_mirror(mirror_factory, tmp_path)
    # A damaged copy of the media first: refused, exit 1, and the running mirror shows none of it.
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle.parent, damaged)
    piece = sorted(damaged.glob("bundle.tar.0*"))[-1]
    data = bytearray(piece.read_bytes())
    data[len(data) // 3] ^= 0x20
    piece.write_bytes(bytes(data))
    refused = mirror_cli("import", "--config", mirror.config_path, damaged / "bundle.tar")
    assert refused.returncode == 1 and f"piece {piece.name} is damaged" in refused.stderr, refused.stderr
    assert manifest_status(mirror, f"{single}/manifests/1") == 404

    # The real one, into the running mirror's data directory.
    imported = mirror_cli("import", "--config", mirror.config_path, bundle)
    assert imported.returncode == 0, imported.stderr
    assert f"served as {single}" in imported.stdout

    daemon = docker_daemon_factory(mirror.url)  # registry-mirrors: Docker asks for library/<name>
    # Docker media types travel byte for byte: the schema 2 image keeps its digest.
    for name, image in ((f"{short_single}:1", busybox_image), (f"{short_multi}:1", multiarch_image),
                        (f"{schema2}:1", docker_image)):
        daemon.docker("pull", name)
        digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", name).stdout
        assert f"@{image.digest}" in digests.decode(), digests
        assert image.marker in daemon.run_image(name)

    hosts = write_hosts_dir(tmp_path / "hosts", mirror.url, "docker.io")  # containerd sends ?ns=docker.io
    namespace = "t" + single.rsplit("-", 1)[1]
    daemon.ctr_pull(f"docker.io/{single}:1", hosts, namespace=namespace)
    listing = daemon.ctr("images", "ls", namespace=namespace).stdout.decode()
    assert re.search(rf"docker\.io/{re.escape(single)}:1\s+\S+\s+{busybox_image.digest}", listing), listing
    content = daemon.ctr("content", "ls", "--quiet", namespace=namespace).stdout.decode().split()
    assert set(busybox_image.host_manifest.blob_digests) <= set(content)

    raw = skopeo.inspect_raw(f"docker://{mirror.host}/docker.io/{multi}:1")  # a path-prefix client
    assert skopeo.sha256_of(raw) == multiarch_image.digest


@pytest.mark.needs_tools("skopeo", "docker-registry", "dockerd", "ctr")
def test_skopeo_reads_bundles_and_skopeo_made_layouts_import(
    open_registry: DistributionRegistry,
    mirror_factory: MirrorFactory,
    docker_daemon: DockerDaemon,
    busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    app, multi = unique_repo("owner/app"), unique_repo("owner/multi")
    open_registry.push(busybox_image, f"{app}:1")
    open_registry.push(multiarch_image, f"{multi}:1")
    connected = write_config(tmp_path / "connected.yml", {
        "storage": {"path": str(tmp_path / "connected-data")},
        "upstreams": [{"name": "ghcr.io", "url": open_registry.url, "timeout": "10s"}],  # by prefix only
    })
    folder, archive = tmp_path / "bundle", tmp_path / "bundle.tar"
    for target in (folder, archive):
        result = mirror_cli("export", "--config", connected, f"ghcr.io/{app}:1", f"ghcr.io/{multi}:1", "--to", target)
        assert result.returncode == 0, result.stderr

    # skopeo copies images out of both forms by their full names.
    for n, (source, image) in enumerate([
        (f"oci:{folder}:ghcr.io/{app}:1", busybox_image),
        (f"oci:{folder}:ghcr.io/{multi}:1", multiarch_image),
        (f"oci-archive:{archive}:ghcr.io/{multi}:1", multiarch_image),
    ]):
        out = tmp_path / f"out-{n}"
        skopeo.copy(source, f"oci:{out}:copied")
        assert layout_digests(out, "copied") == image.all_digests, source

    # Layouts skopeo wrote: one with full names, an archive with a bare tag (named on import).
    made_by_skopeo = tmp_path / "skopeo-layout"
    skopeo.copy(f"docker://{open_registry.host}/{multi}:1", f"oci:{made_by_skopeo}:ghcr.io/{multi}:2")
    bare_archive = tmp_path / "skopeo.tar"
    skopeo.copy(f"docker://{open_registry.host}/{app}:1", f"oci-archive:{bare_archive}:1")

    mirror = airgapped_mirror(mirror_factory, tmp_path)
    unnamed = mirror_cli("import", "--config", mirror.config_path, bare_archive)
    assert unnamed.returncode == 1 and "--repository" in unnamed.stderr, unnamed.stderr
    for args in ([made_by_skopeo], ["--repository", "team/app", bare_archive], [archive]):
        result = mirror_cli("import", "--config", mirror.config_path, *args)
        assert result.returncode == 0, result.stderr

    for ref, image in [
        (f"ghcr.io/{multi}:2", multiarch_image),
        (f"ghcr.io/{multi}:1", multiarch_image),
        (f"ghcr.io/{app}:1", busybox_image),
        ("team/app:1", busybox_image),
    ]:
        raw = skopeo.inspect_raw(f"docker://{mirror.host}/{ref}")
        assert skopeo.sha256_of(raw) == image.digest, ref

    # containerd asking with ?ns=ghcr.io finds the imported copy.
    hosts = write_hosts_dir(tmp_path / "hosts", mirror.url, "ghcr.io")
    namespace = "t" + app.rsplit("-", 1)[1]
    docker_daemon.ctr_pull(f"ghcr.io/{app}:1", hosts, namespace=namespace)
    listing = docker_daemon.ctr("images", "ls", namespace=namespace).stdout.decode()
    assert re.search(rf"ghcr\.io/{re.escape(app)}:1\s+\S+\s+{busybox_image.digest}", listing), listing
    docker_daemon.ctr("images", "rm", f"ghcr.io/{app}:1", namespace=namespace)
