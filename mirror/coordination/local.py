"""The in-process Coordinator: one node, plain dicts and Counters touched only on the event loop.

No threads, no I/O, no timers: expiry is checked when an entry is read (monotonic clock), and finished
entries are pruned a few at a time as new ones arrive, so nothing grows without bound and nothing costs
more than a dict operation on the hot path.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import secrets
import socket
import time
from collections import Counter
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace

from mirror.coordination.interface import (
    DEFAULT_LEASE_TTL,
    FillProgress,
    FillState,
    Held,
    Lease,
    LruEntry,
    RateBudget,
    fill_key,
)
from mirror.coordination.keyed_locks import KeyedLocks
from mirror.coordination.wakeups import Wakeups
from mirror.ttlmap import TtlMap

# A finished fill's progress stays readable this long, so a follower woken by "done" still reads it.
PROGRESS_RETENTION = 60.0


def default_node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class _Held:
    token: str
    holder: str
    expires_at: float  # time.monotonic()


class LocalCoordinator:
    def __init__(self, node: str | None = None, *, lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.node = node or default_node_name()
        self.lease_ttl = lease_ttl
        self._leases: dict[str, _Held] = {}
        self._progress: dict[str, FillProgress] = {}
        self._finished: dict[str, float] = {}  # progress key -> when it may be forgotten (insertion order)
        self._changed = Wakeups()
        self._in_use: Counter[str] = Counter()
        self._lru: dict[str, tuple[int, float]] = {}
        self._lru_bytes = 0
        self._tags = TtlMap()
        self._tokens = TtlMap()
        self._budgets: dict[str, RateBudget] = {}
        self._rule_locks: dict[str, asyncio.Lock] = {}
        self._named_locks = KeyedLocks()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    # -- leases ------------------------------------------------------------------------------------
    def _live(self, key: str) -> _Held | None:
        held = self._leases.get(key)
        if held is not None and held.expires_at <= time.monotonic():
            del self._leases[key]
            return None
        return held

    def _acquire(self, key: str, ttl: float) -> Lease | Held:
        held = self._live(key)
        if held is not None:
            return Held(key, held.holder, max(held.expires_at - time.monotonic(), 0.0))
        token = f"{self.node}:{secrets.token_hex(8)}"
        self._leases[key] = _Held(token, self.node, time.monotonic() + ttl)
        return Lease(key, token, self.node, ttl)

    async def acquire_fill(self, upstream: str, digest: str, ttl: float | None = None) -> Lease | Held:
        key = fill_key(upstream, digest)
        self._prune_finished()
        outcome = self._acquire(key, self.lease_ttl if ttl is None else ttl)
        if isinstance(outcome, Held):
            return outcome
        previous = self._progress.get(key)
        taken_over = None
        if previous is not None and previous.state == "running":
            taken_over = replace(previous, holder_alive=False)
        self._finished.pop(key, None)
        version = previous.version + 1 if previous else 1
        committed, size = (taken_over.committed, taken_over.size) if taken_over else (0, None)
        self._set_progress(key, FillProgress(self.node, committed, size, "running", version, True))
        return replace(outcome, taken_over=taken_over) if taken_over else outcome

    async def renew(self, lease: Lease) -> bool:
        held = self._live(lease.key)
        if held is None or held.token != lease.token:
            return False
        held.expires_at = time.monotonic() + lease.ttl
        return True

    async def break_fill(self, upstream: str, digest: str, holder: str) -> bool:
        key = fill_key(upstream, digest)
        held = self._live(key)
        if held is None or held.holder != holder:
            return False
        del self._leases[key]
        return True

    async def release(self, lease: Lease) -> bool:
        held = self._live(lease.key)
        if held is None or held.token != lease.token:
            return False
        del self._leases[lease.key]
        return True

    # -- progress ----------------------------------------------------------------------------------
    def _set_progress(self, key: str, progress: FillProgress) -> None:
        self._progress[key] = progress
        self._changed.wake(key)

    def _prune_finished(self) -> None:
        now = time.monotonic()
        for _ in range(2):
            key = next(iter(self._finished), None)
            if key is None or self._finished[key] > now:
                return
            del self._finished[key]
            self._progress.pop(key, None)

    async def publish_progress(
        self, lease: Lease, committed: int, *, size: int | None = None, state: FillState = "running"
    ) -> bool:
        held = self._live(lease.key)
        if held is None or held.token != lease.token:
            return False
        previous = self._progress.get(lease.key)
        version = previous.version + 1 if previous else 1
        known_size = size if size is not None else (previous.size if previous else None)
        self._set_progress(lease.key, FillProgress(self.node, committed, known_size, state, version, True))
        if state != "running":
            self._finished.pop(lease.key, None)
            self._finished[lease.key] = time.monotonic() + PROGRESS_RETENTION
        return True

    def _read_progress(self, key: str) -> FillProgress | None:
        progress = self._progress.get(key)
        if progress is None:
            return None
        held = self._live(key)
        alive = held is not None and held.holder == progress.holder
        return progress if alive == progress.holder_alive else replace(progress, holder_alive=alive)

    async def fill_progress(self, upstream: str, digest: str) -> FillProgress | None:
        return self._read_progress(fill_key(upstream, digest))

    async def wait_progress(
        self, upstream: str, digest: str, seen_version: int, timeout: float
    ) -> FillProgress | None:
        key = fill_key(upstream, digest)
        current = self._read_progress(key)
        if current is not None and current.version > seen_version:
            return current
        await self._changed.wait(key, self._changed.watch(key), timeout)
        return self._read_progress(key)

    # -- in-use marks ------------------------------------------------------------------------------
    def mark_in_use(self, key: str) -> None:
        self._in_use[key] += 1

    def unmark_in_use(self, key: str) -> None:
        self._in_use[key] -= 1
        if self._in_use[key] <= 0:
            del self._in_use[key]

    def in_use_here(self, key: str) -> bool:
        return key in self._in_use

    async def is_in_use(self, key: str) -> bool:
        return key in self._in_use

    async def flush(self) -> None:
        return None

    # -- LRU ---------------------------------------------------------------------------------------
    async def touch(self, key: str, size: int, at: float) -> None:
        old = self._lru.get(key)
        if old is not None:
            self._lru_bytes -= old[0]
            at = max(at, old[1])
        self._lru[key] = (size, at)
        self._lru_bytes += size

    async def oldest(self, count: int) -> list[LruEntry]:
        picked = heapq.nsmallest(count, self._lru.items(), key=lambda item: (item[1][1], item[0]))
        return [LruEntry(key, size, at) for key, (size, at) in picked]

    async def remove(self, keys: list[str]) -> None:
        for key in keys:
            old = self._lru.pop(key, None)
            if old is not None:
                self._lru_bytes -= old[0]

    async def lru_bytes(self) -> int:
        return self._lru_bytes

    async def over_bound(self, max_bytes: int) -> list[LruEntry]:
        excess = self._lru_bytes - max_bytes
        victims: list[LruEntry] = []
        if excess <= 0:
            return victims
        for entry in sorted(
            (LruEntry(k, s, a) for k, (s, a) in self._lru.items()), key=lambda e: (e.last_access, e.key)
        ):
            victims.append(entry)
            excess -= entry.size
            if excess <= 0:
                break
        return victims

    # -- caches ------------------------------------------------------------------------------------
    async def set_tag(self, upstream: str, repository: str, tag: str, digest: str, ttl: float) -> None:
        self._tags.set(f"{upstream}/{repository}:{tag}", digest, ttl)

    async def get_tag(self, upstream: str, repository: str, tag: str) -> str | None:
        return self._tags.get(f"{upstream}/{repository}:{tag}")

    async def set_token(self, upstream: str, scope: str, token: str, ttl: float) -> None:
        self._tokens.set(f"{upstream} {scope}", token, ttl)

    async def get_token(self, upstream: str, scope: str) -> str | None:
        return self._tokens.get(f"{upstream} {scope}")

    # -- rate-limit budget -------------------------------------------------------------------------
    async def observe_budget(
        self, upstream: str, remaining: int | None, window: float | None, observed_at: float
    ) -> None:
        old = self._budgets.get(upstream)
        if old is not None and old.observed_at > observed_at:
            return
        blocked = old.blocked_until if old else 0.0
        self._budgets[upstream] = RateBudget(remaining, window or (old.window if old else None), observed_at, blocked)

    async def spend_budget(self, upstream: str, count: int = 1) -> int | None:
        old = self._budgets.get(upstream)
        if old is None or old.remaining is None:
            return None
        self._budgets[upstream] = replace(old, remaining=old.remaining - count)
        return old.remaining - count

    async def block_budget(self, upstream: str, until: float) -> None:
        old = self._budgets.get(upstream) or RateBudget(None, None, 0.0, 0.0)
        self._budgets[upstream] = replace(old, blocked_until=max(old.blocked_until, until))

    async def budget(self, upstream: str) -> RateBudget | None:
        return self._budgets.get(upstream)

    # -- rule locks --------------------------------------------------------------------------------
    def rule_lock(self, rule: str) -> AbstractAsyncContextManager[None]:
        return self._rule_locks.setdefault(rule, asyncio.Lock())

    def rule_running_here(self, rule: str) -> bool:
        lock = self._rule_locks.get(rule)
        return lock is not None and lock.locked()

    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        return self._named_locks.hold(name)
