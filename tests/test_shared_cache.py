"""The pull-through cache's shared tier: two real `mirror serve` nodes on one bucket (the session's Ceph RGW)
in front of a real distribution registry with token auth.

What a user behind a load balancer notices: an image pulled through node A pulls through node B (which never
saw it) with the upstream stopped, byte for byte; and with the upstream up, node B asks it for nothing that
A already fetched (no Docker Hub pull spent twice).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, upstream_config
from tests.registry_helpers import digest_of
from tests.support import skopeo
from tests.support.fixtures import ImageFactory, MirrorFactory, RegistryFactory
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.rgw import RadosGateway, new_bucket
from tests.support.token_server import TokenServer
from tests.test_real_pull_through import metric_samples, registry_requests, upstream_requests
from tests.test_real_registry import assert_round_trip

pytestmark = [pytest.mark.real]


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
        missing = {d for d in digests if f"cache/blobs/sha256/{d[7:]}" not in present}
        missing |= {d for d in digests if not any(key.startswith(f"cache/docker.io/{repo}/_")
                                                    and key.endswith(d[7:]) for key in present)}
        if not missing:
            return
        assert time.monotonic() < deadline, f"not published within {timeout} s: {sorted(missing)}"
        time.sleep(0.2)


@pytest.mark.needs_tools("skopeo", "docker-registry")
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


# -- one bound for the cluster ----------------------------------------------------------------------
BLOB = 1 << 20
BOUND = int(3.5 * BLOB)  # room for three of the blobs below (and the small manifests and configs)


async def tier_objects(s3: dict[str, Any]) -> dict[str, int]:
    """Every object of the shared tier's bytes in the bucket, with its size."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=s3["endpoint"], region_name=s3["region"], aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
    ) as client:
        found: dict[str, int] = {}
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix="cache/blobs/"):
            found |= {entry["Key"]: int(entry["Size"]) for entry in page.get("Contents", ())}
        return found


def test_the_shared_tier_keeps_one_bound_for_the_whole_cluster(
    rgw: RadosGateway, redis_server: RedisServer, mirror_factory: MirrorFactory, tmp_path: Path,
) -> None:
    """Two nodes on one bucket and one Redis fill six 1 MiB blobs between them, alternately: the tier in the
    bucket never settles above storage.s3.cache_max_size (3.5 MiB), keeps the most recently used blobs, and
    what it evicted is gone from the bucket (not only from the index). Pushed blobs are never touched."""

    async def scenario() -> None:
        fake = FakeUpstream()
        runner = web.AppRunner(fake.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await fill_through_two_nodes(fake, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    async def fill_through_two_nodes(fake: FakeUpstream, url: str) -> None:
        layers = [bytes([index]) * BLOB for index in range(6)]
        _, manifest = fake.add_image("library/big", "1", layers)
        s3 = await new_bucket(rgw)
        cluster = {"redis": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:12]}"}
        nodes = [
            await asyncio.to_thread(mirror_factory, {
                "storage": {"path": str(tmp_path / f"bound{index}"), "backend": "s3",
                            "s3": {**s3, "cache_max_size": BOUND}},
                "upstreams": [upstream_config(url)], "cluster": cluster,
                "local": {"repositories": ["team/**"]},
            })
            for index in range(2)
        ]
        async with aiohttp.ClientSession() as session:
            pushed = os.urandom(BLOB)
            async with session.post(f"{nodes[0].url}/v2/team/app/blobs/uploads/",
                                    params={"digest": digest_of(pushed)}, data=pushed) as response:
                assert response.status == 201
            for node in nodes:
                async with session.get(f"{node.url}/v2/library/big/manifests/1",
                                       headers={"Accept": OCI_MANIFEST}) as response:
                    assert response.status == 200 and await response.read() == manifest
            for index, layer in enumerate(layers):
                node = nodes[index % 2]
                async with session.get(f"{node.url}/v2/library/big/blobs/{digest_of(layer)}") as response:
                    assert response.status == 200 and await response.read() == layer
                await wait_for_tier(s3, digest_of(layer))
            objects = await tier_objects(s3)
            assert sum(objects.values()) <= BOUND, objects
            # The three most recent blobs are kept; the older ones are gone from the bucket itself.
            kept = {key.rsplit("/", 1)[1] for key in objects}
            assert {digest_of(layer)[7:] for layer in layers[-3:]} <= kept
            assert not {digest_of(layer)[7:] for layer in layers[:2]} & kept
            assert sum([await metric(session, node, "mirror_shared_cache_evictions_total") for node in nodes]) >= 3
            # The pushed blob (a local repository's, under blobs/) is untouched by the tier's eviction.
            async with session.get(f"{nodes[1].url}/v2/team/app/blobs/{digest_of(pushed)}") as response:
                assert response.status == 200 and await response.read() == pushed

    async def wait_for_tier(s3: dict[str, Any], digest: str, timeout: float = 30.0) -> None:
        """Until the blob is published and the tier is back within its bound (publishing and eviction run
        in the background after the client was served)."""
        deadline = time.monotonic() + timeout
        while True:
            objects = await tier_objects(s3)
            if f"cache/blobs/sha256/{digest[7:]}" in objects and sum(objects.values()) <= BOUND:
                return
            assert time.monotonic() < deadline, f"tier not settled: {objects}"
            await asyncio.sleep(0.1)

    async def metric(session: aiohttp.ClientSession, node: MirrorProcess, name: str) -> float:
        async with session.get(f"{node.url}/metrics") as response:
            text = await response.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    asyncio.run(scenario())
