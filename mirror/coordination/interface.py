"""The `Coordinator` protocol: what mirror nodes must agree on, whatever keeps it (in-process or Redis).

Methods that may do I/O are async; the few on the hot path (in-use marks of this node, the running-here
checks the status page reads) are plain calls that never leave the process in any implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from mirror.tasks import running_beside

log = logging.getLogger(__name__)

# zot's design (PR#4099): a lease lives 90 s and its holder renews it every 30 s, so two missed heartbeats
# in a row (a stalled node, a Redis fail-over) do not yet hand the fill to another node; a dead node's
# fill is taken over within 90 s.
DEFAULT_LEASE_TTL = 90.0
DEFAULT_HEARTBEAT = 30.0

FillState = Literal["running", "done", "failed"]


class CoordinatorUnavailable(RuntimeError):
    """The shared coordinator (Redis) does not answer at start-up: a cluster node must not serve alone."""


@dataclass(frozen=True, slots=True)
class Lease:
    """Held by one node until released or expired. `token` proves ownership to renew and release."""

    key: str  # what is leased: "fill:<upstream>:<digest>" or "rule:<name>"
    token: str
    holder: str  # the node that holds it
    ttl: float  # seconds it lives unless renewed
    # A fill whose previous holder's lease lapsed while it was running (the node died): what it had
    # published. The new holder may resume from `committed` if those bytes are in the shared store.
    taken_over: FillProgress | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """Acquire lost: someone else holds the lease, for at most `expires_in` more seconds unless renewed."""

    key: str
    holder: str
    expires_in: float


@dataclass(frozen=True, slots=True)
class FillProgress:
    """What the holder of a fill published. `version` grows with every publication (waits compare it)."""

    holder: str
    committed: int  # bytes durably in place so far (readable by followers)
    size: int | None  # the blob's length once known
    state: FillState
    version: int
    holder_alive: bool  # the holder's lease is live (False + "running" = the holder died: take it over)


@dataclass(frozen=True, slots=True)
class RateBudget:
    """An upstream's pull budget as all nodes see it (mirror/upstream/ratelimit.py reads one node's)."""

    remaining: int | None
    window: float | None
    observed_at: float
    blocked_until: float


@dataclass(frozen=True, slots=True)
class LruEntry:
    key: str
    size: int
    last_access: float


class Coordinator(Protocol):
    """See docs/architecture.md "Coordination" for who uses what, and how FillManager uses the leases."""

    node: str  # this node's name (the `holder` of its leases)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the shared store does not answer (for /readyz); in-process: never raises."""
        ...

    # -- fill leases and progress (per upstream and digest) ------------------------------------------
    async def acquire_fill(self, upstream: str, digest: str, ttl: float | None = None) -> Lease | Held:
        """SET NX PX: the lease, or who holds it. A fill whose holder's lease lapsed while it was running
        is taken over: the lease returned names what the dead holder published (`taken_over`)."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend by `lease.ttl` if `lease.token` still holds it (compare-and-set); False = lost."""
        ...

    async def break_fill(self, upstream: str, digest: str, holder: str) -> bool:
        """Delete the fill lease if `holder` holds it (compare-and-delete on the holder, not a token): for a
        node that knows that holder is dead — its own previous process, restarted under the same name.
        The fill's progress is kept, so the next acquire_fill is a take-over."""
        ...

    async def release(self, lease: Lease) -> bool:
        """Delete if `lease.token` still holds it (compare-and-delete); False = it was no longer ours."""
        ...

    async def publish_progress(
        self, lease: Lease, committed: int, *, size: int | None = None, state: FillState = "running"
    ) -> bool:
        """Tell followers how far the fill got (only the lease holder may; False = the lease was lost)."""
        ...

    async def fill_progress(self, upstream: str, digest: str) -> FillProgress | None: ...

    async def wait_progress(
        self, upstream: str, digest: str, seen_version: int, timeout: float
    ) -> FillProgress | None:
        """The progress once its version exceeds `seen_version`, or the current one after `timeout` (so a
        follower notices a dead holder: `holder_alive` False); None when no fill is known."""
        ...

    # -- in-use marks eviction respects --------------------------------------------------------------
    def mark_in_use(self, key: str) -> None:
        """This node uses `key` (a response sending the blob, a push reusing it). Never does I/O here:
        a cluster implementation publishes the mark in the background (`flush` waits for that)."""
        ...

    def unmark_in_use(self, key: str) -> None: ...

    def in_use_here(self, key: str) -> bool:
        """Marked on this node (what eviction of this node's own disk checks, synchronously)."""
        ...

    async def is_in_use(self, key: str) -> bool:
        """Marked on any node (what eviction from a shared store checks)."""
        ...

    async def flush(self) -> None:
        """Wait until the marks made so far are visible to every node."""
        ...

    # -- LRU index with one cluster-wide bound ------------------------------------------------------
    async def touch(self, key: str, size: int, at: float) -> None:
        """Record an access (or a store) of `key`; the most recent `at` wins."""
        ...

    async def oldest(self, count: int) -> list[LruEntry]:
        """Least recently accessed first."""
        ...

    async def remove(self, keys: list[str]) -> None: ...

    async def lru_bytes(self) -> int:
        """The bytes of every key in the index: compared with the cluster-wide bound."""
        ...

    async def over_bound(self, max_bytes: int) -> list[LruEntry]:
        """The oldest entries whose removal brings the index to `max_bytes` or below (not removed yet)."""
        ...

    # -- caches with a time to live ----------------------------------------------------------------
    async def set_tag(self, upstream: str, repository: str, tag: str, digest: str, ttl: float) -> None: ...

    async def get_tag(self, upstream: str, repository: str, tag: str) -> str | None: ...

    async def set_token(self, upstream: str, scope: str, token: str, ttl: float) -> None: ...

    async def get_token(self, upstream: str, scope: str) -> str | None: ...

    # -- rate-limit budget per upstream ------------------------------------------------------------
    async def observe_budget(
        self, upstream: str, remaining: int | None, window: float | None, observed_at: float
    ) -> None:
        """An upstream's announcement (`ratelimit-remaining`); an older reading never replaces a newer."""
        ...

    async def spend_budget(self, upstream: str, count: int = 1) -> int | None:
        """Count `count` pulls against the shared budget: what remains, or None when none is known."""
        ...

    async def block_budget(self, upstream: str, until: float) -> None:
        """A 429's Retry-After: no node pulls from `upstream` before `until` (wall clock; the latest wins)."""
        ...

    async def budget(self, upstream: str) -> RateBudget | None: ...

    # -- replication rules: one run at a time, cluster-wide ----------------------------------------
    def rule_lock(self, rule: str) -> AbstractAsyncContextManager[None]:
        """Held while `rule` runs; waits while another run (on this node or another) holds it."""
        ...

    def rule_running_here(self, rule: str) -> bool: ...

    # -- short critical sections: one holder cluster-wide -------------------------------------------
    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """Held for a short read-judge-write (a tag move of a local repository); waits while any node holds
        `name`. A holder that dies frees it within a few seconds (a short lease, renewed while held)."""
        ...


def fill_key(upstream: str, digest: str) -> str:
    return f"fill:{upstream}:{digest}"


def rule_key(rule: str) -> str:
    return f"rule:{rule}"


@contextlib.asynccontextmanager
async def keep_alive(
    coordinator: Coordinator, lease: Lease, every: float = DEFAULT_HEARTBEAT
) -> AsyncIterator[asyncio.Event]:
    """Renew `lease` every `every` seconds while the block runs; the event is set if the lease is lost
    (the holder must then stop publishing and writing: another node owns the work now)."""
    lost = asyncio.Event()

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            try:
                renewed = await coordinator.renew(lease)
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the TTL allows for several
                log.warning("could not renew %s; retrying in %.0f s", lease.key, every, exc_info=True)
                continue
            if not renewed:
                log.warning("lease %s was lost (expired and taken by another node)", lease.key)
                lost.set()
                return

    async with running_beside(beat()):
        yield lost
