"""The blob index on disk: size, last access, holders and eviction segment of every blob (SQLite).

Holders say why a blob is kept: `cached` (fetched from an upstream; evictable), `local` (a pushed
repository links it; never evicted) and `pinned` (replication keeps it; never evicted).

One plain SQLite table (WAL, so readers never wait for a writer; a busy timeout, so writers of other
processes wait their turn): `mirror gc` and `mirror verify` work on it while the server runs. It was a
diskcache store before; a key-value store cannot answer "the least recently used evictable blobs" without
reading every row, and eviction asks exactly that. Here an index on (evictable, protected, last_access)
answers it in order, a page at a time, which is also the shape of a shared sorted set (ZRANGE by score)
should several nodes share one index later. A diskcache index left by an older version is merged in once
(`migrate_legacy`). Byte totals per holder live in the database too, kept by triggers, so they are exact
whichever process changed a row.

Every method blocks; the server calls them from its own index thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHED = "cached"
LOCAL = "local"
PINNED = "pinned"
HOLDERS = (CACHED, LOCAL, PINNED)

DATABASE = "blobs.sqlite3"
LEGACY_DATABASE = "cache.db"  # diskcache's file, in the same directory
BUSY_TIMEOUT_SECONDS = 5.0
MIGRATE_BATCH = 2000

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    holders TEXT NOT NULL,            -- sorted, comma-separated
    accounted TEXT NOT NULL,          -- the holder whose total counts these bytes ('' for an orphan row)
    evictable INTEGER NOT NULL,       -- nothing but the cache holds it
    protected INTEGER NOT NULL DEFAULT 0  -- used again after it was stored: evicted after unprotected blobs
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_eviction_order ON blobs (evictable, protected, last_access);
CREATE TABLE IF NOT EXISTS totals (holder TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO totals (holder, bytes) VALUES ('cached', 0), ('local', 0), ('pinned', 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS blobs_inserted AFTER INSERT ON blobs BEGIN
    UPDATE totals SET bytes = bytes + NEW.size WHERE holder = NEW.accounted;
END;
CREATE TRIGGER IF NOT EXISTS blobs_deleted AFTER DELETE ON blobs BEGIN
    UPDATE totals SET bytes = bytes - OLD.size WHERE holder = OLD.accounted;
END;
CREATE TRIGGER IF NOT EXISTS blobs_updated AFTER UPDATE OF size, accounted ON blobs BEGIN
    UPDATE totals SET bytes = bytes - OLD.size WHERE holder = OLD.accounted;
    UPDATE totals SET bytes = bytes + NEW.size WHERE holder = NEW.accounted;
END;
"""


@dataclass(frozen=True, slots=True)
class BlobRecord:
    size: int
    last_access: float
    holders: frozenset[str]
    protected: bool = False

    @property
    def evictable(self) -> bool:
        """Only content that nothing but the cache holds may be evicted."""
        return self.holders == frozenset({CACHED})

    @property
    def accounted_as(self) -> str:
        """The one holder whose byte total this blob counts in (local and pinned outrank cached)."""
        for holder in (LOCAL, PINNED, CACHED):
            if holder in self.holders:
                return holder
        return CACHED


@dataclass(frozen=True, slots=True)
class Victim:
    """An evictable blob, in eviction order: (protected, last_access, digest) ascending."""

    digest: str
    size: int
    protected: bool
    last_access: float

    @property
    def position(self) -> tuple[int, float, str]:
        return int(self.protected), self.last_access, self.digest


