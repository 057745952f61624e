"""The bounded cache: LRU eviction under `storage.max_size`, what it must never evict, and its metrics.

The first half drives a mirror in-process against the fake upstream; the property test at the end drives
CacheManager + BlobIndex + BlobStore directly through random sequences of fills, reads, pushes, pins,
serves and eviction passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import mirror.cache.manager as manager_module
from mirror.cache.index import CACHED, LOCAL, PINNED, BlobIndex
from mirror.cache.manager import CacheManager
from mirror.config import StorageConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.state import CACHE, CONFIG
from mirror.storage.blobs import BlobStore
from tests.cache_helpers import MiB, add_to_upstream, blob_files, check_store, make_image, pull, push
from tests.fake_upstream import FakeUpstream, digest_of, upstream_config
from tests.proxy_helpers import eventually, metric_value, metrics_text

LAYER = 4 * MiB
MAX_SIZE = 40 * MiB


async def start(aiohttp_server: Any, make_registry: Any, fake: FakeUpstream, **storage: Any) -> Any:
    server = await aiohttp_server(fake.app())
    url = f"http://{server.host}:{server.port}"
    return await make_registry(
        upstreams=[upstream_config(url, library_prefix=True, tag_ttl="1h")],
        local={"repositories": ["local/**"]},
        storage=storage,
    )


def cached_bytes_on_disk(root: Path, exclude: set[str]) -> int:
    return sum(path.stat().st_size for digest, path in blob_files(root).items() if digest not in exclude)


@pytest.mark.slow
async def test_pulls_several_times_the_bound_stay_under_it_evicting_blobs_used_once_first(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    images = [make_image(f"library/img{i}", "1", [os.urandom(LAYER), os.urandom(LAYER)]) for i in range(15)]
    for image in images:
        add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake, max_size=MAX_SIZE)
    root = client.server.app[CONFIG].storage.path
    cache: CacheManager = client.server.app[CACHE]
    high = int(MAX_SIZE * 0.95)

    # Pushed content and pinned content must survive whatever the cache goes through.
    local_image = make_image("local/app", "1", [os.urandom(LAYER), os.urandom(LAYER)])
    await push(client, local_image)
    local_digests = set(local_image.all_digests)

    for image in images[:5]:
        await pull(client, image)
        assert cached_bytes_on_disk(root, local_digests) <= high
    pinned = images[1]
    for digest in pinned.layer_digests:
        await cache.hold(Digest.parse(digest), LAYER, PINNED)
    pinned_digests = set(pinned.layer_digests)
    await pull(client, images[0])  # hits: image 0 is used again, images 2-4 only once

    for image in images[5:]:
        await pull(client, image)
        cached = cached_bytes_on_disk(root, local_digests | pinned_digests)
        assert cached <= high, f"cached content is {cached} bytes after pulling {image.repo}"
        assert metric_value(await metrics_text(client), "mirror_stored_bytes", holder="cached") <= high

    # Blobs used once go first, least recently used first: 2, 3, 4 (1 is pinned), then 5, 6, ...; image 0,
    # read again after it was stored, is protected: it goes only after every blob used once.
    eviction_order = [d for i in (2, 3, 4, *range(5, 15), 0) for d in images[i].layer_digests]
    on_disk = set(blob_files(root))
    evicted = [d for d in eviction_order if d not in on_disk]
    assert evicted, "nothing was evicted: the test did not put the cache under pressure"
    assert evicted == eviction_order[: len(evicted)], "eviction did not follow the segmented LRU order"
    assert set(images[0].layer_digests) <= on_disk, "a blob read again was evicted before ones used once"
    assert local_digests <= on_disk and pinned_digests <= on_disk

    # Metrics agree with the disk: every blob fetched and no longer here was evicted exactly once.
    fetched = sum(n for (method, path), n in fake.requests.items()
                  if method == "GET" and ("/blobs/" in path or "/manifests/" in path))
    cached_files = len(on_disk - local_digests)  # pinned layers were fetched as cached content
    text = await metrics_text(client)
    assert metric_value(text, "mirror_evictions_total") == fetched - cached_files
    await cache.maintain()
    text = await metrics_text(client)
    assert metric_value(text, "mirror_stored_bytes", holder="local") == local_image.total_bytes
    assert metric_value(text, "mirror_stored_bytes", holder="pinned") == 2 * LAYER
    assert metric_value(text, "mirror_stored_bytes", holder="cached") == cached_bytes_on_disk(
        root, local_digests | pinned_digests
    )

    # Every image still pulls correctly: evicted blobs (and manifests) are fetched again, transparently.
    before = fake.count("GET", images[2].layer_digests[0])
    for image in images:
        await pull(client, image)
        assert cached_bytes_on_disk(root, local_digests | pinned_digests) <= high
    assert fake.count("GET", images[2].layer_digests[0]) == before + 1
    await pull(client, local_image)
    assert local_digests | pinned_digests <= set(blob_files(root))
    await cache.flush_accesses()
    check_store(root)


async def test_evicted_manifest_and_blobs_are_fetched_again_by_tag(aiohttp_server, make_registry):
    fake = FakeUpstream()
    image = make_image("library/web", "stable", [os.urandom(256 << 10), os.urandom(256 << 10)])
    add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake, max_size=MAX_SIZE)
    cache: CacheManager = client.server.app[CACHE]
    await pull(client, image)
    # The client can hold the last byte before the server's handler has left its in-use mark.
    await eventually(lambda: not any(cache.is_busy(d) for d in image.all_digests), what="the sends to end")
    result = await cache.evict_to(0)
    assert result.evicted == len(image.all_digests) and result.cached_bytes_after == 0
    assert blob_files(client.server.app[CONFIG].storage.path) == {}
    await pull(client, image)  # same tag: the blobs come back from the upstream (the manifest too, unless
    # the hot-manifest memo still answers it from memory: either way the client sees the same bytes)
    assert fake.count("GET", f"/manifests/{image.tag}") <= 2
    for digest in image.blob_digests:
        assert fake.count("GET", digest) == 2
    check_store(client.server.app[CONFIG].storage.path)


async def test_a_blob_being_sent_is_not_evicted(aiohttp_server, make_registry):
    fake = FakeUpstream()
    big = os.urandom(32 * MiB)  # more than loopback socket buffers hold: the send is still going on
    image = make_image("library/big", "1", [big])
    add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake, max_size=MAX_SIZE)
    cache: CacheManager = client.server.app[CACHE]
    root = client.server.app[CONFIG].storage.path
    await pull(client, image)
    digest = digest_of(big)

    response = await client.get(f"/v2/library/big/blobs/{digest}")  # a hit: sendfile of the stored file
    assert response.status == 200
    first = await response.content.read(64 << 10)
    await cache.evict_to(0)  # everything else goes; the blob being sent stays
    assert digest in blob_files(root)
    rest = await response.read()
    assert first + rest == big
    response.release()
    await eventually(lambda: not cache.is_busy(digest), what="the send to end")
    await cache.evict_to(0)
    assert digest not in blob_files(root)
    await pull(client, image)


async def test_pushing_a_cached_blob_makes_it_local_for_good(aiohttp_server, make_registry):
    fake = FakeUpstream()
    shared = os.urandom(1 * MiB)
    upstream_image = make_image("library/base", "1", [shared])
    add_to_upstream(fake, upstream_image)
    client = await start(aiohttp_server, make_registry, fake, max_size=MAX_SIZE)
    cache: CacheManager = client.server.app[CACHE]
    await pull(client, upstream_image)
    local_image = make_image("local/derived", "1", [shared, os.urandom(1000)])
    await push(client, local_image)
    await cache.evict_to(0)
    files = blob_files(client.server.app[CONFIG].storage.path)
    assert digest_of(shared) in files  # held as local too: never evicted
    assert upstream_image.digest not in files
    await pull(client, local_image)
    await pull(client, upstream_image)
    assert fake.count("GET", digest_of(shared)) == 1
    rows = check_store(client.server.app[CONFIG].storage.path)
    assert rows[digest_of(shared)].holders == {CACHED, LOCAL}


async def read_blob(client: Any, repo: str, digest: str) -> bytes:
    async with client.get(f"/v2/{repo}/blobs/{digest}") as response:
        assert response.status == 200, response.status
        return await response.read()


def hold_index_database(index_dir: Path, seconds: float, locked: threading.Event) -> None:
    """What a long `mirror gc` transaction (or a backup, or a slow disk) does: another connection holds the
    index's write lock. Both file names: the SQLite table, and the diskcache store of older versions."""
    connections = [sqlite3.connect(str(path), timeout=30, isolation_level=None)
                   for path in (index_dir / "blobs.sqlite3", index_dir / "cache.db") if path.exists()]
    for db in connections:
        db.execute("BEGIN IMMEDIATE")
    locked.set()
    time.sleep(seconds)
    for db in connections:
        db.execute("COMMIT")
        db.close()


