"""The blob index on disk (diskcache, SQLite underneath): size, last access and holders of every blob.

Holders say why a blob is kept: `cached` (fetched from an upstream; evictable), `local` (a pushed
repository links it; never evicted) and `pinned` (replication keeps it; never evicted). diskcache is
process-safe, so `mirror gc` and `mirror verify` can work on the index while the server runs.
Every method blocks; async callers go through a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import diskcache

CACHED = "cached"
LOCAL = "local"
PINNED = "pinned"
HOLDERS = (CACHED, LOCAL, PINNED)


@dataclass(frozen=True, slots=True)
class BlobRecord:
    size: int
    last_access: float
    holders: frozenset[str]

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


class BlobIndex:
    def __init__(self, directory: Path) -> None:
        # Our rows must never be culled by diskcache's own size policy: eviction is our decision.
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62, statistics=False)

    def close(self) -> None:
        self._cache.close()

    def get(self, digest: str) -> BlobRecord | None:
        raw = self._cache.get(digest)
        return _decode(raw) if raw is not None else None

    def add_holder(self, digest: str, size: int, holder: str, now: float) -> tuple[BlobRecord | None, BlobRecord]:
        """Add `holder` to a blob's row (creating it); returns the row before and after."""
        with self._cache.transact():
            current = self.get(digest)
            if current is None:
                record = BlobRecord(size, now, frozenset({holder}))
            else:
                record = BlobRecord(size, max(current.last_access, now), current.holders | {holder})
            self._cache.set(digest, _encode(record))
        return current, record

    def remove_holder(self, digest: str, holder: str) -> tuple[BlobRecord | None, BlobRecord | None]:
        """Drop `holder` from a blob's row; returns the row before and after."""
        with self._cache.transact():
            current = self.get(digest)
            if current is None:
                return None, None
            record = replace(current, holders=current.holders - {holder})
            self._cache.set(digest, _encode(record))
        return current, record

    def set_size(self, digest: str, size: int) -> None:
        with self._cache.transact():
            current = self.get(digest)
            if current is not None:
                self._cache.set(digest, _encode(replace(current, size=size)))

    def touch_many(self, accesses: dict[str, float]) -> None:
        with self._cache.transact():
            for digest, when in accesses.items():
                current = self.get(digest)
                if current is not None and when > current.last_access:
                    self._cache.set(digest, _encode(replace(current, last_access=when)))

    def remove(self, digest: str) -> None:
        self._cache.delete(digest)

    def __len__(self) -> int:
        return len(self._cache)

    def items(self) -> Iterator[tuple[str, BlobRecord]]:
        for key in list(self._cache.iterkeys()):
            raw = self._cache.get(key)
            if raw is not None:
                yield key, _decode(raw)

    def totals(self) -> dict[str, int]:
        sums = dict.fromkeys(HOLDERS, 0)
        for _digest, record in self.items():
            if record.holders:  # an orphan row (every holder released) waits for gc and counts nowhere
                sums[record.accounted_as] += record.size
        return sums


def _encode(record: BlobRecord) -> tuple[int, float, tuple[str, ...]]:
    # Plain tuples pickle compactly and stay readable by any later version of this class.
    return record.size, record.last_access, tuple(sorted(record.holders))


def _decode(raw: tuple[int, float, tuple[str, ...]]) -> BlobRecord:
    size, last_access, holders = raw
    return BlobRecord(int(size), float(last_access), frozenset(holders))
