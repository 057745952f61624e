"""What cluster nodes share besides fills: resolved tags, upstream tokens and the rate-limit reading.

Two real `mirror serve` processes on one real Redis, in front of the in-process fake upstream (which counts
manifest requests by tag and token requests, and can revoke every token it issued).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, upstream_config
from tests.support.redis_server import RedisServer
from tests.test_cluster_fills import three_nodes, upstream  # noqa: F401 - `upstream` is a fixture

REPO = "library/app"
TAG_TTL = 4.0


def tag_resolutions(fake: FakeUpstream) -> int:
    """Manifest GETs and HEADs by tag (not by digest) that the upstream answered: what resolving the tag cost
    it. A request without a token is only answered with the challenge to fetch one."""
    return sum(1 for method, path, authorization in fake.authorizations
               if method in ("GET", "HEAD") and path == f"/v2/{REPO}/manifests/latest"
               and authorization is not None and authorization.removeprefix("Bearer ") in fake.tokens)


async def redis_get_calls(url: str) -> int:
    """How many GETs (what a shared tag or token lookup is) this Redis has answered so far."""
    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def get_manifest(session: aiohttp.ClientSession, url: str, reference: str = "latest") -> tuple[int, bytes]:
    async with session.get(f"{url}/v2/{REPO}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}) as response:
        return response.status, await response.read()


async def gauge(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{upstream="fake.io"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_tag_resolved_on_one_node_is_trusted_by_the_other_until_its_ttl_ends(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]  # noqa: F811
) -> None:
    fake, url = upstream
    fake.require_token = True
    digest, body = fake.add_image(REPO, "latest", [b"layer"])
    nodes_config = {"upstreams": [upstream_config(url, tag_ttl=f"{TAG_TTL}s")]}
    async with three_nodes(tmp_path, redis_server, upstream, count=2, **nodes_config) as cluster:
        a, b = cluster.nodes
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            resolved_at = time.time()
            assert await get_manifest(session, a.url) == (200, body)
            assert tag_resolutions(fake) == 1
            assert len(fake.token_requests) == 1
            # Node B has never seen the tag: it takes node A's answer, and node A's token for the manifest
            # it still has to fetch (by digest: immutable, verified).
            assert await get_manifest(session, b.url) == (200, body)
            assert time.time() - resolved_at < TAG_TTL, "too slow to test within the TTL"
            assert tag_resolutions(fake) == 1
            assert len(fake.token_requests) == 1
            # Now in both nodes' memory: served without a Redis round trip (nor an upstream one).
            redis_gets = await redis_get_calls(cluster.redis_url)
            for node in (a, b, b):
                assert await get_manifest(session, node.url) == (200, body)
            assert await redis_get_calls(cluster.redis_url) == redis_gets
            assert tag_resolutions(fake) == 1
            # Once the TTL A resolved it for is over, B asks the upstream itself (and shares its answer).
            await asyncio.sleep(max(0.0, resolved_at + TAG_TTL + 0.5 - time.time()))
            assert await get_manifest(session, b.url) == (200, body)
            assert tag_resolutions(fake) == 2
            assert await get_manifest(session, a.url) == (200, body)
            assert tag_resolutions(fake) == 2
            assert (await get_manifest(session, b.url, digest)) == (200, body)


async def test_a_shared_token_the_upstream_revoked_is_replaced_once(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]  # noqa: F811
) -> None:
    fake, url = upstream
    fake.require_token = True
    layer = b"a layer of bytes" * 100
    fake.add_image(REPO, "latest", [layer])
    blob = fake.add_blob(b"another blob" * 100)
    async with three_nodes(tmp_path, redis_server, upstream, count=2) as cluster:
        a, b = cluster.nodes
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            assert (await get_manifest(session, a.url))[0] == 200
            assert len(fake.token_requests) == 1
            fake.tokens.clear()  # the upstream revokes the token node A fetched (and shared)
            async with session.get(f"{b.url}/v2/{REPO}/blobs/{blob}") as response:
                assert response.status == 200
                assert await response.read() == b"another blob" * 100
            # B tried the shared token, was refused, fetched a fresh one: once, not once per retry.
            assert len(fake.token_requests) == 2
            sent = [auth for _method, path, auth in fake.authorizations if path.endswith(blob)]
            assert len(sent) == 3 and sent[0] is None, sent  # unchallenged yet, the shared token, a fresh one
            assert sent[1] is not None and sent[2] is not None and sent[1] != sent[2], sent
            # The fresh token is shared in turn: node A uses it without asking the token service.
            async with session.get(f"{a.url}/v2/{REPO}/blobs/{blob}") as response:
                assert response.status == 200
            assert len(fake.token_requests) == 2


async def test_the_ratelimit_gauge_on_every_node_shows_what_the_upstream_last_told_any_node(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]  # noqa: F811
) -> None:
    fake, _url = upstream
    fake.add_image(REPO, "latest", [b"layer"])
    fake.ratelimit_remaining = 42
    async with three_nodes(tmp_path, redis_server, upstream, count=2) as cluster:
        a, b = cluster.nodes
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            assert (await get_manifest(session, b.url))[0] == 200
            fake.ratelimit_remaining = 17  # node A spends from the same budget, later
            assert (await get_manifest(session, a.url, "sha256:" + "0" * 64))[0] == 404
            # The reading is published in the background: give it a moment.
            deadline = time.monotonic() + 5
            while (seen := await gauge(session, b.url, "mirror_upstream_ratelimit_remaining")) != 17:
                assert time.monotonic() < deadline, f"node B's gauge says {seen}"
                await asyncio.sleep(0.1)
            assert await gauge(session, a.url, "mirror_upstream_ratelimit_remaining") == 17