async def test_warm_reads_do_not_wait_while_an_eviction_waits_for_a_locked_index(aiohttp_server, make_registry):
    """The loop must never wait on SQLite: with the index held by another process for 3 s while a fill
    evicts, a cached blob is still served at once (it used to wait until the lock went: the eviction held
    the in-use lock, which every GET takes on the loop, across its index write)."""
    fake = FakeUpstream()
    warm = make_image("library/warm", "1", [os.urandom(1 * MiB)])
    fillers = [make_image(f"library/filler{i}", "1", [os.urandom(4 * MiB)]) for i in range(3)]
    for image in (warm, *fillers):
        add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake, max_size=10 * MiB)
    cache: CacheManager = client.server.app[CACHE]
    root = client.server.app[CONFIG].storage.path
    await pull(client, warm)
    await pull(client, warm)
    await pull(client, fillers[0])
    await pull(client, fillers[1])
    await cache.flush_accesses()  # nothing left to flush: the eviction goes straight to its victims

    locked = threading.Event()
    holder = threading.Thread(target=hold_index_database, args=(root / "index", 3.0, locked))
    holder.start()
    try:
        assert locked.wait(10)
        # A miss that needs room (evicting filler 0); straight to the blob: a manifest's hold would only wait.
        filling = asyncio.create_task(read_blob(client, fillers[2].repo, fillers[2].layer_digests[0]))
        await asyncio.sleep(0.5)  # the eviction is waiting for the index now
        started = time.monotonic()
        async with client.get(f"/v2/{warm.repo}/blobs/{warm.layer_digests[0]}") as response:
            assert response.status == 200 and await response.read() == warm.layers[0]
        waited = time.monotonic() - started
        assert waited < 1.5, f"a cached blob took {waited:.1f} s while the index was locked"
    finally:
        holder.join()
    assert await filling == fillers[2].layers[0]
    await pull(client, fillers[2])
    check_store(root)


