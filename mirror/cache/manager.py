"""Keeps cached upstream content under `storage.max_size`, least recently used first.

The application owns one CacheManager. It records who holds each blob (through the index), buffers
last-access times in memory (a hit costs a dict write, not a database write), knows which blobs are being
served right now, and evicts `cached`-only blobs from above the high watermark down to the low one. A
fill that would not fit asks for room first. `local` and `pinned` blobs are never evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from mirror.cache.index import CACHED, HOLDERS, LOCAL, BlobIndex, BlobRecord
from mirror.config import StorageConfig
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.blobs import BlobStore
from mirror.storage.repos import RepoStore

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class EvictionResult:
    evicted: int
    freed_bytes: int
    cached_bytes_after: int


class CacheManager:
    def __init__(self, index: BlobIndex, blobs: BlobStore, config: StorageConfig, metrics: Metrics) -> None:
        self.index = index
        self.blobs = blobs
        self.max_size = config.max_size
        self.high_bytes = int(config.max_size * config.high_watermark) if config.max_size else None
        self.low_bytes = int(config.max_size * config.low_watermark) if config.max_size else None
        self.metrics = metrics
        self._accesses: dict[str, float] = {}
        self._serving: Counter[str] = Counter()
        self._eviction_lock = asyncio.Lock()
        self._totals: dict[str, int] = dict.fromkeys(HOLDERS, 0)

    # -- bookkeeping on the hot path (no I/O) --------------------------------------------------------
    def note_access(self, digest: Digest) -> None:
        self._accesses[str(digest)] = time.time()

    @contextlib.contextmanager
    def serving(self, digest: Digest) -> Iterator[None]:
        """Mark a blob as being sent: eviction passes it by until the response is done."""
        key = str(digest)
        self._serving[key] += 1
        try:
            yield
        finally:
            self._serving[key] -= 1
            if self._serving[key] <= 0:
                del self._serving[key]

    # -- holders -----------------------------------------------------------------------------------
    async def hold(self, digest: Digest, size: int, holder: str) -> None:
        before, after = await asyncio.to_thread(self.index.add_holder, str(digest), size, holder, time.time())
        self._account(before, after)

    async def release(self, digest: Digest, holder: str) -> None:
        before, after = await asyncio.to_thread(self.index.remove_holder, str(digest), holder)
        self._account(before, after)

    def _account(self, before: BlobRecord | None, after: BlobRecord | None) -> None:
        """Move a blob's bytes between holder totals, so the bound is known without scanning the index."""
        if before is not None:
            self._totals[before.accounted_as] -= before.size
        if after is not None and after.holders:
            self._totals[after.accounted_as] += after.size
        self._publish()

    def _publish(self) -> None:
        for holder, size in self._totals.items():
            self.metrics.stored_bytes.labels(holder).set(size)

    async def refresh_totals(self) -> dict[str, int]:
        self._totals = await asyncio.to_thread(self.index.totals)
        self._publish()
        return dict(self._totals)

    @property
    def cached_bytes(self) -> int:
        return self._totals[CACHED]

    # -- eviction ----------------------------------------------------------------------------------
    async def make_room(self, incoming: int) -> None:
        """Before a fill of `incoming` bytes: evict first when it would push the cache over its bound."""
        if self.high_bytes is None:
            return
        if self._totals[CACHED] + incoming > self.high_bytes:
            await self.evict_to(max((self.low_bytes or 0) - incoming, 0))

    async def evict_to(self, target: int, *, force_bytes: int = 0) -> EvictionResult:
        """Evict least recently used `cached` blobs until their total is at most `target`
        (and at least `force_bytes` are freed, for a full disk)."""
        async with self._eviction_lock:
            await self.flush_accesses()
            serving = set(self._serving)
            result = await asyncio.to_thread(self._evict_sync, target, force_bytes, serving)
            if result.evicted:
                log.info("evicted %d blobs (%d bytes); cached now %d bytes", result.evicted, result.freed_bytes,
                         result.cached_bytes_after)
                self.metrics.evictions.inc(result.evicted)
                self.metrics.evicted_bytes.inc(result.freed_bytes)
            await self.refresh_totals()
            return result

    def _evict_sync(self, target: int, force_bytes: int, serving: set[str]) -> EvictionResult:
        candidates = sorted(
            ((digest, record) for digest, record in self.index.items() if record.evictable),
            key=lambda item: item[1].last_access,
        )
        cached_total = sum(record.size for _, record in candidates)
        evicted = freed = 0
        for digest, record in candidates:
            if cached_total <= target and freed >= force_bytes:
                break
            if digest in serving:
                continue
            current = self.index.get(digest)
            if current is None or not current.evictable:
                continue  # a push linked it meanwhile
            with contextlib.suppress(Exception):
                self.blobs.delete_sync(Digest.parse(digest))
            self.index.remove(digest)
            cached_total -= record.size
            freed += record.size
            evicted += 1
        return EvictionResult(evicted, freed, cached_total)

    async def flush_accesses(self) -> None:
        if not self._accesses:
            return
        pending, self._accesses = self._accesses, {}
        await asyncio.to_thread(self.index.touch_many, pending)

    async def run(self) -> AsyncIterator[None]:
        """cleanup_ctx body: reconcile at start, then flush accesses and enforce the bound periodically."""
        task = asyncio.create_task(self._background())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush_accesses()

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.flush_accesses()
                if self.high_bytes is not None and self._totals[CACHED] > self.high_bytes:
                    await self.evict_to(self.low_bytes or 0)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("cache maintenance pass failed")


def reconcile_sync(index: BlobIndex, blobs: BlobStore, local_repos: RepoStore) -> tuple[int, int]:
    """Blocking start-up check: index rows without files are dropped; files without rows are indexed
    (as `local` when a local repository links them, else `cached`). Returns (dropped, added)."""
    on_disk: dict[str, int] = {}
    for digest in blobs.iter_digests_sync():
        stored = blobs.stat_sync(digest)
        if stored is not None:
            on_disk[str(digest)] = stored.size
    locally_linked: set[str] = set()
    for repo in local_repos.repositories():
        locally_linked.update(str(d) for d in local_repos.linked_blobs(repo))
        locally_linked.update(str(d) for d in local_repos.linked_manifests(repo))
    dropped = added = 0
    now = time.time()
    for digest, _record in list(index.items()):
        if digest not in on_disk:
            index.remove(digest)
            dropped += 1
    for digest, size in on_disk.items():
        record = index.get(digest)
        holder = LOCAL if digest in locally_linked else CACHED
        if record is None:
            index.add_holder(digest, size, holder, now)
            added += 1
        elif holder == LOCAL and LOCAL not in record.holders:
            index.add_holder(digest, size, LOCAL, now)
    return dropped, added
