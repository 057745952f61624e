"""How often each blob is asked for, recently: the admission side of the cache's eviction policy.

The policy is TinyLFU admission in front of a segmented LRU (see docs/behaviour.md, "Bounded disk"):
the index orders victims (unprotected before protected, least recently used first), and a fill that
needs room is only kept when none of the blobs it would evict was asked for more often than it. The
frequencies come from a count-min sketch: fixed memory whatever the number of digests, blobs that are
not stored (evicted, or streamed through) included, and aged by halving every counter after a sample of
requests, so yesterday's hot set does not squat forever.

`FrequencyEstimator` is the interface: an in-process sketch now; a shared one (Redis, CMS.INCRBY) when
several nodes share a cache.
"""

from __future__ import annotations

from typing import Protocol

_HALVE = bytes(i >> 1 for i in range(256))


class FrequencyEstimator(Protocol):
    def record(self, key: str) -> None:
        """One request for `key`."""

    def estimate(self, key: str) -> int:
        """About how many requests for `key` were recorded recently (never fewer than were)."""


class FrequencySketch:
    """Count-min sketch: 4 rows of `width` 8-bit counters (256 KiB at the default width), halved after
    `sample` recorded requests. Keys are digests, whose hex is already uniformly distributed: the row
    hashes are slices of it, not computed."""

    ROWS = 4

    def __init__(self, width: int = 1 << 16, sample: int | None = None) -> None:
        if width & (width - 1):
            raise ValueError("width must be a power of two")
        self.width = width
        self.mask = width - 1
        self.sample = sample if sample is not None else 8 * width
        self.counters = bytearray(self.ROWS * width)
        self.recorded = 0

    def _slots(self, key: str) -> list[int]:
        text = key.rpartition(":")[2]
        try:
            value = int(text[:32], 16)
        except ValueError:
            value = hash(key) & ((1 << 64) - 1)
        slots = []
        for row in range(self.ROWS):
            slots.append(row * self.width + ((value >> (row * 24)) & self.mask))
        return slots

    def record(self, key: str) -> None:
        counters = self.counters
        for slot in self._slots(key):
            if counters[slot] < 255:
                counters[slot] += 1
        self.recorded += 1
        if self.recorded >= self.sample:
            self.counters = bytearray(self.counters.translate(_HALVE))
            self.recorded //= 2

    def estimate(self, key: str) -> int:
        counters = self.counters
        return min(counters[slot] for slot in self._slots(key))
