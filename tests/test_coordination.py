"""The Coordinator's behaviour, the same tests against the in-process implementation and a real Redis.

`nodes` gives two coordinators: for Redis two "nodes" (two clients, two node names) on one server and one
prefix; in-process there is one node, so both names are the same object (what one node must agree on with
itself: its own fills, its own rule runs)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.cli import main as cli_main
from mirror.config import ConfigError, load_config_data
from mirror.coordination.interface import Coordinator, Held, Lease, keep_alive
from mirror.coordination.local import LocalCoordinator
from mirror.coordination.redis import RedisCoordinator
from mirror.oci.digest import Digest
from mirror.replication.hosting import REPLICATION
from mirror.state import CACHE, COORDINATOR
from tests.registry_helpers import DOCKER_MANIFEST, push_image
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

DIGEST = "sha256:" + "ab" * 32
RULE_TTL = 0.6  # rule locks' lease; heartbeats every 0.15 s


def redis_node(server: RedisServer, prefix: str, name: str, **kwargs: Any) -> RedisCoordinator:
    kwargs.setdefault("lease_ttl", RULE_TTL)
    kwargs.setdefault("heartbeat", RULE_TTL / 4)
    return RedisCoordinator(server.url, prefix=prefix, node=name, **kwargs)


@pytest.fixture(params=["local", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Coordinator, Coordinator]]:
    if request.param == "local":
        local = LocalCoordinator("node-a", lease_ttl=RULE_TTL)
        await local.start()
        yield local, local
        await local.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    a, b = redis_node(server, prefix, "node-a"), redis_node(server, prefix, "node-b")
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def acquire(coordinator: Coordinator, ttl: float = 5.0) -> Lease:
    outcome = await coordinator.acquire_fill("hub", DIGEST, ttl)
    assert isinstance(outcome, Lease), outcome
    return outcome


# -- fill leases ---------------------------------------------------------------------------------
async def test_fill_lease_is_exclusive(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a, ttl=5.0)
    assert lease.holder == a.node and lease.taken_over is None
    for contender in (a, b):
        held = await contender.acquire_fill("hub", DIGEST, 5.0)
        assert isinstance(held, Held)
        assert held.holder == a.node
        assert 0 < held.expires_in <= 5.0
    # Another upstream's fill of the same digest is another lease (each upstream fills its own copy).
    assert isinstance(await b.acquire_fill("ghcr", DIGEST, 5.0), Lease)


async def test_only_the_holder_renews(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a, ttl=0.5)
    assert not await b.renew(replace(lease, token=f"{b.node}:forged"))
    for _ in range(3):  # 0.9 s in all: alive only because it was renewed
        await asyncio.sleep(0.3)
        assert await a.renew(lease)
    assert isinstance(await b.acquire_fill("hub", DIGEST, 5.0), Held)


async def test_only_the_holder_releases(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a)
    assert not await b.release(replace(lease, token=f"{b.node}:forged"))
    assert isinstance(await b.acquire_fill("hub", DIGEST, 5.0), Held)
    assert await a.release(lease)
    successor = await acquire(b)
    # The first holder's token no longer deletes anything: the lease is someone else's now.
    assert not await a.release(lease)
    assert isinstance(await a.acquire_fill("hub", DIGEST, 5.0), Held)
    assert await b.release(successor)


async def test_expired_fill_is_taken_over_with_its_progress(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    dead = await acquire(a, ttl=0.3)
    assert await a.publish_progress(dead, 1000, size=5000)
    await asyncio.sleep(0.5)  # the holder stopped renewing (it died)
    orphan = await b.fill_progress("hub", DIGEST)
    assert orphan is not None
    assert (orphan.state, orphan.committed, orphan.holder_alive) == ("running", 1000, False)
    successor = await acquire(b, ttl=5.0)
    assert successor.taken_over is not None
    assert (successor.taken_over.holder, successor.taken_over.committed) == (a.node, 1000)
    assert successor.taken_over.size == 5000
    # The old holder, should it wake up, can neither renew, publish nor release.
    assert not await a.renew(dead)
    assert not await a.publish_progress(dead, 2000)
    assert not await a.release(dead)
    now = await a.fill_progress("hub", DIGEST)
    assert now is not None and now.holder == b.node and now.holder_alive and now.committed == 1000


async def test_a_fill_lease_is_broken_only_by_naming_its_holder(nodes: tuple[Coordinator, Coordinator]) -> None:
    """A node restarted under its old name breaks the leases its dead process held; nobody else's."""
    a, b = nodes
    lease = await acquire(a, ttl=30.0)
    assert await a.publish_progress(lease, 1 << 20, size=4 << 20)
    assert not await b.break_fill("hub", DIGEST, "node-a:1")  # a longer name with the holder's as its prefix
    assert not await b.break_fill("hub", DIGEST, "node")
    assert not await b.break_fill("hub", DIGEST, "other")
    assert isinstance(await b.acquire_fill("hub", DIGEST, 5.0), Held)
    assert await b.break_fill("hub", DIGEST, a.node)
    assert not await b.break_fill("hub", DIGEST, a.node)  # nothing left to break
    taken = await acquire(b)
    assert taken.taken_over is not None and taken.taken_over.committed == 1 << 20
    assert not await a.renew(lease) and not await a.publish_progress(lease, 2 << 20)


