"""Cluster-wide single-flight fills: three real `mirror serve` processes on one real Redis.

The upstream is the in-process fake (tests/fake_upstream.py), slowed so that a download takes seconds and
clients can be seen streaming while it runs, and so that its owner can be killed halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.auth_helpers import hashed
from tests.fake_upstream import FakeUpstream, upstream_config
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

BLOB_BYTES = 20 << 20
PIECE = 64 << 10
SECRET = "cluster-test-secret-0123456789"
LEASE_TTL = 3.0  # a dead owner's fill is taken over within this (heartbeats every second)
REPO = "library/big"


@dataclass
class Cluster:
    upstream: FakeUpstream
    upstream_url: str
    nodes: list[MirrorProcess]
    prefix: str
    redis_url: str


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def node_config(
    tmp_path: Path, index: int, port: int, upstream_url: str, cluster: dict[str, Any] | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "storage": {"path": str(tmp_path / f"node{index}" / "data")},
        "upstreams": [upstream_config(upstream_url)],
        "log": {"level": "info"},
    }
    if cluster is not None:
        config["cluster"] = {**cluster, "advertise": f"http://127.0.0.1:{port}"}
    return config


@contextlib.asynccontextmanager
async def three_nodes(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str], count: int = 3,
    lease_ttl: float = LEASE_TTL, s3: dict[str, Any] | None = None, **extra: Any,
) -> AsyncIterator[Cluster]:
    fake, url = upstream
    prefix = f"t{uuid.uuid4().hex[:12]}"
    cluster = {"redis": redis_server.url, "prefix": prefix, "secret": SECRET, "lease_ttl": f"{lease_ttl}s"}
    nodes = []
    for index in range(count):
        port = free_port()
        config = {**node_config(tmp_path, index, port, url, cluster), **extra}
        if s3 is not None:  # every node on one bucket (storage.backend: s3), each with its own disk cache
            config["storage"] = {**config["storage"], "backend": "s3", "s3": s3}
        nodes.append(MirrorProcess(config, workdir=tmp_path / f"node{index}", ready_timeout=60.0))
    try:
        await asyncio.gather(*(node.astart() for node in nodes))
        yield Cluster(fake, url, nodes, prefix, redis_server.url)
    finally:
        await asyncio.gather(*(asyncio.to_thread(node.cleanup) for node in nodes))


@dataclass
class Pull:
    node: int
    status: int
    body_sha: str
    first_byte_at: float | None
    attempts: int
    nodes_used: list[int]


async def pull(session: aiohttp.ClientSession, nodes: list[MirrorProcess], start_node: int, digest: str,
               size: int, *, dead: set[int] | None = None) -> Pull:
    """GET the blob from `start_node`; when the connection is cut, carry on with Range from the next node
    that is alive (what Docker does with its next endpoint), verifying the whole body at the end."""
    loop = asyncio.get_running_loop()
    hasher = hashlib.sha256()
    got = 0
    first_byte_at: float | None = None
    node = start_node
    used: list[int] = []
    status = 0
    for attempt in range(1, 8):
        used.append(node)
        headers = {"Range": f"bytes={got}-"} if got else {}
        try:
            async with session.get(f"{nodes[node].url}/v2/{REPO}/blobs/{digest}", headers=headers) as response:
                status = response.status
                if status not in (200, 206):
                    await response.read()
                    raise aiohttp.ClientPayloadError(f"status {status}")
                if got and status != 206:
                    raise AssertionError(f"a Range request was answered {status}")
                async for piece in response.content.iter_chunked(PIECE):
                    if first_byte_at is None:
                        first_byte_at = loop.time()
                    hasher.update(piece)
                    got += len(piece)
            if got == size:
                return Pull(start_node, status, "sha256:" + hasher.hexdigest(), first_byte_at, attempt, used)
            raise AssertionError(f"a complete response of {got} bytes for a {size}-byte blob")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError):
            assert got < size
            alive = [n for n in range(len(nodes)) if n not in (dead or set()) and nodes[n].running]
            node = alive[(alive.index(node) + 1) % len(alive)] if node in alive else alive[0]
            await asyncio.sleep(0.2)
    raise AssertionError(f"no complete body after {len(used)} attempts ({used})")


def peer_bytes(metrics_text: str) -> float:
    match = re.search(r'^mirror_cluster_peer_bytes_total\{upstream="fake.io"\} (\S+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


async def metrics_of(session: aiohttp.ClientSession, node: MirrorProcess) -> str:
    async with session.get(f"{node.url}/metrics") as response:
        return await response.text()


@pytest.mark.parametrize("storage", ["disks", "bucket"])
async def test_sixty_clients_on_three_nodes_make_one_upstream_get_and_stream_while_it_runs(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str], storage: str,
    request: pytest.FixtureRequest,
) -> None:
    """Each node on its own disk, or all three on one bucket of a real RGW (then the blob is also
    published to the bucket's shared tier once filled)."""
    fake, _url = upstream
    blob = os.urandom(BLOB_BYTES)
    digest = fake.add_blob(blob)
    fake.blob_delay = 0.02  # 320 pieces: the download takes 6 s or more
    s3 = None
    if storage == "bucket":
        from tests.support.rgw import new_bucket

        s3 = await new_bucket(request.getfixturevalue("rgw"))
    async with three_nodes(tmp_path, redis_server, upstream, s3=s3) as cluster:
        timeout = aiohttp.ClientTimeout(total=180)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pulls = await asyncio.gather(
                *(pull(session, cluster.nodes, i % 3, digest, len(blob)) for i in range(60))
            )
            assert [p.body_sha for p in pulls] == [digest] * 60
            assert all(p.attempts == 1 for p in pulls), [p.nodes_used for p in pulls]
            assert fake.count("GET", f"/blobs/{digest}") == 1
            finished = fake.blob_finished_at[digest]
            # Every client, on the owner and on both followers, had bytes before the upstream sent its last.
            late = [(p.node, p.first_byte_at) for p in pulls if p.first_byte_at is None or p.first_byte_at >= finished]
            assert not late, f"upstream finished at {finished}: {late}"
            # Exactly one node downloaded; the two others took every byte from it.
            streamed = [peer_bytes(await metrics_of(session, node)) for node in cluster.nodes]
            assert sorted(streamed) == [0.0, len(blob), len(blob)], streamed
            # Each node stored its own verified copy: a second round is three hits, no upstream call.
            again = await asyncio.gather(*(pull(session, cluster.nodes, i, digest, len(blob)) for i in range(3)))
            assert [p.body_sha for p in again] == [digest] * 3
            assert fake.count("GET", f"/blobs/{digest}") == 1
            if s3 is not None:
                await published(s3, digest)  # the owner's copy went to the bucket once, for later nodes


async def published(s3: dict[str, Any], digest: str, timeout: float = 30.0) -> None:
    from aiobotocore.session import get_session

    key = f"cache/blobs/sha256/{digest[7:]}"
    async with get_session().create_client(
        "s3", endpoint_url=s3["endpoint"], region_name=s3["region"], aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
    ) as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            answer = await client.list_objects_v2(Bucket=s3["bucket"], Prefix=key)
            if answer.get("KeyCount", 0) == 1:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{key} never published"
            await asyncio.sleep(0.2)


async def owner_of(cluster: Cluster, digest: str) -> str:
    client = aioredis.from_url(cluster.redis_url, decode_responses=True)
    try:
        token = await client.get(f"{cluster.prefix}:lease:fill:fake.io:{digest}")
    finally:
        await client.aclose()
    assert token, "no fill lease while the fill runs"
    return str(token).rpartition(":")[0]


@pytest.mark.parametrize("honour_ranges", [True, False], ids=["upstream-with-range", "upstream-ignoring-range"])
async def test_the_owner_killed_halfway_is_taken_over_and_every_client_gets_the_right_bytes(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str], honour_ranges: bool
) -> None:
    fake, _url = upstream
    blob = os.urandom(BLOB_BYTES)
    digest = fake.add_blob(blob)
    fake.blob_delay = 0.02
    fake.honour_ranges = honour_ranges  # False: the new owner reads the bytes it has again and drops them
    async with three_nodes(tmp_path, redis_server, upstream) as cluster:
        timeout = aiohttp.ClientTimeout(total=180)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            dead: set[int] = set()
            pulls = [asyncio.create_task(pull(session, cluster.nodes, i % 3, digest, len(blob), dead=dead))
                     for i in range(15)]
            while fake.bytes_sent[digest] < len(blob) // 2:
                await asyncio.sleep(0.05)
            owner_url = await owner_of(cluster, digest)
            owner = next(i for i, node in enumerate(cluster.nodes) if node.url == owner_url)
            dead.add(owner)
            cluster.nodes[owner].kill()
            sent_when_killed = fake.bytes_sent[digest]
            results = await asyncio.gather(*pulls)
            assert [p.body_sha for p in results] == [digest] * 15
            # Clients of the dead node were cut and finished elsewhere with Range; the others never noticed.
            assert all(p.attempts > 1 for p in results if p.node == owner)
            assert all(p.attempts == 1 for p in results if p.node != owner), [p.nodes_used for p in results]
            # One more upstream GET, by the node that took the lease over, continuing where it had got to.
            gets = fake.count("GET", f"/blobs/{digest}")
            assert gets == 2, fake.blob_ranges
            resumed = fake.blob_ranges[-1]
            assert resumed.startswith("bytes=") and int(resumed[6:-1]) > 0, fake.blob_ranges
            assert int(resumed[6:-1]) <= sent_when_killed
            survivors = [n for i, n in enumerate(cluster.nodes) if i != owner]
            taken = [n for n in survivors if "took over from node" in n.log_text(None)]
            assert len(taken) == 1, [n.log_text() for n in survivors]
            # Both survivors keep a verified copy: served again without the upstream.
            again = await asyncio.gather(*(pull(session, cluster.nodes, cluster.nodes.index(n), digest, len(blob))
                                           for n in survivors))
            assert [p.body_sha for p in again] == [digest] * 2
            assert fake.count("GET", f"/blobs/{digest}") == 2


