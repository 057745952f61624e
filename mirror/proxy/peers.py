"""Cluster-wide single-flight fills: one node downloads a blob, the others stream it from that node.

Who downloads is decided by the Coordinator's fill lease for (upstream, digest): the node that gets it
(the *owner*) fetches from the upstream as a single node does, renewing the lease while it runs. A node
that finds the lease held (a *follower*) asks the owner for the bytes over HTTP — `GET /_mirror/fills/
<upstream>/<digest>` on the owner's advertised address, authenticated by the cluster secret — which the
owner answers from its running fill as the bytes land (last byte held back until its digest check), or
from its stored blob after. The follower writes its own copy while hashing it, exactly as if the bytes
came from the upstream: its clients get its bytes, verified by its own digest check.

Why from the owner over HTTP and not from a shared store: there is none yet (each node keeps its own
disk). Once blobs live in S3, a follower could read the parts the owner has landed there instead.

When the owner dies (its stream to us breaks, and its lease lapses), a follower takes the lease over and
continues from the bytes it already has with `Range: bytes=<have>-` on the upstream (skipping them when
the upstream ignores Range), so the upstream sees one more GET; the other followers stream from the new
owner from where they stopped. A follower's clients see a pause, never other bytes: whatever the source,
the bytes go into one file and one hash, and the last byte is released only once the digest matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from mirror.config import ClusterConfig
from mirror.coordination.interface import Coordinator, FillProgress, FillState, Held, Lease, keep_alive
from mirror.errors import BlobUnknown, UpstreamInvalid, UpstreamUnavailable
from mirror.oci.digest import Digest
from mirror.proxy.fills import FillManager
from mirror.storage.blobs import BlobStore
from mirror.upstream.blocking import BlockingPool, BlockingResponse
from mirror.upstream.client import USER_AGENT

log = logging.getLogger(__name__)

PEER_FILL_ROUTE = "/_mirror/fills/{upstream}/{digest}"
# Guarded by the cluster secret, not by client access control (mirror/auth/middleware.py lets it through).
PEER_FILL_PREFIX = "/_mirror/fills/"
# Progress is published at most this often while bytes land (plus at the start and at the end): followers
# stream from the owner directly, Redis only needs to know that the fill lives and how far it is.
PUBLISH_EVERY = 0.25
# A follower without a source looks at the lease again at least this often (one Redis call per fill).
WAIT_POLL_SECONDS = 1.0
# How long a follower waits, without any source answering, before its clients are told to come back.
GIVE_UP_AFTER_LEASES = 3
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")

OpenUpstream = Callable[[dict[str, str]], Awaitable[BlockingResponse]]
Vouch = Callable[[], Awaitable[None]]


def _starts_at(response: BlockingResponse, offset: int) -> bool:
    """A 206 whose Content-Range begins at `offset`."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return match is not None and int(match.group(1)) == offset


class ClusterFills:
    """App-owned: this node's part in cluster-wide fills (the connections to peers, the secret)."""

    def __init__(self, config: ClusterConfig, coordinator: Coordinator, fills: FillManager, blobs: BlobStore) -> None:
        assert config.advertise is not None and config.secret is not None
        self.advertise = config.advertise
        self.coordinator = coordinator
        self.fills = fills
        self.blobs = blobs
        self.lease_ttl = config.lease_ttl
        self.heartbeat = config.lease_ttl / 3
        self._authorization = f"Bearer {config.secret}"
        # A peer that stops sending for a heartbeat is treated as gone (we look at its lease again).
        self.pool = BlockingPool(user_agent=USER_AGENT, timeout=max(self.heartbeat, 2.0))

    def authorised(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header.encode(), self._authorization.encode())

    def source(self, upstream: str, digest: Digest, *, open_upstream: OpenUpstream, vouch: Vouch) -> ClusterSource:
        return ClusterSource(self, upstream, digest, open_upstream, vouch)

    async def open_peer(self, holder: str, upstream: str, digest: Digest, offset: int) -> BlockingResponse | None:
        """The peer's bytes of the blob from `offset`, or None when it cannot give them (gone, no such fill)."""
        if not holder.startswith(("http://", "https://")) or holder == self.advertise:
            return None
        url = f"{holder}/_mirror/fills/{quote(upstream, safe='')}/{digest}"
        headers = {"Authorization": self._authorization}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = await self.pool.request("GET", url, headers)
        except Exception as exc:  # noqa: BLE001 - refused, timed out, garbled: look at its lease again
            log.info("peer %s cannot give %s: %s", holder, digest, exc)
            return None
        whole = offset == 0 and response.status == 200
        if whole or (offset and response.status == 206 and _starts_at(response, offset)):
            return response
        log.info("peer %s answered %s for %s from byte %d", holder, response.status, digest, offset)
        response.release()
        return None

    def close(self) -> None:
        self.pool.close()


