"""Keeps cached upstream content under `storage.max_size`: what to keep, what to evict, and when.

The application owns one CacheManager. It records who holds each blob (through the index), buffers
last-access times in memory (a hit costs a dict write, not a database write), knows which blobs are being
served right now, decides whether a fill is worth keeping (`should_keep`: TinyLFU-style admission), and
evicts `cached`-only blobs in the index's order (unprotected before protected, least recently used
first). `local` and `pinned` blobs are never evicted.

Threads: every SQLite call runs on the manager's own index thread (one worker, so this process's index
writes are serialised without a lock), file scans and unlinks on a second one; neither is the default
executor that serves hits. The event loop never takes a lock: in-use marks are a Counter only the loop
touches, and the one step that must be atomic with them — "not in use? then take the file's name away"
— is a rename done on the loop itself (a metadata operation within one filesystem; the data is unlinked
later, in a thread). A `mirror gc` or anything else holding the database can delay index writes, never
a request that does not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mirror.cache.index import CACHED, HOLDERS, LOCAL, BlobIndex, BlobRecord, Victim
from mirror.cache.policy import FrequencyEstimator, FrequencySketch
from mirror.config import StorageConfig
from mirror.coordination.interface import Coordinator
from mirror.coordination.local import LocalCoordinator
from mirror.errors import DigestInvalid
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.blobs import BlobStore
from mirror.storage.repos import RepoStore
from mirror.tasks import running_beside

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 2.0
VICTIM_PAGE = 256  # index rows read per thread hop when choosing victims
ADMISSION_SCAN_LIMIT = 2048  # victims an admission decision may look at before it gives up (streams through)
RENAMES_PER_TURN = 64  # evictions renamed on the loop before it lets other work run
RECONCILE_CHUNK = 2000  # start-up reconciliation: rows compared per index-thread job
PROTECT_AT = 2  # requests (recently) after which a blob stored again starts protected

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EvictionResult:
    evicted: int
    freed_bytes: int
    cached_bytes_after: int


@dataclass
class ReconcileReport:
    """What the start-up check found and did, and what it cost."""

    files: int = 0
    rows: int = 0
    migrated: int = 0
    dropped: int = 0  # rows without files
    indexed: int = 0  # files without rows, now indexed
    removed: int = 0  # files without rows that nothing links
    resized: int = 0
    scan_seconds: float = 0.0
    seconds: float = 0.0
    orphans: list[str] = field(default_factory=list)


class CacheManager:
    def __init__(
        self,
        index: BlobIndex,
        blobs: BlobStore,
        config: StorageConfig,
        metrics: Metrics,
        *,
        executor: Executor | None = None,
        sketch: FrequencyEstimator | None = None,
        reconciled: bool = True,
        coordinator: Coordinator | None = None,
    ) -> None:
        """`executor`: where index and file work runs (default: two threads of the manager's own).
        `coordinator`: keeps the in-use marks (the app's; an in-process one of its own without it).
        `reconciled=False`: the index has not been checked against the files yet (see `reconcile`):
        nothing is evicted until it has been."""
        self.index = index
        self.blobs = blobs
        self.max_size = config.max_size
        self.high_bytes = int(config.max_size * config.high_watermark) if config.max_size else None
        self.low_bytes = int(config.max_size * config.low_watermark) if config.max_size else None
        self.metrics = metrics
        self._own_executors = executor is None
        self._index_executor = executor or ThreadPoolExecutor(1, thread_name_prefix="blob-index")
        self._files_executor = executor or ThreadPoolExecutor(1, thread_name_prefix="blob-files")
        self.sketch: FrequencyEstimator = sketch or FrequencySketch()
        self._accesses: dict[str, float] = {}
        # Digests in use right now (a response sending the file, a push reusing it): never evicted. Marks are
        # a Counter on the loop in every Coordinator (a cluster one publishes them in the background).
        self._marks: Coordinator = coordinator or LocalCoordinator()
        self._eviction_lock = asyncio.Lock()
        self._reconciled = asyncio.Event()
        if reconciled:
            self._reconciled.set()
            metrics.index_reconciled.set(1)
        self.reconcile_report: ReconcileReport | None = None
        # Written by the index thread only; the loop reads whole values (a dict swapped in, an int).
        self._index_totals: dict[str, int] = dict.fromkeys(HOLDERS, 0)
        # Evicted, row removal not written yet: key -> size. Replaced whole by the index thread, never changed
        # in place, so the loop can read it.
        self._pending_forgets: dict[str, int] = {}
        self._unsaved: list[_Change] = []  # index changes that failed (full disk), retried in order
        self._incoming = 0  # bytes of fills that asked for room and are not in the index yet
        self._admitted = 0  # ... of which the free-space check let these in
        self._rooms: dict[asyncio.Task[Any] | None, list[Any]] = {}  # per fill task: [size, admitted]

    async def _in_index(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._index_executor, functools.partial(func, *args))

    async def _in_files(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._files_executor, functools.partial(func, *args))

    def close(self) -> None:
        """Wait for index work under way, then stop the threads (before the index is closed)."""
        if self._own_executors:
            self._index_executor.shutdown(wait=True)
            self._files_executor.shutdown(wait=True)

    # -- bookkeeping on the hot path (no I/O, no lock) ----------------------------------------------
    def note_access(self, digest: Digest) -> None:
        key = str(digest)
        self._accesses[key] = time.time()
        self.sketch.record(key)

    @contextlib.contextmanager
    def serving(self, digest: Digest) -> Iterator[None]:
        """Mark a blob as in use (being sent, or being reused by a push): eviction passes it by until the
        block ends. Enter it *before* looking for the file. Loop thread only."""
        key = str(digest)
        self._marks.mark_in_use(key)
        try:
            yield
        finally:
            self._marks.unmark_in_use(key)

    in_use = serving

    def is_busy(self, digest: Digest | str) -> bool:
        return self._marks.in_use_here(str(digest))

    # -- holders -----------------------------------------------------------------------------------
    async def hold(self, digest: Digest, size: int, holder: str) -> None:
        key = str(digest)
        # A blob stored again that was asked for repeatedly (evicted, or streamed through, before) starts
        # protected: it is not first in line again.
        protected = holder == CACHED and self.sketch.estimate(key) >= PROTECT_AT
        await self._in_index(self._apply_sync, _Change("hold", key, size, holder, protected))

    async def release(self, digest: Digest, holder: str) -> None:
        await self._in_index(self._apply_sync, _Change("release", str(digest), 0, holder))

    def _apply_sync(self, change: _Change) -> None:
        """Index thread: write a change to the index, after any that could not be written before.

        The blob is already stored (and linked) when its holder is recorded, so a failing index (SQLite
        cannot write on a full disk) must not fail the request: the change waits in memory, in order, and
        is written by the next change or background pass that gets through. Until then the blob has no
        row, or not its new holder, and eviction leaves it alone."""
        self._unsaved.append(change)
        self._write_unsaved_sync()

    def _write_unsaved_sync(self) -> bool:
        written = False
        try:
            while self._unsaved:
                change = self._unsaved[0]
                if change.kind == "hold":
                    self.index.add_holder(change.key, change.size, change.holder, time.time(),
                                          protected=change.protected)
                elif change.kind == "release":
                    self.index.remove_holder(change.key, change.holder)
                else:  # "forget": an evicted blob's row (its file is gone already)
                    self.index.remove(change.key)
                    # Replaced, never changed in place: the loop reads it (`totals`) while this thread runs.
                    self._pending_forgets = {k: v for k, v in self._pending_forgets.items() if k != change.key}
                self._unsaved.pop(0)
                written = True
        except INDEX_ERRORS as exc:
            log.warning("blob index write failed (%s); %d change(s) wait in memory", exc, len(self._unsaved))
            return False
        finally:
            if written:
                self._refresh_totals_sync()
        return True

    def _unsaved_keys(self) -> set[str]:
        return {change.key for change in self._unsaved}

    @property
    def unsaved_changes(self) -> int:
        return len(self._unsaved)

    def _refresh_totals_sync(self) -> None:
        """Index thread: read the byte totals (kept exact by the database, whichever process wrote)."""
        try:
            self._index_totals = self.index.totals()
        except INDEX_ERRORS as exc:
            log.warning("could not read the blob index totals (%s)", exc)
            return
        self._publish()

    def _publish(self) -> None:
        for holder, size in self.totals.items():
            self.metrics.stored_bytes.labels(holder).set(size)

    async def refresh_totals(self) -> dict[str, int]:
        await self._in_index(self._refresh_totals_sync)
        return self.totals

    @property
    def totals(self) -> dict[str, int]:
        totals = dict(self._index_totals)
        totals[CACHED] -= sum(self._pending_forgets.values())  # evicted already, their rows not yet gone
        return totals

    @property
    def cached_bytes(self) -> int:
        return self.totals[CACHED]

    # -- admission ---------------------------------------------------------------------------------
    async def should_keep(self, digest: Digest, size: int | None) -> bool:
        """Before a fill of `size` bytes (a miss): keep the blob, or stream it through uncached?

        Kept when it fits under the high watermark, or when room can be made by evicting blobs that were
        asked for no more often than this one (TinyLFU admission: a one-time pull never flushes what many
        clients keep pulling). Room is made here, so call `incoming` right after (no await in between)
        to count the bytes as on their way."""
        key = str(digest)
        self.sketch.record(key)
        if self.high_bytes is None or size is None:
            return True
        if size > self.high_bytes:
            return False  # it alone would break the bound: caching it would evict everything else
        async with self._eviction_lock:
            need = self.cached_bytes + self._incoming + size - self.high_bytes
            if need <= 0:
                return True
            if not self._reconciled.is_set():
                return False  # nothing may be evicted before start-up reconciliation: no room today
            frequency = self.sketch.estimate(key)
            chosen, freed = await self._choose(need, colder_than=frequency)
            if freed < need:
                log.debug("streaming %s through: room for %d bytes would evict hotter blobs", key, size)
                return False
            await self._evict(chosen)
            return self.cached_bytes + self._incoming + size <= (self.max_size or 0)

    # -- eviction ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def incoming(self, size: int) -> AsyncIterator[None]:
        """Around a fill of `size` bytes: make room first (if `should_keep` did not), and count the bytes as
        on their way until the fill is over (committed and held, or failed), so concurrent fills cannot each
        find the same room."""
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
        if self.high_bytes is None or not self._reconciled.is_set():
            return
        if self.cached_bytes + self._incoming > self.high_bytes:
            async with self._eviction_lock:
                need = self.cached_bytes + self._incoming - self.high_bytes
                if need > 0:
                    await self._evict_at_least(need)

    async def evict_to(self, target: int, *, force_bytes: int = 0) -> EvictionResult:
        """Evict `cached` blobs in eviction order until their total is at most `target` (and at least
        `force_bytes` are freed, for a full disk). Before start-up reconciliation is done nothing is
        evicted (a fill that needed the room answers a clean 503 rather than waiting for the scan)."""
        if not self._reconciled.is_set():
            return EvictionResult(0, 0, self.cached_bytes)
        async with self._eviction_lock:
            await self.flush_accesses()
            need = max(self.cached_bytes - target, force_bytes)
            evicted, freed = await self._evict_at_least(need) if need > 0 else (0, 0)
            return EvictionResult(evicted, freed, self.cached_bytes)

    async def _evict_at_least(self, need: int) -> tuple[int, int]:
        """With the eviction lock: evict until `need` bytes are freed or nothing evictable is left."""
        evicted = freed = 0
        for _attempt in range(3):  # a victim that became busy since it was chosen is looked past next time
            chosen, _ = await self._choose(need - freed)
            if not chosen:
                break
            count, size = await self._evict(chosen)
            evicted += count
            freed += size
            if freed >= need:
                break
        return evicted, freed

    async def _choose(self, need: int, *, colder_than: int | None = None) -> tuple[list[Victim], int]:
        """Victims (in eviction order) worth at least `need` bytes, if there are: not in use, not read since
        the last flush, and with `colder_than`, never a blob asked for more often than that."""
        chosen: list[Victim] = []
        read_lately: list[Victim] = []  # read since the index last heard: after every other candidate
        freed = looked = 0
        after: tuple[int, float, str] | None = None
        while freed < need:
            page, after = await self._in_index(self._victim_page_sync, after)
            for victim in page:
                looked += 1
                if self._marks.in_use_here(victim.digest):
                    continue
                if colder_than is not None and self.sketch.estimate(victim.digest) > colder_than:
                    continue
                if victim.digest in self._accesses:
                    read_lately.append(victim)
                    continue
                chosen.append(victim)
                freed += victim.size
                if freed >= need:
                    break
            if after is None or (colder_than is not None and looked >= ADMISSION_SCAN_LIMIT):
                break
        read_lately.sort(key=lambda victim: self._accesses.get(victim.digest, 0.0))
        for victim in read_lately:
            if freed >= need:
                break
            if not self._marks.in_use_here(victim.digest):
                chosen.append(victim)
                freed += victim.size
        return chosen, freed

    def _victim_page_sync(
        self, after: tuple[int, float, str] | None
    ) -> tuple[list[Victim], tuple[int, float, str] | None]:
        """Index thread: the next page of eviction order and where it ended (None: nothing more), without
        blobs whose changes wait in memory (their row is not the whole truth) or whose eviction is not
        written yet."""
        try:
            page = self.index.victims(after, VICTIM_PAGE)
        except INDEX_ERRORS as exc:
            log.warning("could not read the blob index (%s); evicting nothing this time", exc)
            return [], None
        if not page:
            return [], None
        skip = self._unsaved_keys() | set(self._pending_forgets)
        return [victim for victim in page if victim.digest not in skip], page[-1].position

    async def _evict(self, chosen: list[Victim]) -> tuple[int, int]:
        """Take chosen victims out: renamed away on the loop (atomic with the in-use marks), their rows
        removed in the index thread (a victim some other holder took meanwhile gets its file back), their
        bytes unlinked in the file thread."""
        renamed: list[tuple[Victim, Path, Path | None]] = []
        for number, victim in enumerate(chosen):
            if number and number % RENAMES_PER_TURN == 0:
                await asyncio.sleep(0)
            if self._marks.in_use_here(victim.digest):
                continue
            try:
                path = self.blobs.path_for(Digest.parse(victim.digest))
            except DigestInvalid:
                continue
            trash: Path | None = self.blobs.temp_root / f"{uuid.uuid4().hex}.evicted"
            try:
                os.replace(path, trash)  # type: ignore[arg-type]
            except FileNotFoundError:
                trash = None  # verify quarantined it or gc removed it: the row is all that is left
            except OSError:
                log.exception("could not evict %s; keeping it", victim.digest)
                continue
            renamed.append((victim, path, trash))
        if not renamed:
            return 0, 0
        evicted, freed, doomed = await self._in_index(self._forget_sync, renamed)
        if doomed:
            await self._in_files(_unlink_all, doomed)
        if evicted:
            log.info("evicted %d blobs (%d bytes); cached now %d bytes", evicted, freed, self.cached_bytes)
            self.metrics.evictions.inc(evicted)
            self.metrics.evicted_bytes.inc(freed)
        return evicted, freed

    def _forget_sync(self, renamed: list[tuple[Victim, Path, Path | None]]) -> tuple[int, int, list[Path]]:
        """Index thread: remove the rows of renamed-away victims. Eviction is what frees a full disk, so it
        works when the index cannot be written: the row's removal then waits in memory like any change."""
        if self._unsaved:
            self._write_unsaved_sync()
        unsaved = self._unsaved_keys()
        evicted = freed = 0
        doomed: list[Path] = []
        for victim, path, trash in renamed:
            if victim.digest in unsaved:
                _restore(path, trash)  # a holder may be waiting to be written: the row is not the whole truth
                continue
            try:
                gone = self.index.forget_evictable(victim.digest)
                if not gone and self.index.get(victim.digest) is not None:
                    _restore(path, trash)  # another process gave it a holder that keeps it since we chose
                    continue
            except INDEX_ERRORS:
                self._unsaved.append(_Change("forget", victim.digest, 0, ""))
                self._pending_forgets = {**self._pending_forgets, victim.digest: victim.size}
            if trash is not None:
                doomed.append(trash)
            evicted += 1
            freed += victim.size
        self._refresh_totals_sync()
        return evicted, freed, doomed

    async def flush_accesses(self) -> None:
        if not self._accesses:
            return
        pending, self._accesses = self._accesses, {}
        try:
            await self._in_index(self.index.touch_many, pending)
        except INDEX_ERRORS as exc:
            # Keep them for the next flush (newer accesses win); the order is only as good as what is written.
            log.warning("could not record last-access times (%s); will retry", exc)
            self._accesses = {**pending, **self._accesses}

    # -- running -----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self, local_repos: RepoStore | None = None) -> AsyncIterator[None]:
        """While entered: reconcile the index with the files (when `local_repos` is given, in the
        background: requests are served meanwhile), then flush accesses and enforce the bound
        periodically; on exit, save what is left and stop the threads."""
        try:
            async with running_beside(self._background(local_repos)):
                yield
        finally:
            await self.flush_accesses()
            if self._unsaved and not await self._in_index(self._write_unsaved_sync):
                log.warning("%d blob index change(s) could not be written; start-up will reconcile the index",
                            len(self._unsaved))
            self.close()

    async def maintain(self) -> None:
        """One background pass: write index changes that failed before, flush last-access times, re-read
        the totals (`mirror gc`/`mirror verify` change the index too), and evict when cached content is
        above the high watermark (down to the low one)."""
        if self._unsaved:
            await self._in_index(self._write_unsaved_sync)
        await self.flush_accesses()
        await self.refresh_totals()
        if not self._reconciled.is_set():
            return
        if self.high_bytes is not None and self.cached_bytes + self._incoming > self.high_bytes:
            await self.evict_to(max((self.low_bytes or 0) - self._incoming, 0))

    async def _background(self, local_repos: RepoStore | None) -> None:
        if local_repos is not None and not self._reconciled.is_set():
            try:
                await self.reconcile(local_repos)
            except Exception:  # noqa: BLE001 - serving goes on; the next start-up tries again
                log.exception("start-up reconciliation of the blob index failed")
                self._reconciled.set()
                self.metrics.index_reconciled.set(1)
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.maintain()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("cache maintenance pass failed")

    # -- start-up reconciliation -------------------------------------------------------------------
    async def wait_reconciled(self) -> None:
        await self._reconciled.wait()

    @property
    def reconciled(self) -> bool:
        return self._reconciled.is_set()

    async def reconcile(self, local_repos: RepoStore) -> ReconcileReport:
        """Make the index agree with the blob files, while requests are served (nothing is evicted
        until it is done).

        A diskcache index of an older version is merged first. Rows without files are dropped. Files
        without rows are indexed as `local` when a local repository links them, as `cached` when a cached
        repository does (their last access is unknown: they count as the oldest, first in line for
        eviction), and removed when nothing links them and they are older than this process: every read
        goes through a link, so such a file (a fill or push that died between commit and link) can never
        be served. Rows whose size disagrees with the file are corrected, and rows of locally linked blobs
        gain `local`. Every change is checked again against the present (a fill or push may have stored,
        linked or held a blob since the scan) right before it is made."""
        started = time.monotonic()
        started_at = time.time()
        report = ReconcileReport()
        try:
            report.migrated = await self._in_index(self.index.migrate_legacy)
            scan = await self._in_files(_scan_store_sync, self.blobs, local_repos)
            report.scan_seconds = time.monotonic() - started
            report.files = len(scan.files)
            rows = await self._in_index(lambda: dict(self.index.items()))
            report.rows = len(rows)
            keys = sorted(set(rows) | set(scan.files))
            for start in range(0, len(keys), RECONCILE_CHUNK):
                await self._in_index(self._reconcile_chunk_sync, keys[start : start + RECONCILE_CHUNK], rows, scan,
                                     started_at, report)
            if report.orphans:
                await self._remove_orphans(report, local_repos)
            await self.refresh_totals()
        finally:
            report.seconds = time.monotonic() - started
            self.reconcile_report = report
            self._reconciled.set()
            self.metrics.index_reconciled.set(1)
            self.metrics.index_reconcile_seconds.set(report.seconds)
        log.info(
            "start-up reconciliation: %d files, %d index rows in %.2f s (scan %.2f s); merged %d old rows, "
            "dropped %d rows without files, indexed %d files, removed %d unlinked files, corrected %d sizes",
            report.files, report.rows, report.seconds, report.scan_seconds, report.migrated, report.dropped,
            report.indexed, report.removed, report.resized,
        )
        return report

    def _reconcile_chunk_sync(
        self, keys: list[str], rows: dict[str, BlobRecord], scan: _Scan, started_at: float, report: ReconcileReport
    ) -> None:
        try:
            with self.index.batch():  # one commit per chunk: 100,000 files without rows are 50 commits
                self._reconcile_keys_sync(keys, rows, scan, started_at, report)
        except INDEX_ERRORS as exc:
            log.warning("start-up recovery: could not write index fixes (%s); the next start-up tries again", exc)
        self._refresh_totals_sync()

    def _reconcile_keys_sync(
        self, keys: list[str], rows: dict[str, BlobRecord], scan: _Scan, started_at: float, report: ReconcileReport
    ) -> None:
        now = time.time()
        for key in keys:
            on_disk = scan.files.get(key)
            record = rows.get(key)
            try:
                if on_disk is None:
                    # A row without a file, unless a fill stored the file since the scan (and held it: same
                    # thread as this, so the file is there if the hold happened).
                    if record is not None and not self._exists(key):
                        self.index.remove(key)
                        report.dropped += 1
                    continue
                size, mtime = on_disk
                if record is None:
                    record = self.index.get(key)  # held since the snapshot?
                if record is None:
                    if key in scan.local:
                        self.index.add_holder(key, size, LOCAL, now)
                    elif key in scan.cached:
                        self.index.add_holder(key, size, CACHED, 0.0)
                    elif mtime < started_at:
                        report.orphans.append(key)
                        continue
                    else:
                        continue  # stored since we started: its fill or push links and holds it in a moment
                    report.indexed += 1
                    continue
                if record.size != size:
                    log.warning("start-up recovery: index said %s is %d bytes, the file has %d", key,
                                record.size, size)
                    self.index.set_size(key, size)
                    report.resized += 1
                if key in scan.local and LOCAL not in record.holders:
                    self.index.add_holder(key, size, LOCAL, now)
            except INDEX_ERRORS as exc:
                log.warning("start-up recovery: could not fix the index row of %s (%s)", key, exc)

    def _exists(self, key: str) -> bool:
        try:
            return self.blobs.path_for(Digest.parse(key)).exists()
        except DigestInvalid:
            return False

    async def _remove_orphans(self, report: ReconcileReport, local_repos: RepoStore) -> None:
        """Files nothing linked at the scan: looked at again (links now, in use now, a row now) first."""
        fresh = await self._in_files(_scan_links_sync, self.blobs, local_repos)
        renamed: list[tuple[Victim, Path, Path | None]] = []
        for key in report.orphans:
            if key in fresh.local or key in fresh.cached or self._marks.in_use_here(key):
                continue
            path = self.blobs.path_for(Digest.parse(key))
            trash = self.blobs.temp_root / f"{uuid.uuid4().hex}.evicted"
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, trash)  # on the loop: atomic with the in-use marks, as in eviction
                renamed.append((Victim(key, 0, False, 0.0), path, trash))
        doomed = await self._in_index(self._drop_orphans_sync, renamed)
        await self._in_files(_unlink_all, doomed)
        report.removed = len(doomed)

    def _drop_orphans_sync(self, renamed: list[tuple[Victim, Path, Path | None]]) -> list[Path]:
        doomed: list[Path] = []
        for victim, path, trash in renamed:
            try:
                held = self.index.get(victim.digest) is not None
            except INDEX_ERRORS:
                held = True
            if held or victim.digest in self._unsaved_keys():
                _restore(path, trash)
                continue
            log.info("start-up recovery: removed %s (no row, and no repository links it)", victim.digest)
            if trash is not None:
                doomed.append(trash)
        return doomed


# What a failing index raises: SQLite errors (a full disk: "database or disk is full"; another process
# holding the database past the busy timeout: "database is locked") and OS errors from its files.
INDEX_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


@dataclass(frozen=True, slots=True)
class _Change:
    kind: str  # hold, release, forget
    key: str
    size: int
    holder: str
    protected: bool = False


@dataclass
class _Scan:
    files: dict[str, tuple[int, float]]  # digest -> (size, mtime)
    local: set[str]
    cached: set[str]


def _restore(path: Path, trash: Path | None) -> None:
    """Give an evicted file its name back (content-addressed: if a fill stored it again meanwhile, the
    bytes are the same, so replacing is harmless)."""
    if trash is None:
        return
    try:
        os.replace(trash, path)
    except OSError:
        log.exception("could not put back %s", path)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _scan_links_sync(blobs: BlobStore, local_repos: RepoStore) -> _Scan:
    local: set[str] = set()
    for repo in local_repos.repositories():
        local.update(str(d) for d in local_repos.linked_blobs(repo))
        local.update(str(d) for d in local_repos.linked_manifests(repo))
    cached: set[str] = set()
    cache_root = blobs.root / "cache"
    for upstream_dir in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
        if not upstream_dir.is_dir():
            continue
        cache_repos = RepoStore(upstream_dir)
        for repo in cache_repos.repositories():
            cached.update(str(d) for d in cache_repos.linked_blobs(repo))
            cached.update(str(d) for d in cache_repos.linked_manifests(repo))
    return _Scan({}, local, cached)


def _scan_store_sync(blobs: BlobStore, local_repos: RepoStore) -> _Scan:
    """File thread: every blob file (size, mtime) and every link, local and cached."""
    # Bytes an eviction had renamed away but not yet unlinked when the process died: garbage at any age.
    for trash in blobs.temp_root.glob("*.evicted"):
        with contextlib.suppress(FileNotFoundError):
            trash.unlink()
    files: dict[str, tuple[int, float]] = {}
    root = blobs.blob_root
    for algorithm in os.scandir(root) if root.is_dir() else []:
        if not algorithm.is_dir():
            continue
        for prefix in os.scandir(algorithm.path):
            if not prefix.is_dir():
                continue
            for entry in os.scandir(prefix.path):
                key = f"{algorithm.name}:{entry.name}"
                try:
                    Digest.parse(key)
                    stat = entry.stat()
                except (DigestInvalid, FileNotFoundError):
                    continue  # a stray file is not a blob; verify and recovery deal with it
                files[key] = (stat.st_size, stat.st_mtime)
    links = _scan_links_sync(blobs, local_repos)
    return _Scan(files, links.local, links.cached)
