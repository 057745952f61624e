"""The pull-through cache's shared tier: what one node fetched from an upstream, every node on the bucket serves.

Each node keeps its own disk cache in front (sendfile, bounded by its own `storage.max_size` LRU: the hot
tier). With `storage.backend: s3` the bucket behind it holds a copy of every blob and manifest a node filled
(content-addressed, under `cache/blobs/`, apart from the local repositories' `blobs/` so that evicting
from it never touches a pushed blob), and links per upstream repository under `cache/<upstream>/` (the
S3MetadataStore layout): which repository the upstream vouched them for, the
same permission the node's own links record. A node that misses looks there before the upstream:
- a manifest by digest: read from the bucket, verified against its digest, then stored and linked on the
  node as if fetched (an upstream GET, and a Docker Hub pull, saved);
- a tag: only when the upstream cannot be asked (down, or `offline`), like a stale local copy: what a tag
  names is the upstream's to say;
- a blob: streamed from the bucket through the very fill an upstream body goes through (a signed GET on the
  node's blocking pool), so the node's concurrent clients share one read and the bytes are verified and
  kept on its disk.

Publishing runs in the background after the node's own commit, a few at a time, best effort: a publish that
fails costs the other nodes an upstream fetch, nothing else (and is logged).

The tier's bytes have one cluster-wide bound, `storage.s3.cache_max_size`: every object published or read is
an entry of the coordinator's LRU (a Redis sorted set with `cluster.redis`: one for all nodes), and after a
publish the node that takes the eviction lock deletes the least recently used objects beyond the bound,
passing over those a node is reading now (in-use marks). Their links stay (a few bytes each): a link whose
bytes are gone reads as a miss, and the upstream is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from mirror.coordination.interface import Coordinator
from mirror.errors import BlobUnknown
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.storage.backend import file_chunks, one_piece, put_stream
from mirror.storage.repos import ManifestLink
from mirror.storage.s3 import S3BlobBackend
from mirror.storage.s3_meta import S3MetadataStore
from mirror.storage.s3_objects import S3Objects
from mirror.upstream.blocking import BlockingPool, BlockingResponse

log = logging.getLogger(__name__)

PUBLISH_CONCURRENCY = 4
# Publishes queued beyond this are dropped (logged): a node that cannot keep up with its bucket must not
# hold an unbounded backlog of tasks (and file references) in memory.
PUBLISH_BACKLOG = 1000
SIGNED_URL_SECONDS = 300.0
CLOSE_GRACE_SECONDS = 5.0
BLOB_PREFIX = "cache/blobs/"
EVICTION_LOCK = "shared-cache-eviction"


class SharedCache:
    """One upstream's shared tier in the bucket; app-owned, one per upstream, closed with the app."""

    def __init__(
        self, upstream: str, backend: S3BlobBackend, pool: BlockingPool, coordinator: Coordinator,
        metrics: Metrics, *, max_bytes: int | None,
    ) -> None:
        self.upstream = upstream
        self.backend = backend.view(BLOB_PREFIX)
        self.pool = pool
        self.coordinator = coordinator
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.meta = S3MetadataStore(S3Objects(backend.client, backend.bucket), prefix=f"cache/{upstream}/")
        self._slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reads -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, digest: Digest) -> Iterator[None]:
        """Held while this node streams the object from the bucket: eviction on any node passes it over."""
        key = _lru_key(digest)
        self.coordinator.mark_in_use(key)
        try:
            yield
        finally:
            self.coordinator.unmark_in_use(key)

    async def open_blob(self, repo: str, digest: Digest) -> BlockingResponse | None:
        """The blob's whole body from the bucket, when the tier has it for `repo`; None otherwise (or when
        the bucket fails: the upstream is asked instead)."""
        try:
            if not await self.meta.has_blob(repo, digest):
                return None
            url = await self.backend.signed_url(digest, expires=SIGNED_URL_SECONDS)
            response = await self.pool.request("GET", url, {})
        except Exception as exc:  # noqa: BLE001 - the shared tier is a saving, never a reason to fail
            log.warning("shared cache %s: cannot read blob %s: %s", self.upstream, digest, exc)
            return None
        if response.status == 200:
            await self._used(digest, response.content_length or 0)
            return response
        response.release()
        return None

    async def blob_size(self, repo: str, digest: Digest) -> int | None:
        try:
            if not await self.meta.has_blob(repo, digest):
                return None
            return await self.backend.stat(digest)
        except Exception as exc:  # noqa: BLE001 - as in open_blob
            log.warning("shared cache %s: cannot look up blob %s: %s", self.upstream, digest, exc)
            return None

    async def manifest(self, repo: str, digest: Digest, limit: int) -> tuple[str, bytes] | None:
        """(media type, body) of a manifest the tier holds for `repo`, verified against `digest`."""
        try:
            link = await self.meta.manifest_link(repo, digest)
            if link is None or link.size > limit:
                return None
            body = b"".join([piece async for piece in self.backend.read(digest, 0, limit + 1)])
        except BlobUnknown:
            return None
        except Exception as exc:  # noqa: BLE001 - as in open_blob
            log.warning("shared cache %s: cannot read manifest %s: %s", self.upstream, digest, exc)
            return None
        if Digest.of(body, digest.algorithm) != digest:
            log.warning("shared cache %s: manifest %s in the bucket does not match its digest", self.upstream, digest)
            return None
        await self._used(digest, len(body))
        return link.media_type, body

    async def tag(self, repo: str, tag: str) -> Digest | None:
        try:
            link = await self.meta.tag(repo, tag)
        except Exception as exc:  # noqa: BLE001 - as in open_blob
            log.warning("shared cache %s: cannot read tag %s:%s: %s", self.upstream, repo, tag, exc)
            return None
        return link.digest if link is not None else None

    # -- publishing (background) -------------------------------------------------------------------
    def publish_blob(self, repo: str, digest: Digest, path: Path, size: int) -> None:
        """Copy a blob this node committed for `repo` into the bucket (unless there) and link it there.
        `path` is read while the task runs: a blob evicted meanwhile is simply not published."""
        self._spawn(self._publish_blob(repo, digest, path, size), f"blob {digest}")

    def publish_manifest(
        self, repo: str, digest: Digest, media_type: str, body: bytes, blobs: list[Digest], tag: str | None
    ) -> None:
        """The manifest, the blobs it vouches for `repo` (linked, their bytes follow with their fills) and,
        when fetched by tag, the tag."""
        self._spawn(self._publish_manifest(repo, digest, media_type, body, blobs, tag), f"manifest {digest}")

    def publish_tag(self, repo: str, tag: str, digest: Digest, media_type: str, size: int) -> None:
        link = ManifestLink(digest, media_type, size, references_linked=True)
        self._spawn(
            self.meta.store_manifest(repo, link, referrer_of=None, referrer=None, tag=tag), f"tag {repo}:{tag}"
        )

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        if len(self._tasks) >= PUBLISH_BACKLOG:
            work.close()
            log.warning("shared cache %s: %d publishes pending; not publishing %s", self.upstream,
                        len(self._tasks), what)
            return
        task = asyncio.create_task(self._bounded(work, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bounded(self, work: Coroutine[Any, Any, None], what: str) -> None:
        async with self._slots:
            try:
                await work
            except Exception as exc:  # noqa: BLE001 - best effort, see the module docstring
                log.warning("shared cache %s: could not publish %s: %s", self.upstream, what, exc)

    async def _publish_blob(self, repo: str, digest: Digest, path: Path, size: int) -> None:
        if await self.backend.stat(digest) is None:
            try:
                await put_stream(self.backend, digest, file_chunks(path), size=size)
            except FileNotFoundError:
                return  # evicted from this node before its turn came
        await self.meta.link_blob(repo, digest)
        await self._used(digest, size)
        await self._evict()

    async def _publish_manifest(
        self, repo: str, digest: Digest, media_type: str, body: bytes, blobs: list[Digest], tag: str | None
    ) -> None:
        if await self.backend.stat(digest) is None:
            await put_stream(self.backend, digest, one_piece(body), size=len(body))
        # The blob links first: a node that finds the manifest link may rely on what it vouches for.
        for blob in dict.fromkeys(blobs):
            await self.meta.link_blob(repo, blob)
        link = ManifestLink(digest, media_type, len(body), references_linked=True)
        await self.meta.store_manifest(repo, link, referrer_of=None, referrer=None, tag=tag)
        await self._used(digest, len(body))
        await self._evict()

    # -- the cluster-wide bound --------------------------------------------------------------------
    async def _used(self, digest: Digest, size: int) -> None:
        """Record a publish or a read of the object: its place in the cluster's LRU."""
        if self.max_bytes is None:
            return
        try:
            await self.coordinator.touch(_lru_key(digest), size, time.time())
        except Exception as exc:  # noqa: BLE001 - a missed touch only makes the object look older
            log.warning("shared cache %s: cannot record use of %s: %s", self.upstream, digest, exc)

    async def _evict(self) -> None:
        """Delete the least recently used objects beyond the bound, on one node at a time."""
        if self.max_bytes is None or await self.coordinator.lru_bytes() <= self.max_bytes:
            return
        async with self.coordinator.lock(EVICTION_LOCK):
            # An object some node is reading stays (and in the index) until a later pass: the bound may be
            # exceeded by what is being read right now, never by what is idle.
            victims = [entry for entry in await self.coordinator.over_bound(self.max_bytes)
                       if not await self.coordinator.is_in_use(entry.key)]
            for entry in victims:
                digest = Digest.parse(entry.key.removeprefix("shared:"))
                await self.backend.delete(digest)
            if victims:
                await self.coordinator.remove([entry.key for entry in victims])
                self.metrics.shared_cache_evictions.inc(len(victims))
                log.info("shared cache: evicted %d objects (%d bytes) beyond cache_max_size %d", len(victims),
                         sum(entry.size for entry in victims), self.max_bytes)

    async def drain(self) -> None:
        """Wait for the publishes queued so far (tests, and a graceful stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """A graceful stop finishes what is queued, for a few seconds; the rest is left to the upstream."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), CLOSE_GRACE_SECONDS)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _lru_key(digest: Digest) -> str:
    return f"shared:{digest}"