class ClusterSource:
    """Where one fill's bytes come from, over its life: the upstream (we own the lease) or a peer."""

    def __init__(self, cluster: ClusterFills, upstream: str, digest: Digest, open_upstream: OpenUpstream,
                 vouch: Vouch) -> None:
        self.cluster = cluster
        self.coordinator = cluster.coordinator
        self.upstream = upstream
        self.digest = digest
        self._open_upstream = open_upstream
        self._vouch = vouch
        self._vouched = False
        self.from_peer = False
        self.peer: str | None = None
        self._response: BlockingResponse | None = None
        self._lease: Lease | None = None
        self._stack = contextlib.AsyncExitStack()
        self._size: int | None = None
        self._committed = 0
        self._published_at = 0.0
        self._publishing: asyncio.Task[None] | None = None
        self._following = False

    # -- choosing a source -------------------------------------------------------------------------
    async def first(self, *, linked: bool) -> BlockingResponse:
        """The response the fill starts with: the upstream's (any status: the caller judges it, as on a
        single node) when this node owns the lease, else a peer's 200. `linked`: the repository may read
        the blob already (else the upstream is asked with a HEAD before a peer's bytes are used)."""
        self._vouched = linked
        response, skip = await self._next(0)
        assert skip == 0
        return response

    async def resume(self, offset: int) -> tuple[BlockingResponse, int] | None:
        """The source broke after `offset` bytes: the next response continuing there, and how many of its
        first bytes to drop (an upstream that ignored our Range). None when this node owns the fill: its
        own upstream download broke, which fails the fill as on a single node (clients retry)."""
        if self._lease is not None:
            return None
        log.info("fill of %s from %s: source %s broke at byte %d; looking for another",
                 self.digest, self.upstream, self.peer or "upstream", offset)
        self._following = True
        return await self._next(offset)

    async def _next(self, offset: int) -> tuple[BlockingResponse, int]:
        self.release()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_UP_AFTER_LEASES * self.cluster.lease_ttl
        upstream, digest = self.upstream, str(self.digest)
        while True:
            progress = await self.coordinator.fill_progress(upstream, digest)
            if progress is not None and progress.holder != self.coordinator.node:
                if progress.state == "failed" and self._following:
                    raise UpstreamUnavailable(f"the fill of {digest} failed on node {progress.holder}")
                if progress.state == "done":  # stored on that node: take it from there
                    response = await self._peer(progress.holder, offset)
                    if response is not None:
                        return response, 0
            claim = await self.coordinator.acquire_fill(upstream, digest, self.cluster.lease_ttl)
            if isinstance(claim, Lease):
                return await self._own(claim, offset, progress)
            if claim.holder != self.coordinator.node:
                response = await self._peer(claim.holder, offset)
                if response is not None:
                    return response, 0
            elif await self.coordinator.break_fill(upstream, digest, claim.holder):
                # Named after this node, yet no fill of this process holds it (one fill per digest and
                # node): the process before a restart held it, or a release failed. Nobody is filling.
                log.warning("fill of %s from %s: broke this node's stale lease (held before a restart)",
                            digest, upstream)
                continue
            if loop.time() > deadline:
                raise UpstreamUnavailable(f"no node could give {digest} (held by {claim.holder})")
            await self._wait(claim, progress)

    async def _wait(self, claim: Held, progress: FillProgress | None) -> None:
        """Until the fill's progress changes, its holder's lease may have lapsed, or a second passed: a
        release publishes nothing, and a follower without a source should not idle for a heartbeat."""
        timeout = min(max(claim.expires_in, 0.05) + 0.05, WAIT_POLL_SECONDS)
        await self.coordinator.wait_progress(
            self.upstream, str(self.digest), progress.version if progress else 0, timeout
        )

    async def _peer(self, holder: str, offset: int) -> BlockingResponse | None:
        if not self._vouched:
            await self._vouch()  # raises BlobUnknown: a digest is not a capability, on any node
            self._vouched = True
        response = await self.cluster.open_peer(holder, self.upstream, self.digest, offset)
        if response is not None:
            self._response, self.from_peer, self.peer = response, True, holder
            log.info("fill of %s from %s: streaming from node %s from byte %d", self.digest, self.upstream,
                     holder, offset)
        return response

    async def _own(self, lease: Lease, offset: int, progress: FillProgress | None) -> tuple[BlockingResponse, int]:
        self._lease = lease
        self.from_peer, self.peer = False, None
        await self._stack.enter_async_context(keep_alive(self.coordinator, lease, self.cluster.heartbeat))
        if lease.taken_over is not None:
            log.warning("fill of %s from %s: took over from node %s (its lease lapsed); resuming at byte %d",
                        self.digest, self.upstream, lease.taken_over.holder, offset)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._open_upstream(headers)
        self._response = response
        if not offset:
            return response, 0
        if response.status == 206 and _starts_at(response, offset):
            return response, 0
        if response.status == 200:
            return response, offset  # Range ignored: the bytes we have are read again and dropped
        if response.status in (401, 403, 404):
            raise BlobUnknown(f"upstream {self.upstream} has no blob {self.digest}")
        raise UpstreamUnavailable(f"upstream {self.upstream} answered a resumed blob GET with {response.status}")

    # -- while the bytes land ----------------------------------------------------------------------
    def begin(self, size: int | None) -> None:
        self._size = size
        self._publish_soon(force=True)

    def written(self, count: int) -> None:
        self._committed = count
        self._publish_soon()

    def _publish_soon(self, *, force: bool = False) -> None:
        # One publication in flight at most, the newest value winning: Redis sees a few per second.
        if self._lease is None or (self._publishing is not None and not self._publishing.done()):
            return
        now = time.monotonic()
        if not force and now - self._published_at < PUBLISH_EVERY:
            return
        self._published_at = now
        self._publishing = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        assert self._lease is not None
        try:
            await self.coordinator.publish_progress(self._lease, self._committed, size=self._size)
        except Exception:  # noqa: BLE001 - progress is advice; the lease and the peer stream carry the fill
            log.debug("could not publish progress of %s", self.digest, exc_info=True)

    async def finish(self, error: BaseException | None) -> None:
        """The fill ended (committed, or with `error`): tell the other nodes, let go of the lease."""
        if self._publishing is not None:
            self._publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._publishing
        lease, self._lease = self._lease, None
        try:
            if lease is not None:
                # Only what the blob itself caused fails the followers too; anything about this node (its
                # disk, its shutdown, its upstream connection) leaves them to take over.
                state: FillState | None = "done" if error is None else (
                    "failed" if isinstance(error, (BlobUnknown, UpstreamInvalid)) else None
                )
                async with asyncio.timeout(5.0):
                    if state is not None:
                        await self.coordinator.publish_progress(
                            lease, self._committed if error else (self._size or self._committed),
                            size=self._size, state=state,
                        )
                    await self.coordinator.release(lease)
        except (TimeoutError, Exception):  # noqa: BLE001 - the lease lapses by itself
            log.warning("could not release the fill lease of %s", self.digest, exc_info=True)
        finally:
            await self._stack.aclose()
            self.release()

    def release(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.release()