async def test_a_one_time_pull_never_flushes_blobs_many_clients_keep_pulling(aiohttp_server, make_registry):
    """Scan resistance: a large image pulled once, needing room that only hot blobs could give, is streamed
    through to its client and not kept; the hot blobs stay, and are not fetched again."""
    fake = FakeUpstream()
    hot = [make_image(f"library/hot{i}", "1", [os.urandom(2 * MiB)]) for i in range(4)]
    once = make_image("library/once", "1", [os.urandom(6 * MiB)])
    for image in (*hot, once):
        add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake, max_size=10 * MiB)
    root = client.server.app[CONFIG].storage.path
    for _ in range(3):
        for image in hot:
            await pull(client, image)
    await pull(client, once)  # every byte arrives (pull checks them) ...
    files = blob_files(root)
    assert once.layer_digests[0] not in files  # ... but it is not kept: room would cost hotter blobs
    for image in hot:
        await pull(client, image)
        assert fake.count("GET", image.layer_digests[0]) == 1, "a hot blob was evicted and fetched again"
    # Asked for again and again, the large blob becomes worth keeping: what it evicts is no hotter than it.
    for _ in range(5):
        await pull(client, once)
    assert once.layer_digests[0] in blob_files(root)
    assert metric_value(await metrics_text(client), "mirror_fills_total", upstream="fake.io",
                        result="passed_through") >= 1
    check_store(root)


