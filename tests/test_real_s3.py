"""The private registry on S3 with real clients: a `mirror serve` process whose blob bytes live in a bucket
of the session's Ceph RGW. skopeo round-trips a multi-arch image byte for byte; Docker Engine pushes, and
pulls through 307 redirects to presigned bucket URLs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.oci.digest import Digest
from mirror.storage.s3 import S3BlobBackend, S3Settings
from tests.support import skopeo
from tests.support.fixtures import DockerDaemonFactory, ImageFactory, MirrorFactory
from tests.support.images import BuiltImage
from tests.support.rgw import RadosGateway, new_bucket
from tests.test_real_registry import (
    EXTRA_LAYERS,
    Http,
    assert_round_trip,
    check_headers,
    docker_pull_and_run,
    docker_push,
)


def bucket_digests(s3: dict[str, Any]) -> set[str]:
    async def listing() -> set[str]:
        backend = await S3BlobBackend.open(S3Settings(
            bucket=s3["bucket"], endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"],
        ))
        try:
            return {str(digest) async for digest in backend.list()}
        finally:
            await backend.close()

    return asyncio.run(listing())


def files_on_disk(data: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (data / "blobs").rglob("*") if p.is_file()}


@pytest.mark.real
@pytest.mark.needs_tools("skopeo")
def test_skopeo_round_trip_with_blob_bytes_in_s3(
    tmp_path: Path,
    rgw: RadosGateway,
    mirror_factory: MirrorFactory,
    image_factory: ImageFactory,
    unique_repo: Callable[..., str],
) -> None:
    s3 = asyncio.run(new_bucket(rgw))
    data = tmp_path / "data"
    mirror = mirror_factory({"storage": {"path": str(data), "backend": "s3", "s3": s3}})
    image = image_factory.multiarch(seed=41, extra_layers=list(EXTRA_LAYERS), media="oci")
    repo = unique_repo("team/app")

    skopeo.copy(image.ref, f"docker://{mirror.host}/{repo}:1.0")
    blobs = {digest for manifest in image.manifests for digest in manifest.blob_digests}
    manifests = {image.digest, *(m.digest for m in image.manifests)}
    # Every config, layer and manifest is in the bucket (what lets other nodes on it serve the image) ...
    assert blobs | manifests <= bucket_digests(s3)
    assert files_on_disk(data) == set()  # ... and none of the push on the node's disk

    pulled = tmp_path / "pulled"
    skopeo.copy(f"docker://{mirror.host}/{repo}:1.0", f"oci:{pulled}:1.0")
    assert_round_trip(image, pulled, mirror, repo, "1.0")
    check_headers(mirror, repo, image)
    # What the pull read from the bucket is then copied to the node's disk (the disk tier), blobs only.
    deadline = time.monotonic() + 30
    while files_on_disk(data) != blobs:
        assert files_on_disk(data) <= blobs
        assert time.monotonic() < deadline, f"disk tier holds {files_on_disk(data)}, not every blob pulled"
        time.sleep(0.1)


@pytest.mark.real
@pytest.mark.needs_tools("skopeo", "dockerd", "docker")
def test_docker_pulls_through_presigned_redirects_to_the_bucket(
    tmp_path: Path,
    rgw: RadosGateway,
    mirror_factory: MirrorFactory,
    docker_daemon_factory: DockerDaemonFactory,
    busybox_image: BuiltImage,
    unique_repo: Callable[..., str],
) -> None:
    s3 = asyncio.run(new_bucket(rgw))
    mirror = mirror_factory({"storage": {
        "path": str(tmp_path / "data"), "backend": "s3", "s3": {**s3, "presign": True},
    }})
    daemon = docker_daemon_factory()
    ref = f"{mirror.host}/{unique_repo('team/app')}:1"
    daemon.load(busybox_image, ref, workdir=tmp_path)
    pushed = docker_push(daemon, ref)

    manifest = json.loads(skopeo.inspect_raw(f"docker://{ref}"))
    layer = manifest["layers"][0]["digest"]
    status, headers, _ = Http(mirror).request("GET", f"/v2/{ref.split('/', 1)[1].split(':')[0]}/blobs/{layer}")
    assert status == 307 and headers["Location"].startswith(f"{s3['endpoint']}/{s3['bucket']}/blobs/sha256/")
    assert Digest.parse(layer).hex in headers["Location"]

    # Every blob GET is answered 307 now: the layers Docker pulls can only come from the bucket.
    assert docker_pull_and_run(daemon, ref, busybox_image.marker) == pushed
