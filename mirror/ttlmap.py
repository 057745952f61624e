"""TtlMap: string values that expire, for what lives only in memory and only for a while (tokens, tag hints)."""

from __future__ import annotations

import heapq
import itertools
import time


class TtlMap:
    """Values with an expiry; expired ones are dropped when read, and a few at a time on every write."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float]] = {}
        self._expiries: list[tuple[float, int, str]] = []
        self._order = itertools.count()

    def set(self, key: str, value: str, ttl: float) -> None:
        now = time.monotonic()
        expires_at = now + ttl
        self._values[key] = (value, expires_at)
        heapq.heappush(self._expiries, (expires_at, next(self._order), key))
        for _ in range(2):  # two out per one in: the heap never outgrows the live entries by much
            if not self._expiries or self._expiries[0][0] > now:
                break
            _, _, old = heapq.heappop(self._expiries)
            entry = self._values.get(old)
            if entry is not None and entry[1] <= now:
                del self._values[old]

    def get(self, key: str) -> str | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._values[key]
            return None
        return entry[0]