class FlakyIndex(BlobIndex):
    """A BlobIndex whose writes fail while `broken`, as SQLite's do on a full disk."""

    broken = False

    def _check(self) -> None:
        if self.broken:
            raise sqlite3.OperationalError("database or disk is full")

    def add_holder(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().add_holder(*args, **kwargs)

    def remove_holder(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().remove_holder(*args, **kwargs)

    def remove(self, digest: str) -> None:
        self._check()
        super().remove(digest)

    def forget_evictable(self, digest: str) -> bool:
        self._check()
        return super().forget_evictable(digest)

    def touch_many(self, accesses: dict[str, float]) -> None:
        self._check()
        super().touch_many(accesses)


async def test_index_write_failures_wait_in_memory_and_never_expose_a_held_blob(tmp_path):
    """On a full disk SQLite cannot write: blobs already stored must still be held (in memory, written
    later), eviction must still free space, and must not take a blob whose new holder is not written yet."""
    blobs = BlobStore(tmp_path)
    index = FlakyIndex(tmp_path / "index")
    cache = CacheManager(index, blobs, StorageConfig(path=tmp_path, max_size=1 << 20), Metrics())
    a, b, c = (os.urandom(1000 + i) for i in range(3))
    da, db, dc = (Digest.of(x) for x in (a, b, c))
    for data, digest in ((a, da), (b, db)):
        await blobs.put_bytes(data, digest)
        await cache.hold(digest, len(data), CACHED)
    index.broken = True
    await cache.hold(da, len(a), LOCAL)  # a push reused the cached copy: must not raise, must not be lost
    await blobs.put_bytes(c, dc)
    await cache.hold(dc, len(c), CACHED)
    cache.note_access(db)
    await cache.flush_accesses()
    assert cache.unsaved_changes == 2
    result = await cache.evict_to(0)
    assert result.evicted == 1 and not blobs.path_for(db).exists()  # space is freed all the same
    assert blobs.path_for(da).exists(), "evicted a blob whose local holder was waiting to be written"
    assert cache.unsaved_changes == 3  # ... and its row's removal waits too

    index.broken = False
    await cache.maintain()
    assert cache.unsaved_changes == 0
    rows = dict(index.items())
    assert set(rows) == {str(da), str(dc)}
    assert rows[str(da)].holders == {CACHED, LOCAL} and rows[str(dc)].holders == {CACHED}
    assert cache.totals == index.totals() == {CACHED: len(c), LOCAL: len(a), PINNED: 0}
    assert [p.name for p in blobs.temp_root.iterdir()] == []
    index.close()


# -- property test: CacheManager + BlobIndex + BlobStore driven directly ------------------------------

POOL = [hashlib.sha256(str(i).encode()).digest() * (32 * (1 + i % 8)) for i in range(12)]  # 1-8 KiB each
POOL_DIGESTS = [Digest.of(data) for data in POOL]
P_MAX, P_HIGH, P_LOW = 32 << 10, 0.9, 0.6


class FakeClock:
    """Strictly increasing time, so least-recent use is never a tie."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


async def _inline_to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
    await asyncio.sleep(0)
    return func(*args, **kwargs)


class InlineExecutor(concurrent.futures.Executor):
    """Runs the manager's index and file work at once, on the loop's thread: still a hop through the loop
    (the result arrives by call_soon), so concurrent steps interleave, but in the same order every run."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            future.set_exception(exc)
        return future


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="cache-prop-"))
        self.clock = FakeClock()
        self.patch = mock.patch.object(manager_module, "time", self.clock)
        self.patch.start()
        # Thread hops become plain yields to the loop: concurrent steps interleave at the same points, but
        # in the same order every run, so hypothesis can replay and shrink a failure.
        self.threads = mock.patch.object(asyncio, "to_thread", _inline_to_thread)
        self.threads.start()
        self.loop = asyncio.new_event_loop()
        self.blobs = BlobStore(self.dir)
        self.index = BlobIndex(self.dir / "index")
        config = StorageConfig(path=self.dir, max_size=P_MAX, high_watermark=P_HIGH, low_watermark=P_LOW)
        self.cache = CacheManager(self.index, self.blobs, config, Metrics(), executor=InlineExecutor())
        # The model: who holds each pool blob on disk, and its place in eviction order as the cache was told:
        # (protected: read again after it was stored, last use). Blobs go in ascending order of it.
        self.holders: dict[int, set[str]] = {}
        self.used: dict[int, tuple[bool, float]] = {}
        self.serving: dict[int, list[contextlib.ExitStack]] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        for stacks in self.serving.values():
            for stack in stacks:
                stack.close()
        self.loop.close()
        self.index.close()
        self.threads.stop()
        self.patch.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------------
    def on_disk(self) -> set[int]:
        return {i for i, d in enumerate(POOL_DIGESTS) if self.blobs.path_for(d).exists()}

    def busy(self) -> set[int]:
        return {i for i, stacks in self.serving.items() if stacks}

    def evictable(self, busy: set[int]) -> dict[int, int]:
        return {i: len(POOL[i]) for i, h in self.holders.items() if h == {CACHED} and i not in busy}

    def present(self, data: st.DataObject, label: str = "blob") -> int:
        """One of the blobs on disk (rules about existing content pick among them, not the whole pool)."""
        return data.draw(st.sampled_from(sorted(self.holders)), label=label)

    def held(self, i: int, holder: str) -> None:
        self.holders.setdefault(i, set()).add(holder)
        record = self.index.get(str(POOL_DIGESTS[i]))
        assert record is not None
        # A hold counts as a use; a read not flushed yet counts too (it is later than anything written).
        read_at = self.cache._accesses.get(str(POOL_DIGESTS[i]))
        self.used[i] = (True, read_at) if read_at is not None else (record.protected, record.last_access)

    def after_eviction(self, busy: set[int], refilled: set[int] = frozenset()) -> set[int]:
        """Blobs that left the disk must have been evictable, not in use, and first in eviction order."""
        gone = set(self.holders) - self.on_disk()
        for i in gone:
            # A refilled blob is held as cached by its fill before anything else may evict it: an orphan
            # (no holders left) that a concurrent fill took up again is cached content then.
            holders = self.holders[i] | ({CACHED} if i in refilled else set())
            assert holders == {CACHED}, f"evicted blob {i} held by {self.holders[i]}"
            assert i not in busy, f"evicted blob {i} while it was in use"
        evicted = gone | {i for i in refilled if i in self.holders}  # these may have gone and come back
        survivors = [self.used[i] for i in self.evictable(busy) if i not in evicted]
        if gone and survivors:
            assert max(self.used[i] for i in gone) < min(survivors), "evicted out of eviction order"
        for i in gone:
            del self.holders[i]
            self.used.pop(i, None)
        return gone

    async def _fill(self, i: int) -> None:
        """As a pull-through GET does: the handler marks the digest in use before it looks for the file,
        the fill makes room (counting its bytes as incoming), stores the bytes and holds them as cached."""
        data, digest = POOL[i], POOL_DIGESTS[i]
        with self.cache.serving(digest):
            async with self.cache.incoming(len(data)):
                await asyncio.sleep(0)  # let concurrent fills interleave here, as network reads would
                await self.blobs.put_bytes(data, digest)
                await self.cache.hold(digest, len(data), CACHED)

    def check_room(self, busy: set[int], incoming: int) -> None:
        # Room was made before each fill: cached content is within the high watermark, unless only blobs in
        # use (which eviction must skip) and the fills themselves keep it above.
        stuck = sum(len(POOL[j]) for j in busy if self.holders.get(j) == {CACHED})
        assert self.cache.cached_bytes <= max(int(P_MAX * P_HIGH), stuck + incoming)

    # -- rules -------------------------------------------------------------------------------------
    @initialize(ids=st.lists(st.integers(0, len(POOL) - 1), min_size=2, max_size=8))
    def start_with(self, ids: list[int]) -> None:
        for i in ids:
            self.fill(i)

    @rule(i=st.integers(0, len(POOL) - 1))
    def fill(self, i: int) -> None:
        """A pull-through miss (or a pull of content that is here for another reason)."""
        self.run(self._fill(i))
        self.after_eviction(self.busy(), refilled={i})
        self.held(i, CACHED)
        self.check_room(self.busy(), len(POOL[i]))

    @rule(ids=st.lists(st.integers(0, len(POOL) - 1), min_size=2, max_size=4, unique=True))
    def fill_concurrently(self, ids: list[int]) -> None:
        """Several misses at once: each must find room that the others are not also counting on."""

        async def go() -> None:
            await asyncio.gather(*(self._fill(i) for i in ids))

        self.run(go())
        self.after_eviction(self.busy(), refilled=set(ids))
        for i in ids:
            # One fill's room may be made by evicting another that just finished (if all older content is
            # gone already): such a blob is simply not here.
            if self.index.get(str(POOL_DIGESTS[i])) is not None:
                self.held(i, CACHED)
        self.check_room(self.busy(), sum(len(POOL[i]) for i in ids))

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        i = self.present(data)
        self.cache.note_access(POOL_DIGESTS[i])
        if self.index.get(str(POOL_DIGESTS[i])) is not None:
            self.used[i] = (True, self.clock.now)  # read again: protected once the access is flushed

    @rule(i=st.integers(0, len(POOL) - 1))
    def push(self, i: int) -> None:
        """A local push of these bytes (reusing the stored copy if there is one), as LocalRegistry does."""
        data, digest = POOL[i], POOL_DIGESTS[i]

        async def go() -> None:
            with self.cache.in_use(digest):
                stored = await self.blobs.reuse(digest)
                if stored is None:
                    await self.blobs.put_bytes(data, digest)
                await self.cache.hold(digest, len(data), LOCAL)

        self.run(go())
        self.held(i, LOCAL)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def push_while_evicting(self, data: st.DataObject) -> None:
        """A push that reuses a cached copy, racing an eviction pass that wants that very copy gone."""
        i = self.present(data)
        digest = POOL_DIGESTS[i]

        async def push() -> None:
            with self.cache.in_use(digest):
                stored = await self.blobs.reuse(digest)
                await asyncio.sleep(0)  # the eviction runs here, between finding the file and holding it
                if stored is None:
                    await self.blobs.put_bytes(POOL[i], digest)
                await self.cache.hold(digest, len(POOL[i]), LOCAL)

        async def go() -> None:
            await asyncio.gather(push(), self.cache.evict_to(0))

        busy = self.busy() | {i}
        self.run(go())
        self.after_eviction(busy, refilled={i})
        self.held(i, LOCAL)
        assert self.blobs.path_for(digest).exists()

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        i = self.present(data)
        self.run(self.cache.hold(POOL_DIGESTS[i], len(POOL[i]), PINNED))
        self.held(i, PINNED)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), holder=st.sampled_from([LOCAL, PINNED]))
    def let_go(self, data: st.DataObject, holder: str) -> None:
        """gc dropped a local link, or replication unpinned. The last holder gone leaves an orphan row (it
        counts nowhere and is never evicted; gc removes such files); a later fill holds it again."""
        i = self.present(data)
        if holder in self.holders[i]:
            self.run(self.cache.release(POOL_DIGESTS[i], holder))
            self.holders[i].discard(holder)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def serve_start(self, data: st.DataObject) -> None:
        i = self.present(data)
        stack = contextlib.ExitStack()
        stack.enter_context(self.cache.serving(POOL_DIGESTS[i]))
        self.serving.setdefault(i, []).append(stack)

    @precondition(lambda self: any(self.serving.values()))
    @rule(data=st.data())
    def serve_end(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(self.busy())))
        self.serving[i].pop().close()

    @rule(fraction=st.sampled_from([0.0, 0.3, P_LOW, 1.0]), force=st.sampled_from([0, 4096]), data=st.data())
    def evict(self, fraction: float, force: int, data: st.DataObject) -> None:
        """An eviction pass (make_room's, a full disk's with force) while some blobs are being sent."""
        sending = data.draw(st.sets(st.sampled_from(sorted(self.holders))), label="sending") if self.holders else set()
        target = int(P_MAX * fraction)
        with contextlib.ExitStack() as stack:
            for i in sending:
                stack.enter_context(self.cache.serving(POOL_DIGESTS[i]))
            result = self.run(self.cache.evict_to(target, force_bytes=force))
        busy = self.busy() | sending
        gone = self.after_eviction(busy)
        remaining = sum(self.evictable(busy).values())
        # The bound: what is left and could have gone is within the target (or nothing evictable is left).
        assert remaining <= target or remaining == 0
        assert sum(len(POOL[i]) for i in gone) >= min(force, sum(len(POOL[i]) for i in gone) + remaining)
        assert result.evicted == len(gone)
        assert result.cached_bytes_after == self.cache.cached_bytes

    @rule()
    def background_pass(self) -> None:
        self.run(self.cache.maintain())
        busy = self.busy()
        self.after_eviction(busy)
        remaining = sum(self.evictable(busy).values())
        # Above the high watermark a pass evicts down to the low one; only blobs in use may keep it above.
        assert self.cache.cached_bytes <= int(P_MAX * P_HIGH) or remaining == 0

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def index_and_disk_agree(self) -> None:
        rows = dict(self.index.items())
        files = {str(POOL_DIGESTS[i]) for i in self.on_disk()}
        assert set(rows) == files
        for key, record in rows.items():
            i = POOL_DIGESTS.index(Digest.parse(key))
            assert record.size == len(POOL[i])
            assert record.holders == frozenset(self.holders[i]), (i, record.holders, self.holders[i])

    @invariant()
    def held_and_served_blobs_are_on_disk(self) -> None:
        disk = self.on_disk()
        for i, holders in self.holders.items():
            assert i in disk, f"blob {i} held by {holders} is gone"
        assert self.busy() <= disk

    @invariant()
    def totals_match_the_index(self) -> None:
        assert self.cache.totals == self.index.totals()

    @invariant()
    def no_leftover_temp_files(self) -> None:
        assert list(self.blobs.temp_root.iterdir()) == []


CacheMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_cache_invariants = CacheMachine.TestCase


async def test_a_blob_larger_than_the_whole_bound_is_streamed_through_and_not_kept(aiohttp_server, make_registry):
    fake = FakeUpstream()
    small = make_image("library/small", "1", [os.urandom(LAYER)])
    huge = make_image("library/huge", "1", [os.urandom(6 * MiB)])
    add_to_upstream(fake, small)
    add_to_upstream(fake, huge)
    client = await start(aiohttp_server, make_registry, fake, max_size=5 * MiB)
    root = client.server.app[CONFIG].storage.path
    await pull(client, small)
    small_layer = small.layer_digests[0]
    assert small_layer in blob_files(root)

    await pull(client, huge)  # every byte arrives and is checked by pull()
    huge_layer = huge.layer_digests[0]
    files = blob_files(root)
    assert huge_layer not in files  # not kept: it alone is more than max_size
    assert small_layer in files  # and nothing was evicted to make room for it
    await pull(client, huge)  # served again, fetched again
    assert fake.count("GET", huge_layer) == 2
    check_store(root)
