"""The rate-limit gate: replication's GETs at an upstream wait while its pull budget is at the floor.

Docker Hub counts manifest GETs against a per-IP or per-account budget and announces what is left
(`ratelimit-remaining: 76;w=21600`). Pull-through clients and replication share that budget through the
upstream's one UpstreamClient; the gate lets replication spend it only above `ratelimit_floor`, so the
clients that are pulling right now keep priority. HEADs are free under Docker Hub's rules and never wait.
A 429 (from either side) blocks every rule's GETs at that upstream until its Retry-After has passed.

While paused, the gate re-checks the budget with a HEAD (free) now and then: Docker Hub's window is
rolling, so a pull's worth of budget returns every `window / limit` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mirror.errors import RegistryError
from mirror.oci.manifest import ACCEPT_ALL_MANIFESTS
from mirror.upstream.client import UpstreamClient

log = logging.getLogger(__name__)

RECHECK_MIN_SECONDS = 10.0
RECHECK_MAX_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str  # "ratelimit" (at the floor) or "retry-after" (a 429)
    upstream: str
    until: float | None  # wall clock; None: until a re-check finds budget
    remaining: int | None
    floor: int


PauseListener = Callable[[Pause | None], None]  # None: resumed


class RateGate:
    """One per upstream, shared by every rule that reads from it."""

    def __init__(self, client: UpstreamClient, floor: int, *, recheck: float | None = None) -> None:
        self.client = client
        self.floor = floor
        self._recheck = recheck
        self._probe_target: tuple[str, str] | None = None  # (repo, reference) to HEAD when re-checking

    @property
    def name(self) -> str:
        return self.client.name

    def note_target(self, repo: str, reference: str) -> None:
        """A manifest known to exist at this upstream: what a re-check HEADs."""
        self._probe_target = (repo, reference)

    def block_for(self, seconds: float) -> None:
        self.client.ratelimit.block_for(seconds)

    def recheck_seconds(self) -> float:
        if self._recheck is not None:
            return self._recheck
        reading = self.client.ratelimit
        if reading.window and reading.limit:
            return min(max(reading.window / reading.limit, RECHECK_MIN_SECONDS), RECHECK_MAX_SECONDS)
        return 60.0

    def pause_now(self) -> Pause | None:
        """Why a GET would have to wait now, or None."""
        reading = self.client.ratelimit
        now = time.time()
        if reading.blocked_until > now:
            return Pause("retry-after", self.name, reading.blocked_until, reading.remaining, self.floor)
        if reading.remaining is not None and reading.remaining <= self.floor:
            return Pause("ratelimit", self.name, None, reading.remaining, self.floor)
        return None

    async def wait(self, kind: str, rule: str, listener: PauseListener) -> None:
        """Return once a GET of `kind` ("manifest" / "blob") may go to the upstream."""
        paused = False
        # On a cluster the budget is every node's: decide on the newest reading any node published
        # (a no-op on a single node).
        await self.client.refresh_shared_budget()
        while (pause := self.pause_now()) is not None:
            if not paused:
                paused = True
                if pause.reason == "retry-after":
                    log.warning("replication rule %s: %s answered 429; %s GETs wait %.0f s (Retry-After)",
                                rule, self.name, kind, (pause.until or 0) - time.time())
                else:
                    log.warning("replication rule %s paused: %s announces %d pulls left, at or below "
                                "ratelimit_floor %d (kept for pull-through clients)",
                                rule, self.name, pause.remaining or 0, self.floor)
            listener(pause)
            if pause.until is not None:
                await asyncio.sleep(max(pause.until - time.time(), 0.0) + 0.01)
            else:
                await asyncio.sleep(self.recheck_seconds())
                await self._probe()
        if paused:
            log.info("replication rule %s resumes GETs at %s", rule, self.name)
            listener(None)

    async def _probe(self) -> None:
        """A HEAD (free) whose rate-limit headers update the reading; its answer itself does not matter."""
        if self._probe_target is None:
            return
        repo, reference = self._probe_target
        try:
            response = await self.client.open(
                "HEAD", f"/v2/{repo}/manifests/{reference}", scope=self.client.scope_for(repo),
                headers={"Accept": ACCEPT_ALL_MANIFESTS},
            )
            response.release()
        except RegistryError as exc:
            log.debug("rate-limit re-check at %s failed: %s", self.name, exc)


BeforeGet = Callable[[str], Awaitable[None]]