async def test_the_internal_fill_endpoint_needs_the_cluster_secret(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, url = upstream
    digest = fake.add_blob(b"x" * 1000)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    port = free_port()
    cluster = {"redis": redis_server.url, "prefix": prefix, "secret": SECRET}
    with MirrorProcess(node_config(tmp_path, 0, port, url, cluster), workdir=tmp_path / "n") as node:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{node.url}/v2/{REPO}/blobs/{digest}") as response:
                assert response.status == 200 and await response.read() == b"x" * 1000
            path = f"{node.url}/_mirror/fills/fake.io/{digest}"
            for headers in ({}, {"Authorization": "Bearer wrong-secret-0123456789"}, {"Authorization": SECRET}):
                async with session.get(path, headers=headers) as response:
                    assert response.status == 401
                    assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
            bearer = {"Authorization": f"Bearer {SECRET}"}
            async with session.get(path, headers={**bearer, "Range": "bytes=10-"}) as response:
                assert response.status == 206 and await response.read() == b"x" * 990
            missing = "sha256:" + "0" * 64
            async with session.get(f"{node.url}/_mirror/fills/fake.io/{missing}", headers=bearer) as response:
                assert response.status == 404


async def test_a_node_without_cluster_fills_has_no_internal_endpoint(
    tmp_path: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, url = upstream
    digest = fake.add_blob(b"y" * 1000)
    with MirrorProcess(node_config(tmp_path, 0, free_port(), url, None), workdir=tmp_path / "n") as node:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{node.url}/v2/{REPO}/blobs/{digest}") as response:
                assert response.status == 200
            async with session.get(f"{node.url}/_mirror/fills/fake.io/{digest}",
                                   headers={"Authorization": f"Bearer {SECRET}"}) as response:
                assert response.status == 404


async def test_an_owner_stopped_gracefully_never_leaves_its_followers_waiting_for_its_lease(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    """SIGTERM halfway through: the owner either drains the fill for its followers or, cancelling it,
    releases the lease so a follower takes over at once. Either way no follower waits for the lease's
    60 s, and every client gets the right bytes."""
    fake, _url = upstream
    blob = os.urandom(BLOB_BYTES)
    digest = fake.add_blob(blob)
    fake.blob_delay = 0.05  # 16 s in all: the second half outlasts the owner's grace period (5 s)
    async with three_nodes(tmp_path, redis_server, upstream, count=2, lease_ttl=60.0) as cluster:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            dead: set[int] = set()
            pulls = [asyncio.create_task(pull(session, cluster.nodes, i % 2, digest, len(blob), dead=dead))
                     for i in range(4)]
            while fake.bytes_sent[digest] < len(blob) // 2:
                await asyncio.sleep(0.05)
            owner_url = await owner_of(cluster, digest)
            owner = next(i for i, node in enumerate(cluster.nodes) if node.url == owner_url)
            dead.add(owner)
            stopping = asyncio.create_task(asyncio.to_thread(cluster.nodes[owner].stop))
            results = await asyncio.wait_for(asyncio.gather(*pulls), timeout=40)
            await stopping
            assert [p.body_sha for p in results] == [digest] * 4
            assert all(p.attempts == 1 for p in results if p.node != owner), [p.nodes_used for p in results]
            gets = fake.count("GET", f"/blobs/{digest}")
            assert gets <= 2
            if gets == 2:
                assert int(fake.blob_ranges[-1][6:-1]) > 0, fake.blob_ranges


async def test_an_owner_restarted_after_a_crash_does_not_wait_for_its_own_old_lease(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    """Same advertise, new process: the lease its dead predecessor held is broken at once (not waited
    out for 60 s), and the follower on the other node streams from it again."""
    fake, _url = upstream
    blob = os.urandom(BLOB_BYTES)
    digest = fake.add_blob(blob)
    fake.blob_delay = 0.02
    async with three_nodes(tmp_path, redis_server, upstream, count=2, lease_ttl=60.0) as cluster:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            dead: set[int] = set()
            first = asyncio.create_task(pull(session, cluster.nodes, 0, digest, len(blob), dead=dead))
            while fake.bytes_sent[digest] == 0:
                await asyncio.sleep(0.02)
            assert await owner_of(cluster, digest) == cluster.nodes[0].url
            follower = asyncio.create_task(pull(session, cluster.nodes, 1, digest, len(blob)))
            while fake.bytes_sent[digest] < len(blob) // 2:
                await asyncio.sleep(0.05)
            dead.add(0)
            cluster.nodes[0].kill()
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            await cluster.nodes[0].astart()
            dead.discard(0)
            after_restart = await asyncio.wait_for(pull(session, cluster.nodes, 0, digest, len(blob)), timeout=40)
            results = [await asyncio.wait_for(task, timeout=40) for task in (first, follower)]
            assert loop.time() - killed_at < 40  # the old lease had 60 s to live
            assert [p.body_sha for p in (*results, after_restart)] == [digest] * 3
            assert results[1].attempts == 1  # the follower's client saw a pause, not an error
            assert "broke this node's stale lease" in cluster.nodes[0].log_text(None)
            assert fake.count("GET", f"/blobs/{digest}") == 2


async def test_a_node_that_misses_a_blob_just_filled_elsewhere_takes_it_from_that_node(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _url = upstream
    blob = os.urandom(1 << 20)
    digest = fake.add_blob(blob)
    async with three_nodes(tmp_path, redis_server, upstream, count=2) as cluster:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            first = await pull(session, cluster.nodes, 0, digest, len(blob))
            second = await pull(session, cluster.nodes, 1, digest, len(blob))
            assert first.body_sha == second.body_sha == digest
            assert fake.count("GET", f"/blobs/{digest}") == 1
            assert peer_bytes(await metrics_of(session, cluster.nodes[1])) == len(blob)


async def test_a_follower_serves_the_owners_bytes_only_to_repositories_the_upstream_allows(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    """A digest is not a capability on any node: the fill node 0 runs for library/big is not readable
    through node 1 by a repository that the upstream says has no such blob."""
    fake, _url = upstream
    blob = os.urandom(4 << 20)
    digest = fake.add_blob(blob)
    fake.blob_repos[digest] = {REPO}
    fake.blob_delay = 0.02  # 64 pieces: about 1.3 s, so node 0's fill is running when node 1 is asked
    async with three_nodes(tmp_path, redis_server, upstream, count=2) as cluster:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            owner = asyncio.create_task(pull(session, cluster.nodes, 0, digest, len(blob)))
            while fake.bytes_sent[digest] == 0:
                await asyncio.sleep(0.02)
            async with session.get(f"{cluster.nodes[1].url}/v2/other/repo/blobs/{digest}") as response:
                assert response.status == 404
                assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
            assert (await owner).body_sha == digest
            assert peer_bytes(await metrics_of(session, cluster.nodes[1])) == 0
            assert fake.count("GET", f"/blobs/{digest}") == 1


async def test_cluster_fills_work_with_client_access_control_on(
    tmp_path: Path, redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    """The peer endpoint answers to the cluster secret, not to client credentials: with `auth:` on, a
    follower still streams from the owner (instead of giving up and sending its clients away)."""
    fake, _url = upstream
    blob = os.urandom(4 << 20)
    digest = fake.add_blob(blob)
    fake.blob_delay = 0.02
    auth = {"users": {"ops": {"password_hash": hashed("ops-pw")}}, "admins": {"users": ["ops"]},
            "access": [{"repository": "**", "anonymous": ["pull"]}]}
    async with three_nodes(tmp_path, redis_server, upstream, count=2, auth=auth) as cluster:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            pulls = await asyncio.gather(*(pull(session, cluster.nodes, i % 2, digest, len(blob)) for i in range(4)))
            assert [p.body_sha for p in pulls] == [digest] * 4
            assert all(p.attempts == 1 for p in pulls), [p.nodes_used for p in pulls]
            assert fake.count("GET", f"/blobs/{digest}") == 1
            streamed = [peer_bytes(await metrics_of(session, node)) for node in cluster.nodes]
            assert sorted(streamed) == [0, len(blob)], streamed
