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
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from mirror.cache.index import CACHED, HOLDERS, LOCAL, BlobIndex, BlobRecord
from mirror.cache.maintenance import STATS_FILE
from mirror.config import StorageConfig
from mirror.errors import RegistryError
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
        # Digests in use right now (a response sending the file, a push reusing it): never evicted.
        # `_busy_lock` makes "is it in use? then rename it away" atomic against marking it in use, so a
        # reader that marked a blob and then found its file keeps it until it is done.
        self._busy: Counter[str] = Counter()
        self._busy_lock = threading.Lock()
        # The byte totals change together with the index rows they summarise (both under this lock, in
        # threads), so a full recount and a concurrent hold cannot count a blob twice or not at all.
        self._totals_lock = threading.Lock()
        self._eviction_lock = asyncio.Lock()
        self._totals: dict[str, int] = dict.fromkeys(HOLDERS, 0)
        self._incoming = 0  # bytes of fills that asked for room and are not in the index yet
        self._admitted = 0  # ... of which the free-space check let these in
        self._rooms: dict[asyncio.Task[Any] | None, list[Any]] = {}  # per fill task: [size, admitted]
        self._stats_mtime: float | None = None
        self._unsaved: list[_Change] = []  # index changes that failed (full disk), retried in order

    # -- bookkeeping on the hot path (no I/O) --------------------------------------------------------
    def note_access(self, digest: Digest) -> None:
        self._accesses[str(digest)] = time.time()

    @contextlib.contextmanager
    def serving(self, digest: Digest) -> Iterator[None]:
        """Mark a blob as in use (being sent, or being reused by a push): eviction passes it by until the
        block ends. Enter it *before* looking for the file."""
        key = str(digest)
        with self._busy_lock:
            self._busy[key] += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy[key] -= 1
                if self._busy[key] <= 0:
                    del self._busy[key]

    in_use = serving

    def is_busy(self, digest: Digest | str) -> bool:
        return str(digest) in self._busy

    # -- holders -----------------------------------------------------------------------------------
    async def hold(self, digest: Digest, size: int, holder: str) -> None:
        await asyncio.to_thread(self._hold_sync, str(digest), size, holder)

    async def release(self, digest: Digest, holder: str) -> None:
        await asyncio.to_thread(self._release_sync, str(digest), holder)

    def _hold_sync(self, key: str, size: int, holder: str) -> None:
        self._apply_sync(_Change("hold", key, size, holder))

    def _release_sync(self, key: str, holder: str) -> None:
        self._apply_sync(_Change("release", key, 0, holder))

    def _apply_sync(self, change: _Change) -> None:
        """Blocking: write a change to the index, after any that could not be written before.

        The blob is already stored (and linked) when its holder is recorded, so a failing index (SQLite
        cannot write on a full disk) must not fail the request: the change waits in memory, in order, and
        is written by the next change or background pass that gets through. Until then the blob has no
        row, or not its new holder, and eviction leaves it alone."""
        with self._totals_lock:
            self._unsaved.append(change)
            self._write_unsaved_locked()

    def _write_unsaved_locked(self) -> bool:
        while self._unsaved:
            change = self._unsaved[0]
            before: BlobRecord | None
            after: BlobRecord | None
            try:
                if change.kind == "hold":
                    before, after = self.index.add_holder(change.key, change.size, change.holder, time.time())
                elif change.kind == "release":
                    before, after = self.index.remove_holder(change.key, change.holder)
                else:  # "forget": an evicted blob's row (its bytes were already subtracted)
                    self.index.remove(change.key)
                    before = after = None
            except INDEX_ERRORS as exc:
                log.warning("blob index write failed (%s); %d change(s) wait in memory", exc, len(self._unsaved))
                return False
            self._unsaved.pop(0)
            self._account(before, after)
        return True

    def _write_unsaved_sync(self) -> bool:
        with self._totals_lock:
            return self._write_unsaved_locked()

    @property
    def unsaved_changes(self) -> int:
        return len(self._unsaved)

    def _account(self, before: BlobRecord | None, after: BlobRecord | None) -> None:
        """Move a blob's bytes between holder totals, so the bound is known without scanning the index.
        Called with `_totals_lock` held."""
        if before is not None and before.holders:
            self._totals[before.accounted_as] -= before.size
        if after is not None and after.holders:
            self._totals[after.accounted_as] += after.size
        self._publish()

    def _publish(self) -> None:
        for holder, size in self._totals.items():
            self.metrics.stored_bytes.labels(holder).set(size)

    def _recount_sync(self) -> list[tuple[str, BlobRecord]]:
        """Blocking: recount the totals from the index (other processes, `mirror gc` and `mirror verify`,
        change it too); returns the rows read."""
        with self._totals_lock:
            rows = list(self.index.items())
            totals = dict.fromkeys(HOLDERS, 0)
            for _digest, record in rows:
                if record.holders:  # an orphan row (every holder released) waits for gc and counts nowhere
                    totals[record.accounted_as] += record.size
            self._totals = totals
            self._publish()
        return rows

    async def refresh_totals(self) -> dict[str, int]:
        await asyncio.to_thread(self._recount_sync)
        return dict(self._totals)

    @property
    def cached_bytes(self) -> int:
        return self._totals[CACHED]

    @property
    def totals(self) -> dict[str, int]:
        return dict(self._totals)

    # -- eviction ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def incoming(self, size: int) -> AsyncIterator[None]:
        """Around a fill of `size` bytes: make room first, and count the bytes as on their way until the
        fill is over (committed and held, or failed), so concurrent fills cannot each find the same room."""
        task = asyncio.current_task()
        self._incoming += size
        self._rooms[task] = [size, False]
        try:
            await self._make_room_for_incoming()
            yield
        finally:
            self._incoming -= size
            room = self._rooms.pop(task, None)
            if room is not None and room[1]:
                self._admitted -= size

    @property
    def incoming_bytes(self) -> int:
        """Bytes of fills under way (announced through `incoming`), not yet on disk in full."""
        return self._incoming

    def admit(self) -> None:
        """The fill running in this task found disk space for itself (see `admitted_bytes`)."""
        room = self._rooms.get(asyncio.current_task())
        if room is not None and not room[1]:
            room[1] = True
            self._admitted += room[0]

    @property
    def admitted_bytes(self) -> int:
        """Bytes of fills under way that were admitted by the free-space check: a fill checking for disk
        space counts these and itself, not every fill that merely started (all of which counting each
        other would let none of them in on a nearly full disk)."""
        return self._admitted

    async def make_room(self, incoming: int) -> None:
        """Before a fill of `incoming` bytes: evict first when it would push the cache over its bound."""
        async with self.incoming(incoming):
            pass

    async def _make_room_for_incoming(self) -> None:
        if self.high_bytes is None:
            return
        if self._totals[CACHED] + self._incoming > self.high_bytes:
            await self.evict_to(max((self.low_bytes or 0) - self._incoming, 0))

    async def evict_to(self, target: int, *, force_bytes: int = 0) -> EvictionResult:
        """Evict least recently used `cached` blobs until their total is at most `target`
        (and at least `force_bytes` are freed, for a full disk)."""
        async with self._eviction_lock:
            await self.flush_accesses()
            result = await asyncio.to_thread(self._evict_sync, target, force_bytes)
            if result.evicted:
                log.info("evicted %d blobs (%d bytes); cached now %d bytes", result.evicted, result.freed_bytes,
                         result.cached_bytes_after)
                self.metrics.evictions.inc(result.evicted)
                self.metrics.evicted_bytes.inc(result.freed_bytes)
            return result

    def _evict_sync(self, target: int, force_bytes: int) -> EvictionResult:
        rows = self._recount_sync()
        candidates = sorted(
            ((digest, record) for digest, record in rows if record.evictable),
            key=lambda item: item[1].last_access,
        )
        cached_total = sum(record.size for _, record in candidates)
        evicted = freed = 0
        doomed: list[Path] = []
        try:
            for digest, record in candidates:
                if cached_total <= target and freed >= force_bytes:
                    break
                trash = self._evict_one(digest)
                if trash is None:
                    continue
                if trash is not _GONE:
                    doomed.append(trash)
                cached_total -= record.size
                freed += record.size
                evicted += 1
        finally:
            # Unlinking a large file can take a while: done outside the locks, after the renames.
            for path in doomed:
                with contextlib.suppress(OSError):
                    path.unlink()
        return EvictionResult(evicted, freed, cached_total)

    def _evict_one(self, key: str) -> Path | None:
        """Blocking: take one blob out of the store and the index if it is still evictable and not in use.
        Returns the path its bytes were moved to (to unlink), _GONE if the file had already gone, or None
        when it was kept."""
        with self._busy_lock:
            if key in self._busy:
                return None
            with self._totals_lock:
                if any(change.key == key for change in self._unsaved):
                    return None  # a holder may be waiting to be written: the row is not the whole truth
                try:
                    current = self.index.get(key)
                    digest = Digest.parse(key)
                except RegistryError:
                    return None
                except INDEX_ERRORS:
                    return None
                if current is None or not current.evictable:
                    return None  # a push or a pin holds it now, or another process removed it
                trash: Path = _GONE
                # A rename is atomic and quick: once it happened, no reader can find the file any more.
                candidate = self.blobs.temp_root / f"{uuid.uuid4().hex}.evicted"
                try:
                    os.replace(self.blobs.path_for(digest), candidate)
                    trash = candidate
                except FileNotFoundError:
                    pass  # verify quarantined it or gc removed it: the row is all that is left
                except OSError:
                    log.exception("could not evict %s; keeping it", key)
                    return None
                # Eviction is what frees a full disk, so it must work when the index cannot be written:
                # the row's removal then waits in memory like any other change.
                self._unsaved.append(_Change("forget", key, 0, ""))
                self._write_unsaved_locked()
                self._account(current, None)
                return trash

    async def flush_accesses(self) -> None:
        if not self._accesses:
            return
        pending, self._accesses = self._accesses, {}
        try:
            await asyncio.to_thread(self.index.touch_many, pending)
        except INDEX_ERRORS as exc:
            # Keep them for the next flush (newer accesses win); LRU order is only as good as what is written.
            log.warning("could not record last-access times (%s); will retry", exc)
            self._accesses = {**pending, **self._accesses}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While entered: flush accesses and enforce the bound periodically; on exit, save what is left."""
        task = asyncio.create_task(self._background())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush_accesses()
            if self._unsaved and not await asyncio.to_thread(self._write_unsaved_sync):
                log.warning("%d blob index change(s) could not be written; start-up will reconcile the index",
                            len(self._unsaved))

    async def maintain(self) -> None:
        """One background pass: write index changes that failed before, flush last-access times, recount
        after `mirror gc`/`mirror verify` changed the index, and evict when cached content is above the
        high watermark."""
        if self._unsaved:
            await asyncio.to_thread(self._write_unsaved_sync)
        await self.flush_accesses()
        stats_mtime = await asyncio.to_thread(_mtime, self.blobs.root / STATS_FILE)
        if stats_mtime != self._stats_mtime:
            self._stats_mtime = stats_mtime
            await self.refresh_totals()
        if self.high_bytes is not None and self._totals[CACHED] + self._incoming > self.high_bytes:
            await self.evict_to(max((self.low_bytes or 0) - self._incoming, 0))

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.maintain()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("cache maintenance pass failed")


_GONE = Path("/nonexistent/evicted")  # sentinel: the blob file was already gone
# What a failing index raises: SQLite errors (a full disk: "database or disk is full"), diskcache's lock
# timeout, and OS errors from its files.
INDEX_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, diskcache.Timeout, OSError)


@dataclass(frozen=True, slots=True)
class _Change:
    kind: str  # hold, release, forget
    key: str
    size: int
    holder: str


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def reconcile_sync(index: BlobIndex, blobs: BlobStore, local_repos: RepoStore) -> tuple[int, int]:
    """Blocking start-up check (nothing else writes yet): make the index agree with the blob files.

    Rows without files are dropped. Files without rows are indexed as `local` when a local repository
    links them, as `cached` when a cached repository does (their last access is unknown: they count as
    the oldest, first in line for eviction), and removed when nothing links them: every read goes through
    a link, so such a file (a fill or push that died between commit and link) can never be served.
    Rows whose size disagrees with the file are corrected, and rows of locally linked blobs gain `local`.
    Returns (rows dropped, files indexed or removed).
    """
    # Bytes an eviction had renamed away but not yet unlinked when the process died: garbage at any age.
    for trash in blobs.temp_root.glob("*.evicted"):
        with contextlib.suppress(FileNotFoundError):
            trash.unlink()
    on_disk: dict[str, int] = {}
    for digest in blobs.iter_digests_sync():
        stored = blobs.stat_sync(digest)
        if stored is not None:
            on_disk[str(digest)] = stored.size
    locally_linked: set[str] = set()
    for repo in local_repos.repositories():
        locally_linked.update(str(d) for d in local_repos.linked_blobs(repo))
        locally_linked.update(str(d) for d in local_repos.linked_manifests(repo))
    cache_linked: set[str] = set()
    cache_root = blobs.root / "cache"
    for upstream_dir in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
        if not upstream_dir.is_dir():
            continue
        cache_repos = RepoStore(upstream_dir)
        for repo in cache_repos.repositories():
            cache_linked.update(str(d) for d in cache_repos.linked_blobs(repo))
            cache_linked.update(str(d) for d in cache_repos.linked_manifests(repo))
    dropped = added = 0
    now = time.time()
    for key, _record in list(index.items()):
        if key not in on_disk:
            index.remove(key)
            dropped += 1
    for key, size in on_disk.items():
        record = index.get(key)
        if record is None:
            if key in locally_linked:
                index.add_holder(key, size, LOCAL, now)
            elif key in cache_linked:
                index.add_holder(key, size, CACHED, 0.0)
            else:
                with contextlib.suppress(FileNotFoundError):
                    blobs.path_for(Digest.parse(key)).unlink()
                log.info("start-up recovery: removed %s (no row, and no repository links it)", key)
            added += 1
            continue
        if record.size != size:
            log.warning("start-up recovery: index said %s is %d bytes, the file has %d", key, record.size, size)
            index.set_size(key, size)
        if key in locally_linked and LOCAL not in record.holders:
            index.add_holder(key, size, LOCAL, now)
    return dropped, added