async def test_a_finished_fill_starts_afresh(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    first = await acquire(a)
    assert await a.publish_progress(first, 300, size=300, state="done")
    assert await a.release(first)
    second = await acquire(b)
    assert second.taken_over is None
    progress = await a.fill_progress("hub", DIGEST)
    assert progress is not None
    assert (progress.holder, progress.committed, progress.state) == (b.node, 0, "running")


async def test_follower_sees_progress_as_it_is_published(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a)
    seen: list[tuple[int, str]] = []
    woke_after: list[float] = []

    async def follow() -> None:
        version = 0
        while True:
            started = time.monotonic()
            progress = await b.wait_progress("hub", DIGEST, version, timeout=10.0)
            woke_after.append(time.monotonic() - started)
            assert progress is not None
            if progress.version > version:
                version = progress.version
                seen.append((progress.committed, progress.state))
            if progress.state != "running":
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    for committed in (100, 200):
        assert await a.publish_progress(lease, committed, size=300)
        await asyncio.sleep(0.1)
    assert await a.publish_progress(lease, 300, state="done")
    await asyncio.wait_for(follower, 5.0)
    assert seen[-1] == (300, "done")
    assert (100, "running") in seen and (200, "running") in seen
    # Woken by each publication, not by the 10 s timeout.
    assert max(woke_after) < 3.0
    final = await b.fill_progress("hub", DIGEST)
    assert final is not None and final.size == 300
    assert len(b._changed) == 0  # type: ignore[attr-defined]  # nothing is kept for a fill no one waits on any more


async def test_a_wait_that_times_out_leaves_nothing_behind(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a)
    progress = await b.wait_progress("hub", DIGEST, 1, timeout=0.1)  # no publication: the timeout ends it
    assert progress is not None and progress.version == 1 and progress.holder_alive
    assert await b.wait_progress("other", DIGEST, 0, timeout=0.05) is None  # no such fill
    assert len(b._changed) == 0  # type: ignore[attr-defined]
    assert await a.release(lease)


async def test_heartbeat_keeps_the_lease_and_stopping_it_hands_it_over(
    nodes: tuple[Coordinator, Coordinator],
) -> None:
    a, b = nodes
    lease = await acquire(a, ttl=0.4)
    async with keep_alive(a, lease, every=0.1) as lost:
        await asyncio.sleep(1.0)  # 2.5 TTLs
        assert isinstance(await b.acquire_fill("hub", DIGEST, 5.0), Held)
        assert not lost.is_set()
    await asyncio.sleep(0.6)  # no more heartbeats: the lease lapses
    successor = await b.acquire_fill("hub", DIGEST, 5.0)
    assert isinstance(successor, Lease)


async def test_heartbeat_reports_a_lost_lease(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    lease = await acquire(a, ttl=0.2)
    async with keep_alive(a, lease, every=0.5) as lost:  # too slow: the lease lapses between beats
        await asyncio.sleep(0.3)
        assert isinstance(await b.acquire_fill("hub", DIGEST, 5.0), Lease)
        await asyncio.wait_for(lost.wait(), 2.0)


# -- in-use marks --------------------------------------------------------------------------------
async def test_in_use_marks_are_seen_until_the_last_one_goes(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    assert not await b.is_in_use(DIGEST)
    a.mark_in_use(DIGEST)
    a.mark_in_use(DIGEST)
    assert a.in_use_here(DIGEST)
    await a.flush()
    assert await b.is_in_use(DIGEST)
    a.unmark_in_use(DIGEST)
    await a.flush()
    assert await b.is_in_use(DIGEST) and a.in_use_here(DIGEST)
    a.unmark_in_use(DIGEST)
    await a.flush()
    assert not a.in_use_here(DIGEST)
    assert not await b.is_in_use(DIGEST)


# -- LRU -----------------------------------------------------------------------------------------
async def test_lru_order_and_one_bound(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    await a.touch("k1", 10, 1.0)
    await b.touch("k2", 20, 2.0)
    await a.touch("k3", 30, 3.0)
    await b.touch("k1", 10, 4.0)  # read again: now the most recent
    await a.touch("k1", 10, 0.5)  # a late, older report does not move it back
    assert [e.key for e in await b.oldest(3)] == ["k2", "k3", "k1"]
    assert await a.lru_bytes() == 60
    await b.touch("k2", 25, 2.0)  # stored again with another size: counted once, at its new size
    assert await a.lru_bytes() == 65
    assert [e.key for e in await a.over_bound(40)] == ["k2"]
    assert [e.key for e in await b.over_bound(35)] == ["k2", "k3"]
    assert await a.over_bound(65) == []
    await a.remove(["k2", "missing"])
    assert await b.lru_bytes() == 40
    oldest = await b.oldest(5)
    assert [(e.key, e.size, e.last_access) for e in oldest] == [("k3", 30, 3.0), ("k1", 10, 4.0)]


# -- caches with a TTL ---------------------------------------------------------------------------
async def test_tag_cache_expires(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    await a.set_tag("hub", "library/alpine", "3.20", DIGEST, ttl=0.3)
    assert await b.get_tag("hub", "library/alpine", "3.20") == DIGEST
    assert await b.get_tag("ghcr", "library/alpine", "3.20") is None
    await asyncio.sleep(0.45)
    assert await b.get_tag("hub", "library/alpine", "3.20") is None


async def test_token_cache_expires(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    scope = "repository:library/alpine:pull"
    await a.set_token("hub", scope, "secret-token", ttl=0.3)
    assert await b.get_token("hub", scope) == "secret-token"
    assert await b.get_token("hub", "repository:other:pull") is None
    await asyncio.sleep(0.45)
    assert await b.get_token("hub", scope) is None


# -- rate-limit budget ---------------------------------------------------------------------------
async def test_rate_limit_budget_is_shared(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    assert await a.spend_budget("hub") is None  # nothing announced: no budget to count against
    await a.observe_budget("hub", 10, 21600.0, observed_at=1000.0)
    assert await b.spend_budget("hub") == 9
    assert await a.spend_budget("hub", 2) == 7
    await b.observe_budget("hub", 50, None, observed_at=999.0)  # older than what is known: ignored
    budget = await a.budget("hub")
    assert budget is not None and (budget.remaining, budget.window) == (7, 21600.0)
    await b.observe_budget("hub", 5, None, observed_at=1001.0)
    await a.block_budget("hub", 2000.0)
    await b.block_budget("hub", 1500.0)  # an earlier end does not shorten the block
    budget = await b.budget("hub")
    assert budget is not None
    assert (budget.remaining, budget.window, budget.blocked_until) == (5, 21600.0, 2000.0)
    assert await a.budget("ghcr") is None


# -- replication rule locks ----------------------------------------------------------------------
async def test_rule_runs_one_at_a_time(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    inside: list[str] = []
    overlaps: list[list[str]] = []

    async def run(coordinator: Coordinator, name: str) -> None:
        async with coordinator.rule_lock("nightly"):
            assert coordinator.rule_running_here("nightly")
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(list(inside))
            await asyncio.sleep(0.3)
            inside.remove(name)

    await asyncio.wait_for(asyncio.gather(run(a, "first"), run(b, "second"), run(a, "third")), 15.0)
    assert overlaps == []
    assert not a.rule_running_here("nightly") and not b.rule_running_here("nightly")
    # Another rule is not held up by this one.
    async with a.rule_lock("nightly"):
        other_rule = b.rule_lock("hourly")
        await asyncio.wait_for(other_rule.__aenter__(), 2.0)
        await other_rule.__aexit__(None, None, None)


# -- named locks (tag moves of local repositories) -----------------------------------------------
async def test_named_lock_admits_one_holder_across_nodes(nodes: tuple[Coordinator, Coordinator]) -> None:
    a, b = nodes
    inside: list[str] = []
    overlaps: list[list[str]] = []

    async def move(coordinator: Coordinator, name: str) -> None:
        async with coordinator.lock("tag:team/app:latest"):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(list(inside))
            await asyncio.sleep(0.05)
            inside.remove(name)

    await asyncio.wait_for(asyncio.gather(*(move(node, f"{i}") for i, node in enumerate((a, b, a, b, a)))), 10.0)
    assert overlaps == []
    # Another name is not held up, and an error inside releases the lock.
    async with a.lock("tag:team/app:latest"):
        other = b.lock("tag:team/app:v2")
        await asyncio.wait_for(other.__aenter__(), 2.0)
        await other.__aexit__(None, None, None)
    with pytest.raises(RuntimeError):
        async with b.lock("tag:team/app:latest"):
            raise RuntimeError("refused")
    after_error = a.lock("tag:team/app:latest")
    await asyncio.wait_for(after_error.__aenter__(), 2.0)
    await after_error.__aexit__(None, None, None)


async def test_named_lock_of_a_dead_holder_is_freed_by_its_lease(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    dead, alive = redis_node(redis_server, prefix, "dead"), redis_node(redis_server, prefix, "alive")
    await dead.start()
    await alive.start()
    try:
        # A node that took the lock and died: its lease is in Redis with nobody renewing it.
        taken = await dead._acquire("lock:tag:team/app:latest", 0.5)
        assert isinstance(taken, Lease)
        started = time.monotonic()
        async with alive.lock("tag:team/app:latest"):
            waited = time.monotonic() - started
        assert 0.2 < waited < 5.0
    finally:
        await dead.close()
        await alive.close()


# -- two nodes on one Redis ----------------------------------------------------------------------
async def test_two_nodes_contend_for_one_fill_and_the_survivor_takes_over(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    first, second = redis_node(redis_server, prefix, "node-1"), redis_node(redis_server, prefix, "node-2")
    await first.start()
    await second.start()
    try:
        outcomes = await asyncio.gather(
            *(node.acquire_fill("hub", DIGEST, 0.4) for _ in range(10) for node in (first, second))
        )
        leases = [o for o in outcomes if isinstance(o, Lease)]
        assert len(leases) == 1
        winner_lease = leases[0]
        winner, loser = (first, second) if winner_lease.holder == "node-1" else (second, first)
        assert all(o.holder == winner.node for o in outcomes if isinstance(o, Held))

        async def follow_then_take_over() -> Lease:
            version = 0
            while True:
                progress = await loser.wait_progress("hub", DIGEST, version, timeout=0.2)
                assert progress is not None
                version = progress.version
                if progress.state == "running" and not progress.holder_alive:
                    taken = await loser.acquire_fill("hub", DIGEST, 5.0)
                    if isinstance(taken, Lease):
                        return taken

        follower = asyncio.create_task(follow_then_take_over())
        async with keep_alive(winner, winner_lease, every=0.1):
            for committed in (1 << 20, 2 << 20):
                assert await winner.publish_progress(winner_lease, committed, size=4 << 20)
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)  # 3 TTLs of renewing: the follower must not have taken it
            assert not follower.done()
        # The winner stops renewing (as if it were SIGKILLed) without releasing.
        taken = await asyncio.wait_for(follower, 5.0)
        assert taken.holder == loser.node
        assert taken.taken_over is not None
        assert (taken.taken_over.holder, taken.taken_over.committed) == (winner.node, 2 << 20)
        assert not await winner.publish_progress(winner_lease, 3 << 20)
        assert await loser.publish_progress(taken, 4 << 20, state="done")
        done = await winner.fill_progress("hub", DIGEST)
        assert done is not None and (done.holder, done.state, done.committed) == (loser.node, "done", 4 << 20)
    finally:
        await first.close()
        await second.close()


async def test_a_closed_node_withdraws_its_in_use_marks(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    leaving, staying = redis_node(redis_server, prefix, "leaving"), redis_node(redis_server, prefix, "staying")
    await leaving.start()
    await staying.start()
    try:
        leaving.mark_in_use(DIGEST)
        await leaving.flush()
        assert await staying.is_in_use(DIGEST)
        await leaving.close()
        assert not await staying.is_in_use(DIGEST)
    finally:
        await staying.close()


async def test_marks_of_a_node_that_stops_refreshing_lapse(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    dying = redis_node(redis_server, prefix, "dying", in_use_ttl=0.3)
    observer = redis_node(redis_server, prefix, "observer")
    await dying.start()
    await observer.start()
    try:
        dying.mark_in_use(DIGEST)
        await dying.flush()
        await asyncio.sleep(0.5)  # refreshed every ttl/3 while the node lives
        assert await observer.is_in_use(DIGEST)
        for task in dying._tasks:  # the node dies: no more refreshes, no goodbye
            task.cancel()
        await asyncio.sleep(0.5)
        assert not await observer.is_in_use(DIGEST)
    finally:
        await dying.close()
        await observer.close()


# -- the app -------------------------------------------------------------------------------------
async def test_app_uses_in_process_coordination_by_default(make_registry: Any) -> None:
    client = await make_registry()
    coordinator = client.app[COORDINATOR]
    assert isinstance(coordinator, LocalCoordinator)
    digest = Digest.parse(DIGEST)
    with client.app[CACHE].serving(digest):
        assert coordinator.in_use_here(DIGEST)
    assert not coordinator.in_use_here(DIGEST)


async def test_app_with_a_cluster_publishes_in_use_marks_to_other_nodes(
    make_registry: Any, redis_server: RedisServer
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    client = await make_registry(cluster={"redis": redis_server.url, "prefix": prefix})
    coordinator = client.app[COORDINATOR]
    assert isinstance(coordinator, RedisCoordinator)
    other = redis_node(redis_server, prefix, "other-node")
    await other.start()
    try:
        with client.app[CACHE].serving(Digest.parse(DIGEST)):
            await coordinator.flush()
            assert await other.is_in_use(DIGEST)
        await coordinator.flush()
        assert not await other.is_in_use(DIGEST)
    finally:
        await other.close()


async def test_a_rule_running_on_another_node_makes_this_one_wait(
    make_registry: Any, redis_server: RedisServer
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    client = await make_registry(
        cluster={"redis": redis_server.url, "prefix": prefix},
        replication=[{"name": "team", "source": "team/app", "destinations": [{"local": "copy/app"}]}],
    )
    await push_image(client, "team/app", "1.0", layers=(b"layer",), media_type=DOCKER_MANIFEST)
    other = redis_node(redis_server, prefix, "other-node")
    await other.start()
    holding, finish = asyncio.Event(), asyncio.Event()

    async def run_elsewhere() -> None:
        async with other.rule_lock("team"):
            holding.set()
            await finish.wait()

    elsewhere = asyncio.create_task(run_elsewhere())
    try:
        await asyncio.wait_for(holding.wait(), 5.0)
        engine = client.app[REPLICATION]
        here = asyncio.create_task(engine.run_rule("team"))
        await asyncio.sleep(1.5)  # several polls of the lease: still waiting for the other node
        assert not here.done()
        async with client.get("/v2/copy/app/tags/list") as response:
            assert response.status == 404
        finish.set()
        report = await asyncio.wait_for(here, 10.0)
        assert (report.result, report.copied) == ("ok", 1)
    finally:
        finish.set()
        await elsewhere
        await other.close()


async def test_readyz_reports_the_cluster_and_fails_when_redis_goes(make_registry: Any, tmp_path: Path) -> None:
    own = RedisServer(log_dir=tmp_path / "redis-log").start()  # this test stops it: not the shared one
    try:
        client = await make_registry(cluster={"redis": own.url, "prefix": "readyz"})
        async with client.get("/readyz") as response:
            body = await response.json()
            assert response.status == 200, body
        assert {"name": "cluster", "status": "healthy"} in body["components"]
        own.stop()
        async with client.get("/readyz") as response:
            body = await response.json()
            assert response.status == 503
        cluster = next(c for c in body["components"] if c["name"] == "cluster")
        assert cluster["status"] == "unhealthy" and "Error" in cluster["error"]
    finally:
        own.stop()


async def test_readyz_of_a_single_node_has_no_cluster_check(make_registry: Any) -> None:
    client = await make_registry()
    async with client.get("/readyz") as response:
        body = await response.json()
    assert all(c["name"] != "cluster" for c in body["components"])


# -- config and check-config ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({}, "cluster.redis: required"),
        ({"redis": "http://127.0.0.1:6379"}, "cluster.redis: expected a redis://"),
        ({"redis": "redis://"}, "cluster.redis: no host"),
        ({"redis": "redis://127.0.0.1:port/0"}, "cluster.redis: bad port"),
        ({"redis": "redis://127.0.0.1:6379/0", "prefix": "a b"}, "cluster.prefix: expected"),
        ({"redis": "redis://127.0.0.1:6379/0", "prefix": ""}, "cluster.prefix: expected"),
        ({"redis": "redis://127.0.0.1:6379/0", "nodes": 3}, "cluster.nodes: unknown key"),
        ({"redis": "redis://127.0.0.1:6379/0", "advertise": "127.0.0.1:5000", "secret": "s" * 16},
         "cluster.advertise: expected this node's http://host:port"),
        ({"redis": "redis://127.0.0.1:6379/0", "advertise": "http://10.0.0.1:5000/v2", "secret": "s" * 16},
         "cluster.advertise: expected scheme://host:port only"),
        ({"redis": "redis://127.0.0.1:6379/0", "advertise": "http://10.0.0.1:port", "secret": "s" * 16},
         "cluster.advertise: bad port"),
        ({"redis": "redis://127.0.0.1:6379/0", "advertise": "http://10.0.0.1:5000"},
         "cluster.secret: required together with cluster.advertise"),
        ({"redis": "redis://127.0.0.1:6379/0", "secret": "s" * 16},
         "cluster.advertise: required together with cluster.secret"),
        ({"redis": "redis://127.0.0.1:6379/0", "advertise": "http://10.0.0.1:5000", "secret": "short"},
         "cluster.secret: expected a string of at least 16"),
        ({"redis": "redis://127.0.0.1:6379/0", "lease_ttl": "soon"}, "cluster.lease_ttl: expected a duration"),
        ({"redis": "redis://127.0.0.1:6379/0", "lease_ttl": "100ms"}, "cluster.lease_ttl: must be at least 1s"),
        ({"redis": "redis://127.0.0.1:6379/0", "lease_ttl": 0.5}, "cluster.lease_ttl: must be at least 1s"),
        ("redis://127.0.0.1:6379", "cluster: expected a mapping"),
    ],
)
def test_cluster_config_errors_name_the_key(cluster: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("/", "/")):
        load_config_data({"cluster": cluster})


def test_cluster_config_defaults() -> None:
    assert load_config_data({}).cluster is None
    cluster = load_config_data({"cluster": {"redis": "redis://127.0.0.1:6379/0"}}).cluster
    assert cluster is not None and cluster.prefix == "mirror"
    assert (cluster.advertise, cluster.secret, cluster.lease_ttl, cluster.shares_fills) == (None, None, 90.0, False)
    sharing = load_config_data({"cluster": {"redis": "redis://127.0.0.1:6379/0", "advertise": "http://10.0.0.1:5000/",
                                            "secret": "s" * 16, "lease_ttl": "30s"}}).cluster
    assert sharing is not None and sharing.shares_fills
    assert (sharing.advertise, sharing.lease_ttl) == ("http://10.0.0.1:5000", 30.0)
    assert "s" * 16 not in repr(sharing)


def _write_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "data")}, "cluster": {"redis": redis_url}}))
    return path


def test_check_config_pings_the_configured_redis(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["check-config", "--config", str(_write_config(tmp_path, redis_server.url))]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["cluster"] == {"redis": redis_server.url, "prefix": "mirror", "advertise": None, "secret": None,
                                  "lease_ttl": 90.0}


def test_check_config_never_prints_the_cluster_secret(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mirror.yaml"
    cluster = {"redis": redis_server.url, "advertise": "http://127.0.0.1:5000", "secret": "do-not-print-0123456789"}
    path.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "data")}, "cluster": cluster}))
    assert cli_main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "do-not-print" not in out
    assert yaml.safe_load(out)["cluster"]["secret"] == "***"


def test_check_config_fails_clearly_when_redis_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    assert cli_main(["check-config", "--config", str(_write_config(tmp_path, url))]) == 1
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    assert "cluster.redis: Redis at redis://:***@127.0.0.1:" in captured.err
    assert "does not answer" in captured.err
    assert "hunter2" not in captured.err and "hunter2" not in captured.out


def test_serve_refuses_to_start_when_its_redis_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster node serving alone would fill and evict without the others: it must not start."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = _write_config(tmp_path, url)
    data = yaml.safe_load(config.read_text())
    data["listen"] = f"127.0.0.1:{free_port()}"
    config.write_text(yaml.safe_dump(data))
    assert cli_main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"mirror: cluster.redis: Redis at {url} does not answer" in err
    assert "Traceback" not in err
