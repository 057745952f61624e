"""The pull-through cache's shared tier: two real `mirror serve` nodes on one bucket (the session's Ceph RGW)
in front of a real distribution registry with token auth.

What a user behind a load balancer notices: an image pulled through node A pulls through node B (which never
saw it) with the upstream stopped, byte for byte; and with the upstream up, node B asks it for nothing that
A already fetched (no Docker Hub pull spent twice).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import skopeo
from tests.support.fixtures import ImageFactory, MirrorFactory, RegistryFactory
from tests.support.mirror_proc import MirrorProcess
from tests.support.rgw import RadosGateway, new_bucket
from tests.support.token_server import TokenServer
from tests.test_real_pull_through import metric_samples, registry_requests, upstream_requests
from tests.test_real_registry import assert_round_trip

pytestmark = [pytest.mark.real, pytest.mark.needs_tools("skopeo", "docker-registry")]


def node(mirror_factory: MirrorFactory, tmp_path: Path, label: str, s3: dict[str, Any], url: str) -> MirrorProcess:
    return mirror_factory({
        "storage": {"path": str(tmp_path / label), "backend": "s3", "s3": s3},
        # prefetch off: what node A publishes is exactly what skopeo asked it for.
        "upstreams": [{"name": "docker.io", "url": url, "timeout": "5s", "default": True, "prefetch": False}],
    })


def metric_total(mirror: MirrorProcess, name: str) -> float:
    return sum(value for _labels, value in metric_samples(mirror, name))


def wait_published(s3: dict[str, Any], repo: str, digests: set[str], timeout: float = 60.0) -> None:
    """Until the bucket holds every digest's bytes and links under the upstream's cache prefix (node A
    publishes in the background after serving)."""
    from aiobotocore.session import get_session

    async def keys() -> set[str]:
        async with get_session().create_client(
            "s3", endpoint_url=s3["endpoint"], region_name=s3["region"], aws_access_key_id=s3["access_key"],
            aws_secret_access_key=s3["secret_key"],
        ) as client:
            found: set[str] = set()
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"]):
                found |= {entry["Key"] for entry in page.get("Contents", ())}
            return found

    deadline = time.monotonic() + timeout
    while True:
        present = asyncio.run(keys())
        missing = {d for d in digests if f"blobs/sha256/{d[7:]}" not in present}
        missing |= {d for d in digests if not any(key.startswith(f"cache/docker.io/{repo}/_")
                                                    and key.endswith(d[7:]) for key in present)}
        if not missing:
            return
        assert time.monotonic() < deadline, f"not published within {timeout} s: {sorted(missing)}"
        time.sleep(0.2)


def test_an_image_pulled_through_one_node_pulls_through_another_with_the_upstream_stopped(
    token_server: TokenServer, registry_factory: RegistryFactory, mirror_factory: MirrorFactory,
    image_factory: ImageFactory, rgw: RadosGateway, unique_repo: Callable[..., str], tmp_path: Path,
) -> None:
    upstream = registry_factory.token_auth(token_server)  # ours alone: it is stopped below
    image = image_factory.multiarch(seed=47, media="oci")
    repo = unique_repo("library/shared")
    upstream.push(image, f"{repo}:1")
    s3 = asyncio.run(new_bucket(rgw))
    a = node(mirror_factory, tmp_path, "a", s3, upstream.url)
    skopeo.copy(f"docker://{a.host}/{repo}:1", f"oci:{tmp_path / 'via-a'}:1")
    everything = {image.digest, *(m.digest for m in image.manifests)}
    everything |= {d for m in image.manifests for d in m.blob_digests}
    wait_published(s3, repo, everything)

    # With the upstream up, node B takes what A fetched from the bucket: manifests by digest and every
    # blob; only the tag is asked of the upstream (what it names is the upstream's to say).
    b = node(mirror_factory, tmp_path, "b", s3, upstream.url)
    asked_before = len(registry_requests(upstream, repo))
    skopeo.copy(f"docker://{b.host}/{repo}:1", f"oci:{tmp_path / 'via-b'}:1")
    asked = registry_requests(upstream, repo)[asked_before:]
    assert all("/manifests/" in path and not path.endswith(tuple(everything)) for _m, path, _s in asked), asked
    assert metric_total(b, "mirror_shared_cache_bytes_total") > 0
    assert metric_total(b, "mirror_upstream_bytes_total") == 0
    assert_round_trip(image, tmp_path / "via-b", b, repo, "1")

    # With the upstream gone, a third node that never saw the image serves it from the bucket alone.
    upstream.stop()
    c = node(mirror_factory, tmp_path, "c", s3, upstream.url)
    pulled = tmp_path / "via-c"
    skopeo.copy(f"docker://{c.host}/{repo}:1", f"oci:{pulled}:1")
    assert_round_trip(image, pulled, c, repo, "1")
    assert metric_total(c, "mirror_shared_cache_manifests_total") >= 1 + len(image.manifests)
    assert sum(count for (_method, status), count in upstream_requests(c).items() if status == "200") == 0