class BlobIndex:
    def __init__(self, directory: Path, *, migrate: bool = True) -> None:
        """Open (creating) the index in `directory`. `migrate`: merge a diskcache index left by an older
        version now (the CLI); the server does it in the background instead (`migrate_legacy`)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): transactions are explicit, BEGIN IMMEDIATE for read-modify-write.
        # check_same_thread=False: opened in one thread, used by the server's one index thread.
        self._db = sqlite3.connect(
            str(self.directory / DATABASE), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash of the process loses nothing; a power cut may lose the last commits, which
        # start-up reconciliation repairs from the files.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._create_schema()
        if migrate:
            self.migrate_legacy()

    def _schema_exists(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'blobs_updated'").fetchone() is not None

    def _create_schema(self) -> None:
        if self._schema_exists():
            return
        # Two processes opening a fresh directory at once: IF NOT EXISTS makes the loser's script a no-op.
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Several changes in one transaction (one commit instead of one each)."""
        with self._transaction():
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._db.in_transaction:  # inside batch(): part of that one
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- rows --------------------------------------------------------------------------------------
    def get(self, digest: str) -> BlobRecord | None:
        row = self._db.execute(
            "SELECT size, last_access, holders, protected FROM blobs WHERE digest = ?", (digest,)
        ).fetchone()
        return _record(row) if row is not None else None

    def _put(self, digest: str, record: BlobRecord) -> None:
        self._db.execute(
            "INSERT INTO blobs (digest, size, last_access, holders, accounted, evictable, protected) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET size = excluded.size, "
            "last_access = excluded.last_access, holders = excluded.holders, accounted = excluded.accounted, "
            "evictable = excluded.evictable, protected = excluded.protected",
            (digest, record.size, record.last_access, ",".join(sorted(record.holders)),
             record.accounted_as if record.holders else "", int(record.evictable), int(record.protected)),
        )

    def add_holder(
        self, digest: str, size: int, holder: str, now: float, *, protected: bool = False
    ) -> tuple[BlobRecord | None, BlobRecord]:
        """Add `holder` to a blob's row (creating it); returns the row before and after. `protected`: the
        blob is known to be in demand (it starts in the protected segment)."""
        with self._transaction():
            current = self.get(digest)
            if current is None:
                record = BlobRecord(size, now, frozenset({holder}), protected)
            else:
                record = BlobRecord(size, max(current.last_access, now), current.holders | {holder},
                                    current.protected or protected)
            self._put(digest, record)
        return current, record

    def remove_holder(self, digest: str, holder: str) -> tuple[BlobRecord | None, BlobRecord | None]:
        """Drop `holder` from a blob's row; returns the row before and after."""
        with self._transaction():
            current = self.get(digest)
            if current is None:
                return None, None
            record = BlobRecord(current.size, current.last_access, current.holders - {holder}, current.protected)
            self._put(digest, record)
        return current, record

    def set_size(self, digest: str, size: int) -> None:
        self._db.execute("UPDATE blobs SET size = ? WHERE digest = ?", (size, digest))

    def touch_many(self, accesses: dict[str, float]) -> None:
        """Record reads: a later last access, and a blob read again after it was stored is protected."""
        with self._transaction():
            self._db.executemany(
                "UPDATE blobs SET last_access = max(last_access, ?), protected = 1 WHERE digest = ?",
                [(when, digest) for digest, when in accesses.items()],
            )

    def remove(self, digest: str) -> None:
        self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def forget_evictable(self, digest: str) -> bool:
        """Remove an evicted blob's row, only if it is still evictable (no other holder came meanwhile,
        from this process or another). Returns whether it was removed."""
        return self._db.execute("DELETE FROM blobs WHERE digest = ? AND evictable = 1", (digest,)).rowcount > 0

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM blobs").fetchone()[0])

    def items(self) -> Iterator[tuple[str, BlobRecord]]:
        rows = self._db.execute("SELECT digest, size, last_access, holders, protected FROM blobs").fetchall()
        for digest, *rest in rows:
            yield digest, _record(rest)

    def victims(self, after: tuple[int, float, str] | None = None, limit: int = 256) -> list[Victim]:
        """The next `limit` evictable blobs in eviction order, after position `after` (a page at a time):
        unprotected before protected, least recently used first. Reads an index range, never the table."""
        if after is None:
            after = (-1, float("-inf"), "")
        rows = self._db.execute(
            "SELECT digest, size, protected, last_access FROM blobs INDEXED BY blobs_by_eviction_order "
            "WHERE evictable = 1 AND (protected, last_access, digest) > (?, ?, ?) "
            "ORDER BY protected, last_access, digest LIMIT ?",
            (*after, limit),
        ).fetchall()
        return [Victim(digest, int(size), bool(protected), float(last)) for digest, size, protected, last in rows]

    def totals(self) -> dict[str, int]:
        """Bytes per holder (orphan rows, every holder released, count nowhere): kept by triggers, so this
        is one small read whatever the size of the index."""
        sums = dict.fromkeys(HOLDERS, 0)
        for holder, size in self._db.execute("SELECT holder, bytes FROM totals"):
            if holder in sums:
                sums[holder] = int(size)
        return sums

    # -- the diskcache index of older versions -----------------------------------------------------
    def legacy_pending(self) -> bool:
        """A diskcache index is here and has not been merged yet."""
        if not (self.directory / LEGACY_DATABASE).exists():
            return False
        return self._db.execute("SELECT 1 FROM meta WHERE key = 'legacy_migrated'").fetchone() is None

    def migrate_legacy(self) -> int:
        """Merge the rows of a diskcache index left by an older version (holders united, the later access
        kept), once: rows written meanwhile by this version are not lost. Returns rows merged."""
        if not self.legacy_pending():
            return 0
        import diskcache  # only needed for this one-time migration

        legacy = diskcache.Cache(str(self.directory), eviction_policy="none", size_limit=2**62, statistics=False)
        merged = 0
        try:
            keys = [key for key in legacy.iterkeys() if isinstance(key, str)]
            for start in range(0, len(keys), MIGRATE_BATCH):
                with self._transaction():
                    for key in keys[start : start + MIGRATE_BATCH]:
                        raw = legacy.get(key)
                        if raw is None:
                            continue
                        size, last_access, holders = raw
                        current = self.get(key)
                        record = BlobRecord(int(size), float(last_access), frozenset(holders))
                        if current is not None:
                            record = BlobRecord(current.size, max(current.last_access, record.last_access),
                                                current.holders | record.holders, current.protected)
                        self._put(key, record)
                        merged += 1
            with self._transaction():
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('legacy_migrated', ?)",
                                 (str(merged),))
        finally:
            legacy.close()
        log.info("merged %d rows of the old diskcache index into %s", merged, self.directory / DATABASE)
        return merged


def _record(row: Sequence[Any]) -> BlobRecord:
    size, last_access, holders, protected = row
    return BlobRecord(int(size), float(last_access), frozenset(h for h in str(holders).split(",") if h),
                      bool(protected))
