"""An upstream registry seen through the local cache: the read side of the Registry interface.

Blobs: a hit is a file; a miss joins (or starts) the one fill for that digest. Manifests by digest are
immutable and verified before they are stored; by tag they are trusted for `tag_ttl`, then revalidated
with a HEAD (free under Docker Hub's limits) and fetched again only when the digest moved. When the
upstream fails, whatever is cached is served (stale-if-error) and counted.

Layer prefetch: an image manifest fetched from the upstream starts fills for its config and layers at
once (at most `prefetch_concurrency` per upstream), so the round trip to the upstream is paid while the
client is still reading the manifest; the client's blob GETs join those fills. A prefetch never evicts:
without room it is skipped, and a client's fill that finds no room cancels the prefetches no client has
asked for yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from mirror.cache.index import CACHED
from mirror.cache.manager import CacheManager
from mirror.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    StorageFull,
    TooManyRequests,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.observe.requests import FillRecord, note_cache_result
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import ACCEPT_ALL_MANIFESTS, Descriptor, ParsedManifest, parse_manifest
from mirror.oci.names import is_valid_tag, validate_tag
from mirror.proxy.download import BodyDownload
from mirror.proxy.fills import Fill, FillManager
from mirror.proxy.memo import ExpectedSizes, ManifestMemo
from mirror.proxy.peers import ClusterFills, ClusterSource
from mirror.proxy.singleflight import SingleFlight
from mirror.storage.blobs import BlobStore, StoredBlob
from mirror.storage.interface import BlobBody, BlobFile, BlobInfo, Manifest, ManifestInfo, Registry
from mirror.storage.repos import ManifestLink, RepoStore, find_blob_sync
from mirror.upstream.blocking import BlockingResponse
from mirror.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from mirror.coordination.interface import Coordinator
    from mirror.proxy.shared_cache import SharedCache

log = logging.getLogger(__name__)

# Room kept free beyond the blobs being downloaded (index, manifests, uploads need a little too).
DISK_MARGIN_BYTES = 16 << 20
# An index of indexes of manifests is as deep as references are followed when linking them.
_MAX_INDEX_DEPTH = 2
# Errors after which cached content is better than no content (a garbled answer included).
_UPSTREAM_DOWN = (UpstreamUnavailable, TooManyRequests, UpstreamInvalid)


class PrefetchSkipped(StorageFull):
    """A prefetch no client asked for found no room: it is not worth evicting anything for."""


def _prefetchable(parsed: ParsedManifest) -> list[Descriptor]:
    """The config and layers of an image manifest worth fetching ahead: not an index's (the client picks
    one platform). Non-distributable layers are not in `parsed.blobs` (they are `parsed.foreign`): their
    bytes come from their `urls`, never from a registry."""
    if parsed.is_index or parsed.manifests:
        return []
    wanted: dict[Digest, Descriptor] = {}
    for blob in parsed.blobs:
        wanted.setdefault(blob.digest, blob)
    return list(wanted.values())


def _is_empty_blob(digest: Digest) -> bool:
    return hashlib.new(digest.algorithm, b"").hexdigest() == digest.hex


def _open_pair(path: Path) -> tuple[int, int]:
    """Blocking: a new file for the download to write and a read-only descriptor of it for the fill."""
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return write_fd, os.open(path, os.O_RDONLY)
    except BaseException:
        os.close(write_fd)
        raise


def _unclaimed_prefetch(fill: Fill) -> bool:
    return fill.prefetch and not fill.claimed


class ProxyRegistry(Registry):
    def __init__(
        self,
        client: UpstreamClient,
        blobs: BlobStore,
        repos: RepoStore,
        fills: FillManager,
        metrics: Metrics,
        cache: CacheManager,
        *,
        tag_ttl: float,
        manifest_limit: int,
        read_only_message: str,
        peers: ClusterFills | None = None,
        shared_tags: Coordinator | None = None,
        shared: SharedCache | None = None,
    ) -> None:
        self.client = client
        self.name = client.name
        self.blobs = blobs
        self.repos = repos
        self.fills = fills
        self.metrics = metrics
        self.cache = cache
        self.tag_ttl = tag_ttl
        self.manifest_limit = manifest_limit
        self.read_only_message = read_only_message
        # Set on a cluster node that shares fills: misses go through the fill lease (mirror/proxy/peers.py).
        self.peers = peers
        # Set on a cluster node: a tag one node resolved from the upstream is trusted by every node for
        # what is left of its `tag_ttl` (the coordinator keeps it that long), behind this node's memo.
        self.shared_tags = shared_tags
        # Set with storage.backend: s3: the bucket every node shares, looked at before the upstream
        # (mirror/proxy/shared_cache.py); what this node fetches is published there.
        self.shared = shared
        # Told of every finished download (the status page's "recent fills"); the app sets it.
        self.on_fill: Callable[[FillRecord], None] | None = None
        self._manifest_flights: SingleFlight[Manifest] = SingleFlight()
        self._tag_flights: SingleFlight[tuple[Manifest, float]] = SingleFlight()
        self._memo = ManifestMemo()
        self._sizes = ExpectedSizes()
        self._prefetch_slots = asyncio.Semaphore(client.config.prefetch_concurrency)
        self._prefetches: set[asyncio.Task[None]] = set()

    def _count(self, kind: str, result: str) -> None:
        self.metrics.cache_lookups.labels(self.name, kind, result).inc()
        note_cache_result(result)

    # -- blobs -------------------------------------------------------------------------------------
    async def _find(self, repo: str, digest: Digest) -> tuple[bool, StoredBlob | None]:
        """(whether `repo` links the blob, the stored file whoever links it), in one thread hop."""
        return await asyncio.to_thread(find_blob_sync, self.repos, self.blobs, repo, digest)

    async def _upstream_has_blob(self, repo: str, digest: Digest) -> int | None:
        """HEAD the blob upstream: its size when `repo` may read it there, else None."""
        response = await self.client.open("HEAD", f"/v2/{repo}/blobs/{digest}", scope=self.client.scope_for(repo))
        response.release()
        if response.status == 200:
            if response.content_length is None:
                return -1
            self._sizes.record(repo, digest, response.content_length)
            return response.content_length
        if response.status in (401, 403, 404):
            return None
        raise UpstreamUnavailable(f"upstream {self.name} answered HEAD blob with {response.status}")

    async def open_blob(self, repo: str, digest: Digest) -> BlobBody:
        # `repo` may read a blob its link names (a manifest this upstream served references it, or a fill
        # for `repo` stored it), or one this upstream confirmed with a HEAD just now. Bytes on disk or
        # arriving for any other repository (of this upstream or another) are not readable by knowing
        # their digest.
        confirmed = False
        while True:
            linked, stored = await self._find(repo, digest)
            if linked and stored is not None:
                self._count("blob", "hit")
                self.cache.note_access(digest)
                return BlobFile(digest, stored.size, stored.path)
            # No await from here to the join: a fill that finished in between would be started again
            # (a second upstream GET for bytes we already have).
            running = self.fills.running(self.name, digest)
            if running is not None and (linked or confirmed or running.readable_by(repo)):
                running.allow(repo)  # linked to `repo` too when it commits: later reads are plain hits
                self._count("blob", "prefetched" if running.prefetch and not running.claimed else "joined")
                fill = self.fills.join(self.name, digest, repo, lambda f: self._download(f, repo, digest, None))
                break
            if running is None and stored is None:
                self._count("blob", "miss")
                # The GET asks the upstream for `repo` itself: its answer is the permission.
                expected = self._sizes.get(repo, digest)
                download = functools.partial(self._download, repo=repo, digest=digest, expected=expected)
                fill = self.fills.join(self.name, digest, repo, download)
                break
            if confirmed and stored is not None:
                await asyncio.to_thread(self.repos.link_blob, repo, digest)
                # Held as cached too: when the local repository that pushed it lets go, it stays bounded.
                await self.cache.hold(digest, stored.size, CACHED)
                self._count("blob", "hit")
                self.cache.note_access(digest)
                return BlobFile(digest, stored.size, stored.path)
            # The bytes are here (or arriving) for another repository: ask the shared tier (another node
            # recorded the upstream's word for this one), else the upstream, about this one.
            vouched = self.shared is not None and await self.shared.blob_size(repo, digest) is not None
            if not vouched and await self._upstream_has_blob(repo, digest) is None:
                raise BlobUnknown(detail={"digest": str(digest)})
            confirmed = True  # look again: during the HEAD a fill may have finished or committed
        await fill.wait_ready()
        return fill

    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        linked, stored = await self._find(repo, digest)
        if linked and stored is not None:
            return BlobInfo(digest, stored.size)
        running = self.fills.running(self.name, digest)
        if running is not None and (linked or running.readable_by(repo)):
            await running.wait_ready()
            return BlobInfo(digest, running.size)
        if self.shared is not None and (shared_size := await self.shared.blob_size(repo, digest)) is not None:
            return BlobInfo(digest, shared_size)
        size = await self._upstream_has_blob(repo, digest)
        if size is None or size < 0:
            raise BlobUnknown(detail={"digest": str(digest)})
        return BlobInfo(digest, size)

    def _check_size(self, digest: Digest, content_length: int | None, expected: int | None) -> None:
        """Refuse, before any client is answered, a body whose length cannot be the blob's: one that
        disagrees with what the manifest's descriptor or a HEAD said, or an empty body for any digest
        but the empty blob's (whose one legitimate size is 0). With 0 bytes there is no last byte to
        hold back, so this must be known before headers go out."""
        empty = _is_empty_blob(digest)
        problem: str | None = None
        if content_length is not None and expected is not None and content_length != expected:
            problem = f"Content-Length {content_length} where {expected} bytes were expected"
        elif content_length == 0 and not empty:
            problem = "an empty body"
        elif empty and (content_length or expected):
            problem = f"{content_length or expected} bytes for the empty blob"
        if problem is not None:
            self.metrics.upstream_errors.labels(self.name, "size_mismatch").inc()
            raise UpstreamInvalid(f"upstream {self.name} sent {problem} for {digest}")

    async def _download(self, fill: Fill, repo: str, digest: Digest, expected: int | None) -> None:
        """Fill `digest` for `repo` from this upstream. `expected`: the blob's size as a descriptor or a
        HEAD gave it, when known."""
        linked, stored = await self._find(repo, digest)
        if linked and stored is not None:
            # A fill for this repository committed while open_blob decided to start this one (it looks for
            # the file and for running fills at two moments): serve that file instead of downloading again.
            read_fd = await asyncio.to_thread(os.open, stored.path, os.O_RDONLY)
            fill.verify()  # a stored blob was verified when it was committed
            fill.begin(stored.size, read_fd)
            await fill.commit(stored.path)
            return
        if self.shared is not None:
            with self.shared.reading(digest):
                shared = await self.shared.open_blob(repo, digest)
                if shared is not None:
                    try:
                        await self._fill_from(fill, shared, repo, digest, expected, None, from_shared=True)
                    finally:
                        shared.release()
                    return
        if self.peers is not None:
            await self._download_in_cluster(fill, repo, digest, expected, linked=linked)
            return
        response = await self._open_upstream_blob(repo, digest, {})
        try:
            await self._fill_from(fill, response, repo, digest, expected, None)
        finally:
            response.release()

    async def _open_upstream_blob(self, repo: str, digest: Digest, headers: dict[str, str]) -> BlockingResponse:
        return await self.client.open_blocking(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=self.client.scope_for(repo), headers=headers or None
        )

    async def _download_in_cluster(
        self, fill: Fill, repo: str, digest: Digest, expected: int | None, *, linked: bool
    ) -> None:
        """The fill as one node of a cluster: download it under the fill lease, or stream it from the node
        that holds the lease (mirror/proxy/peers.py), taking over if that node dies."""
        assert self.peers is not None

        async def vouch() -> None:
            if await self._upstream_has_blob(repo, digest) is None:
                raise BlobUnknown(detail={"digest": str(digest)})

        source = self.peers.source(
            self.name, digest, open_upstream=functools.partial(self._open_upstream_blob, repo, digest), vouch=vouch
        )
        error: BaseException | None = None
        try:
            response = await source.first(linked=linked)
            await self._fill_from(fill, response, repo, digest, expected, source)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await source.finish(error)

    async def _fill_from(
        self, fill: Fill, response: BlockingResponse, repo: str, digest: Digest, expected: int | None,
        source: ClusterSource | None, *, from_shared: bool = False,
    ) -> None:
        """Judge the first response of a fill and stream it into the store (see _download)."""
        if response.status in (401, 403, 404):
            raise BlobUnknown(f"upstream {self.name} has no blob {digest} in {repo}")
        if response.status != 200:
            raise UpstreamUnavailable(f"upstream {self.name} answered blob GET with {response.status}")
        self._check_size(digest, response.content_length, expected)
        # Without a Content-Length, the descriptor's size lets clients be answered (and streamed to)
        # at once; the body must then have exactly that many bytes.
        size = response.content_length if response.content_length is not None else expected
        # Room is made (and these bytes counted as on their way) before the fill answers; the count
        # lasts until the blob is held or the fill failed, so concurrent fills cannot overshoot the bound.
        # A blob larger than the whole cache bound is streamed through without being kept: caching
        # it would mean evicting everything else and still exceeding storage.max_size.
        if _unclaimed_prefetch(fill):
            # A prefetch evicts nothing (should_keep may): it fits as things are, or it is skipped. No
            # await from here into incoming(): the check holds when the bytes are counted.
            if not self._prefetch_fits(size):
                raise PrefetchSkipped(f"no room to prefetch {digest} within the cache bound")
            keep = True
        else:
            keep = await self.cache.should_keep(digest, size)
        async with self.cache.incoming(size or 0 if keep else 0):
            await self._stream_to_store(fill, response, repo, digest, size=size, keep=keep, source=source,
                                        from_shared=from_shared)

    async def _stream_to_store(
        self, fill: Fill, response: BlockingResponse, repo: str, digest: Digest, *, size: int | None,
        keep: bool = True, source: ClusterSource | None = None, from_shared: bool = False,
    ) -> None:
        """Receive the body (exactly `size` bytes when known) into a temp file while readers follow it;
        verify, then commit it (or, with `keep` false, only let the readers finish). With a cluster
        `source`, a body that breaks off is continued from wherever the source finds the rest (another
        node, or the upstream with Range) into the same file and hash."""
        started = time.perf_counter()
        temp = self.blobs.new_temp_path()
        write_fd, read_fd = await asyncio.to_thread(_open_pair, temp)
        hasher = hashlib.new(digest.algorithm)
        try:
            # Readers are answered now only when there is a last byte to hold back; an empty or unsized
            # body is published once verified.
            if size:
                await self._reserve(size, fill)
                fill.begin(size, read_fd)
            upstream_bytes = (self.metrics.shared_cache_bytes if from_shared else self.metrics.upstream_bytes).labels(
                self.name
            )

            def advance(size: int) -> None:  # bytes are on disk: readers may move on
                upstream_bytes.inc(size - fill.written)
                fill.advance(size)

            on_written = advance if source is None else self._cluster_progress(fill, source)

            if source is not None:
                source.begin(size)
            body = BodyDownload(response, write_fd, hasher, on_written, upstream=self.name, size=size)
            while True:
                try:
                    received = await body.run()
                    break
                except UpstreamUnavailable:
                    resumed = await source.resume(body.received) if source is not None and size else None
                    if resumed is None:
                        raise
                    next_response, skip = resumed
                    body = BodyDownload(next_response, write_fd, hasher, on_written, upstream=self.name, size=size,
                                        start=body.received, skip=skip)
            actual = hasher.hexdigest()
            if actual != digest.hex:
                self.metrics.upstream_errors.labels(self.name, "digest_mismatch").inc()
                raise UpstreamInvalid(f"upstream {self.name} sent bytes that do not match {digest}")
            fill.verify()
            if not size:
                fill.begin(received, read_fd)
            await asyncio.to_thread(os.close, write_fd)
            write_fd = -1
            if not keep:
                # Verified: the readers may have the last byte. They read through their own descriptors,
                # so the file can go now; nothing is committed or indexed.
                await asyncio.to_thread(temp.unlink, True)
                await fill.commit(None)
                self._fill_finished(repo, digest, received, started, "passed_through")
                return
            stored = await asyncio.to_thread(self.blobs.commit_sync, temp, digest, actual, received)
            linked: set[str] = set()
            await self._link_new_repositories(fill, digest, linked)
            await self.cache.hold(digest, received, CACHED)
            # Clients that joined meanwhile were allowed after the first linking: link them too. No await
            # between the last check and commit(), after which nobody can join this fill.
            await self._link_new_repositories(fill, digest, linked)
            await fill.commit(stored.path)
            self._fill_finished(repo, digest, received, started, "ok")
            if self.shared is not None and not from_shared:
                self.shared.publish_blob(repo, digest, stored.path, received)
            elapsed = time.perf_counter() - started
            log.info("filled %s from %s/%s: %d bytes in %.2f s (%.0f MB/s)", digest, self.name, repo, received,
                     elapsed, received / elapsed / 1e6 if elapsed else 0.0)
        except BaseException as exc:
            if write_fd >= 0:
                await asyncio.to_thread(os.close, write_fd)
            await asyncio.to_thread(temp.unlink, True)
            if not fill.has_descriptor:
                await asyncio.to_thread(os.close, read_fd)  # never handed to the fill
            if not isinstance(exc, PrefetchSkipped):  # counted as a prefetch result instead
                result = "invalid" if isinstance(exc, UpstreamInvalid) else "failed"
                self._fill_finished(repo, digest, fill.written, started, result)
            raise

    def _cluster_progress(self, fill: Fill, source: ClusterSource) -> Callable[[int], None]:
        """on_written for a cluster fill: bytes from a peer are counted as such, and the owner publishes."""
        upstream_bytes = self.metrics.upstream_bytes.labels(self.name)
        peer_bytes = self.metrics.cluster_peer_bytes.labels(self.name)

        def on_written(size: int) -> None:
            (peer_bytes if source.from_peer else upstream_bytes).inc(size - fill.written)
            fill.advance(size)
            source.written(size)

        return on_written

    def _fill_finished(self, repo: str, digest: Digest, size: int, started: float, result: str) -> None:
        self.metrics.fills.labels(self.name, result).inc()
        if self.on_fill is not None:
            self.on_fill(FillRecord(self.name, repo, str(digest), size, time.perf_counter() - started, result,
                                    time.time()))

    async def _reserve(self, size: int, fill: Fill) -> None:
        """Check there is room for the blob before any client is answered, so a full disk is a clean 503 up
        front rather than a connection cut halfway. Counts the other fills still on their way; evicts
        cached content once if that makes room.

        Free space is checked, not allocated: preallocating (posix_fallocate) made every later write into
        the file a third slower here, on the hottest path there is. A disk filled by someone else during
        the download still fails the fill cleanly (clients are cut and retry; nothing is committed)."""
        # Only fills already admitted count, plus this one: with every started fill counted, concurrent
        # fills on a nearly full disk each counted all the others and all of them got 503. (No await
        # between computing `needed` and admit(), or two fills could both take the same space.)
        #
        # A prefetch no client asked for evicts nothing: without room it is skipped. A client's fill that
        # still finds no room after evicting cancels such prefetches (theirs is the room it needs).
        free = await self.blobs.free_bytes()
        needed = self.cache.admitted_bytes + size + DISK_MARGIN_BYTES
        if free >= needed:
            self.cache.admit()
            return
        if _unclaimed_prefetch(fill):
            raise PrefetchSkipped(f"no disk space to prefetch {size} bytes")
        await self.cache.evict_to(max(self.cache.cached_bytes - (needed - free), 0), force_bytes=needed - free)
        free = await self.blobs.free_bytes()
        short = free < self.cache.admitted_bytes + size + DISK_MARGIN_BYTES
        if short and await self.fills.give_up_unclaimed_prefetches():
            free = await self.blobs.free_bytes()
        if free < self.cache.admitted_bytes + size + DISK_MARGIN_BYTES:
            self.metrics.upstream_errors.labels(self.name, "disk_full").inc()
            raise StorageFull(f"no space left to cache {size} bytes")
        self.cache.admit()

    def _prefetch_fits(self, size: int | None) -> bool:
        """Whether a prefetch of `size` bytes fits under the cache bound without evicting anything."""
        cache = self.cache
        if size is None:
            return True  # checked against the disk once the upstream says how big it is
        if cache.max_size is not None and size > cache.max_size:
            return False
        return cache.high_bytes is None or cache.cached_bytes + cache.incoming_bytes + size <= cache.high_bytes

    # -- prefetch ----------------------------------------------------------------------------------
    def _start_prefetch(self, repo: str, parsed: ParsedManifest) -> None:
        """Fetch ahead what an image manifest just served through `repo` names (see the module docstring)."""
        if not self.client.config.prefetch:
            return
        for blob in _prefetchable(parsed):
            task = asyncio.create_task(self._prefetch(repo, blob), name=f"prefetch {self.name} {blob.digest}")
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)

    async def _prefetch(self, repo: str, blob: Descriptor) -> None:
        result = "failed"
        try:
            async with self._prefetch_slots:
                result = await self._prefetch_now(repo, blob)
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except Exception:  # noqa: BLE001 - a prefetch is only a saving: the client's own GET still works
            log.exception("prefetch of %s from %s failed", blob.digest, self.name)
        finally:
            self.metrics.prefetch_fills.labels(self.name, result).inc()

    async def _prefetch_now(self, repo: str, blob: Descriptor) -> str:
        digest = blob.digest
        if self.fills.running(self.name, digest) is not None:
            return "running"
        _linked, stored = await self._find(repo, digest)
        if stored is not None:
            return "cached"
        if not self._prefetch_fits(blob.size):
            return "no_room"
        if await self.blobs.free_bytes() < self.cache.admitted_bytes + blob.size + DISK_MARGIN_BYTES:
            return "no_room"
        download = functools.partial(self._download, repo=repo, digest=digest, expected=blob.size)
        started = self.fills.prefetch(self.name, digest, repo, download)
        if started is None:
            return "running"  # a client's fill began during the look at the disk
        fill, task = started
        await asyncio.wait({task})  # never cancels the fill: a client may have joined it
        if fill.committed:
            return "ok"
        if task.cancelled():
            return "cancelled"
        return "no_room" if isinstance(fill.error, PrefetchSkipped) else "failed"

    async def _link_new_repositories(self, fill: Fill, digest: Digest, linked: set[str]) -> None:
        """Link the committed blob to every repository the fill was confirmed for and `linked` lacks."""
        while pending := fill.repos - linked:
            await asyncio.to_thread(self._link_blob_to_all, pending, digest)
            linked |= pending

    def _link_blob_to_all(self, repos: set[str], digest: Digest) -> None:
        """Blocking: link a committed blob to every repository its fill was confirmed for."""
        for name in sorted(repos):
            self.repos.link_blob(name, digest)

    # -- manifests ---------------------------------------------------------------------------------
    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        return (await self.get_manifest(repo, reference)).info

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        if looks_like_digest(reference):
            return await self._manifest_by_digest(repo, Digest.parse(reference))
        return await self._manifest_by_tag(repo, validate_tag(reference))

    async def _cached_manifest(self, repo: str, digest: Digest) -> Manifest | None:
        link = await asyncio.to_thread(self.repos.manifest_link, repo, digest)
        if link is None:
            return None
        body = await self.blobs.read_bytes(digest)
        if body is None:
            return None
        read = await asyncio.to_thread(self._read_cached_manifest_sync, repo, link, body)
        if read is None:
            return None
        media_type, vouched = read
        self._record_sizes(repo, vouched)
        return Manifest(digest, media_type, body)

    def _read_cached_manifest_sync(
        self, repo: str, link: ManifestLink, body: bytes
    ) -> tuple[str, list[Descriptor]] | None:
        """Blocking: (the media type to serve, the blobs it vouches for) of a manifest found cached for
        `repo`. Links written before references were linked, or for a child an index named, get their
        references linked now, as _fetch_manifest does; None when the body is not what such a link says
        (it is fetched from the upstream instead)."""
        try:
            parsed = parse_manifest(body, link.media_type)
        except RegistryError:
            return (link.media_type, []) if link.references_linked else None
        if link.references_linked:
            return link.media_type, list(parsed.blobs)
        return parsed.media_type, self._link_manifest_sync(repo, link.digest, parsed, body)

    async def _manifest_by_digest(self, repo: str, digest: Digest) -> Manifest:
        memo = self._memo.get(("digest", repo, digest))
        cached = memo.manifest if memo is not None else await self._cached_manifest(repo, digest)
        if cached is not None:
            self._count("manifest", "hit")
            self.cache.note_access(digest)
            self._memo.put(("digest", repo, digest), cached)
            return cached
        self._count("manifest", "miss")
        manifest = await self._manifest_flights.run(
            ("digest", repo, digest), lambda: self._fetch_manifest(repo, str(digest), expected=digest)
        )
        self._memo.put(("digest", repo, digest), manifest)
        return manifest

    def forget_tag(self, repo: str, tag: str) -> None:
        """The tag was rewritten in the cache behind the proxy (by replication): read it from disk next."""
        self._memo.discard(("tag", repo, tag))

    async def _manifest_by_tag(self, repo: str, tag: str) -> Manifest:
        key = ("tag", repo, tag)
        # A hot tag within its TTL is answered from memory: no thread hop, no file read.
        memo = self._memo.get(key)
        if memo is not None and (time.time() - memo.validated_at < self.tag_ttl or self.client.config.offline):
            self._count("tag", "hit")
            self.cache.note_access(memo.manifest.digest)
            return memo.manifest
        link = await asyncio.to_thread(self.repos.tag, repo, tag)
        cached = await self._cached_manifest(repo, link.digest) if link else None
        if cached is not None and link is not None:
            fresh = time.time() - link.validated_at < self.tag_ttl
            if fresh or self.client.config.offline:
                self._count("tag", "hit")
                self.cache.note_access(cached.digest)
                self._memo.put(key, cached, link.validated_at)
                return cached
        try:
            manifest, validated_at = await self._tag_flights.run(key, lambda: self._resolve_tag(repo, tag, cached))
        except _UPSTREAM_DOWN:
            if cached is None:
                cached = await self._shared_tier_tag(repo, tag)
            if cached is None:
                raise
            log.info("serving stale %s/%s:%s (upstream unavailable)", self.name, repo, tag)
            self._count("tag", "stale")
            return cached
        except ManifestUnknown:
            self._memo.discard(key)
            raise
        self._memo.put(key, manifest, validated_at)
        return manifest

    async def _shared_tier_tag(self, repo: str, tag: str) -> Manifest | None:
        """With the upstream unreachable and nothing on this node: the manifest another node last fetched
        for the tag, from the shared tier (served stale, as a local copy would be)."""
        if self.shared is None:
            return None
        digest = await self.shared.tag(repo, tag)
        if digest is None:
            return None
        try:
            manifest = await self._manifest_by_digest(repo, digest)
        except (ManifestUnknown, *_UPSTREAM_DOWN):
            return None
        # Dated long ago: the next request with the upstream back revalidates it at once.
        await asyncio.to_thread(self._set_tag_sync, repo, tag, digest, 0.0)
        return manifest

    async def _resolve_tag(self, repo: str, tag: str, cached: Manifest | None) -> tuple[Manifest, float]:
        """The tag's manifest and when it was last confirmed against the upstream: by another node of the
        cluster within `tag_ttl` if one did, else by asking the upstream now (and telling the others)."""
        shared = await self._shared_tag(repo, tag, cached)
        if shared is not None:
            return shared
        manifest = await self._refresh_tag(repo, tag, cached)
        validated_at = time.time()
        if self.shared_tags is not None:
            # The digest and when it was resolved: a node that reads it trusts it only for the rest of
            # the TTL, not for a whole TTL of its own.
            try:
                await self.shared_tags.set_tag(self.name, repo, tag, f"{manifest.digest} {validated_at!r}",
                                               self.tag_ttl)
            except Exception:  # noqa: BLE001 - the other nodes ask the upstream themselves then
                log.warning("could not share tag %s/%s:%s", self.name, repo, tag, exc_info=True)
        return manifest, validated_at

    def _set_tag_sync(self, repo: str, tag: str, digest: Digest, validated_at: float) -> None:
        # Dated when the other node confirmed it: read back from disk, it is trusted no longer than that.
        self.repos.set_tag(repo, tag, digest)
        self.repos.touch_tag(repo, tag, validated_at)

    async def _shared_tag(self, repo: str, tag: str, cached: Manifest | None) -> tuple[Manifest, float] | None:
        if self.shared_tags is None or self.client.config.offline:
            return None
        try:
            value = await self.shared_tags.get_tag(self.name, repo, tag)
        except Exception:  # noqa: BLE001 - the upstream still answers
            log.warning("could not read shared tag %s/%s:%s", self.name, repo, tag, exc_info=True)
            return None
        digest_text, _, at_text = (value or "").partition(" ")
        try:
            digest = Digest.parse(digest_text)
            validated_at = float(at_text)
        except (RegistryError, ValueError):
            return None
        if time.time() - validated_at >= self.tag_ttl:
            return None
        if cached is not None and cached.digest == digest:
            manifest = cached
        else:
            # Another node resolved the tag to a digest this node has not served for the tag: the manifest
            # by digest (from this node's cache, else the upstream: immutable and verified), then the tag.
            try:
                manifest = await self._manifest_by_digest(repo, digest)
            except ManifestUnknown:
                return None  # gone by digest since (or not in this repository): ask about the tag itself
            await asyncio.to_thread(self._set_tag_sync, repo, tag, digest, validated_at)
        self._count("tag", "shared")
        self.cache.note_access(manifest.digest)
        return manifest, validated_at

    async def _refresh_tag(self, repo: str, tag: str, cached: Manifest | None) -> Manifest:
        if cached is not None:
            response = await self.client.open(
                "HEAD", f"/v2/{repo}/manifests/{tag}", scope=self.client.scope_for(repo),
                headers={"Accept": ACCEPT_ALL_MANIFESTS},
            )
            response.release()
            if response.status in (404,):
                raise ManifestUnknown(detail={"reference": tag})
            upstream_digest = response.headers.get("Docker-Content-Digest")
            if response.status == 200 and upstream_digest == str(cached.digest):
                await asyncio.to_thread(self.repos.touch_tag, repo, tag)
                self._count("tag", "revalidated")
                return cached
        self._count("tag", "miss")
        manifest = await self._fetch_manifest(repo, tag, expected=None)
        await asyncio.to_thread(self.repos.set_tag, repo, tag, manifest.digest)
        return manifest

    async def _fetch_manifest(self, repo: str, reference: str, *, expected: Digest | None) -> Manifest:
        if expected is not None and self.shared is not None:
            found = await self.shared.manifest(repo, expected, self.manifest_limit)
            if found is not None:
                media_type, body = found
                try:
                    parsed = parse_manifest(body, media_type)
                except RegistryError:
                    parsed = None  # not what its link says: fetched from the upstream below
                if parsed is not None:
                    self.metrics.shared_cache_manifests.labels(self.name).inc()
                    self._start_prefetch(repo, parsed)
                    return await self._keep_manifest(repo, expected, parsed, body)
        if self.client.config.prefetch:
            # The manifest's layers will be prefetched: their connections' set-up (TCP and TLS, two round
            # trips to a distant upstream) overlaps the manifest's own round trips instead of following them.
            self.client.warm_blob_connections(self.client.config.prefetch_concurrency)
        response = await self.client.open(
            "GET", f"/v2/{repo}/manifests/{reference}", scope=self.client.scope_for(repo),
            headers={"Accept": ACCEPT_ALL_MANIFESTS},
        )
        try:
            if response.status in (401, 403):
                # Still 404 (clients move on to their next endpoint), but say why: "has no manifest" for a
                # private image pulled without (or with wrong) credentials sends people looking for a typo.
                raise ManifestUnknown(
                    f"upstream {self.name} denied access to {repo}:{reference} (HTTP {response.status}); "
                    f"the mirror's credentials for {self.name} are missing or may not pull it"
                )
            if response.status == 404:
                raise ManifestUnknown(f"upstream {self.name} has no manifest {repo}:{reference}")
            if response.status != 200:
                raise UpstreamUnavailable(f"upstream {self.name} answered manifest GET with {response.status}")
            if response.content_length is not None and response.content_length > self.manifest_limit:
                raise UpstreamInvalid(f"upstream manifest is larger than {self.manifest_limit} bytes")
            try:
                body = await response.content.read(self.manifest_limit + 1)
                while len(body) <= self.manifest_limit and not response.content.at_eof():
                    more = await response.content.read(self.manifest_limit + 1 - len(body))
                    if not more:
                        break
                    body += more
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(f"upstream {self.name} manifest body broke: {exc}") from exc
            if len(body) > self.manifest_limit:
                raise UpstreamInvalid(f"upstream manifest is larger than {self.manifest_limit} bytes")
            content_type = response.headers.get("Content-Type")
        finally:
            response.release()
        digest = Digest.of(body, expected.algorithm if expected else "sha256")
        if expected is not None and digest != expected:
            self.metrics.upstream_errors.labels(self.name, "digest_mismatch").inc()
            raise UpstreamInvalid(f"upstream {self.name} returned a manifest that does not match {expected}")
        header_digest = response.headers.get("Docker-Content-Digest")
        if expected is None and header_digest and header_digest.startswith("sha256:") and header_digest != str(digest):
            self.metrics.upstream_errors.labels(self.name, "digest_mismatch").inc()
            raise UpstreamInvalid(f"upstream {self.name} manifest does not match its Docker-Content-Digest")
        try:
            parsed = parse_manifest(body, content_type)
        except RegistryError as exc:
            raise UpstreamInvalid(f"upstream {self.name} returned an invalid manifest: {exc.message}") from exc
        # Before the manifest is stored (a file write, an fsync and index rows: 25-60 ms on the benchmark
        # machine): the blob GETs are on their way meanwhile, and a client's GET of the config, which
        # follows the manifest at once, finds its fill running. The prefetch reads the descriptors, not
        # the stored copy; a manifest that then fails to store costs nothing but those fills.
        self._start_prefetch(repo, parsed)
        manifest = await self._keep_manifest(repo, digest, parsed, body)
        if self.shared is not None:
            self.shared.publish_manifest(repo, digest, parsed.media_type, body, [d.digest for d in parsed.blobs],
                                         None if expected is not None else reference)
        return manifest

    async def _keep_manifest(self, repo: str, digest: Digest, parsed: ParsedManifest, body: bytes) -> Manifest:
        """Store and link a verified manifest this upstream serves for `repo` (fetched, or from the shared tier)."""
        # In use while stored: eviction must not remove an identical body put_bytes found, before it is held.
        with self.cache.in_use(digest):
            await self.blobs.put_bytes(body, digest)
            vouched = await asyncio.to_thread(self._link_manifest_sync, repo, digest, parsed, body)
            await self.cache.hold(digest, len(body), CACHED)
        self._record_sizes(repo, vouched)
        return Manifest(digest, parsed.media_type, body)

    def _link_manifest_sync(
        self, repo: str, digest: Digest, parsed: ParsedManifest, body: bytes, *, depth: int = 0
    ) -> list[Descriptor]:
        """Blocking: link a manifest this upstream served for `repo`, and first what it references;
        returns the blob descriptors it (or a child of it) vouches for.

        A registry accepts a manifest only when the repository has every blob (and, for an index, every
        child manifest) it names, so the upstream serving it through `repo` is its word that `repo` may
        read them: no HEAD is needed for them later, and they stay readable with the upstream gone
        (a layer Docker skipped because it had it from another image included). Blob links may come
        before the bytes: a linked blob that is not on disk is a miss like any other. A child manifest is
        linked when its body is here (fetched for another repository): one that is not has to come from
        the upstream anyway, and is linked then. The references are linked before the manifest link that
        says so, so a crash in between only costs doing it again."""
        vouched: list[Descriptor] = []
        try:
            vouched = self._link_references_sync(repo, parsed, depth)
            linked = True
        except OSError as exc:
            # Only a saving: without these links the blobs are confirmed with a HEAD as before.
            log.warning("could not link what %s/%s@%s references: %s", self.name, repo, digest, exc)
            linked = False
        self.repos.link_manifest(repo, ManifestLink(digest, parsed.media_type, len(body), references_linked=linked))
        return vouched

    def _link_references_sync(self, repo: str, parsed: ParsedManifest, depth: int) -> list[Descriptor]:
        # Non-distributable layers are the exception: a registry never checks those (they were never
        # pushed), so naming one is no evidence that `repo` may read bytes stored under that digest.
        # `parsed.blobs` leaves them out (they are `parsed.foreign`).
        vouched = list(parsed.blobs)
        for blob in vouched:
            self.repos.link_blob(repo, blob.digest)
        if depth >= _MAX_INDEX_DEPTH:
            return vouched
        for child in parsed.manifests:
            existing = self.repos.manifest_link(repo, child.digest)
            if (existing is not None and existing.references_linked) or child.size > self.manifest_limit:
                continue
            try:
                child_body = self.blobs.path_for(child.digest).read_bytes()
                child_parsed = parse_manifest(child_body, child.media_type)
            except (FileNotFoundError, NotADirectoryError):
                continue  # not here yet: linked when it is fetched through `repo`
            except RegistryError:
                continue  # not what the index says it is: fetched (and checked) through `repo` later
            vouched += self._link_manifest_sync(repo, child.digest, child_parsed, child_body, depth=depth + 1)
        return vouched

    def _record_sizes(self, repo: str, descriptors: list[Descriptor]) -> None:
        for descriptor in descriptors:
            self._sizes.record(repo, descriptor.digest, descriptor.size)

    # -- discovery ---------------------------------------------------------------------------------
    # Entries one listing gathers from the upstream at most; its pages are bounded too (LIST_MAX_PAGES and
    # LIST_MAX_BYTES in mirror.upstream.client). Past these the list is served as gathered so far.
    MAX_UPSTREAM_TAGS = 100_000
    MAX_UPSTREAM_REFERRERS = 10_000

    async def list_tags(self, repo: str) -> list[str]:
        failure: RegistryError | None = None
        try:
            tags = await self._get_json(repo, f"/v2/{repo}/tags/list?n=10000", "tags", self.MAX_UPSTREAM_TAGS)
            if tags is not None:
                # A set: pages of a list that changed while we read it may overlap. Nothing that is not a
                # tag reaches our clients (a "tag" of 8 MiB, or one with a "/", is the upstream's garbage).
                return sorted({t for t in tags if isinstance(t, str) and is_valid_tag(t)})
        except _UPSTREAM_DOWN as exc:
            failure = exc
        cached = await asyncio.to_thread(self.repos.tags, repo)
        if not cached:
            # With the upstream down, "no such repository" would be a lie a client acts on; the upstream's
            # own error (503, or 429 with Retry-After) tells it to come back later.
            if failure is not None:
                raise failure
            raise NameUnknown(detail={"name": repo})
        self._count("tags", "stale")
        return cached

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        try:
            listed = await self._get_json(
                repo, f"/v2/{repo}/referrers/{subject}", "manifests", self.MAX_UPSTREAM_REFERRERS
            )
        except (NameUnknown, *_UPSTREAM_DOWN):
            return await asyncio.to_thread(self.repos.referrers, repo, subject)
        found: dict[Digest, Descriptor] = {}
        for raw in listed or []:
            try:
                descriptor = Descriptor(raw["mediaType"], Digest.parse(raw["digest"]), int(raw["size"]),
                                        raw.get("artifactType"), raw.get("annotations"))
            except (KeyError, TypeError, ValueError, RegistryError):
                continue
            found.setdefault(descriptor.digest, descriptor)
        return list(found.values())

    async def _get_json(self, repo: str, path: str, key: str, max_items: int) -> list[Any] | None:
        """The `key` list of the upstream's JSON answer to `path`, gathered over its `Link` pages, at most
        `max_items` entries. None when the first page has no such list.

        401/403/404 on any page: NameUnknown. Another status, a body over the cap or not JSON, an
        unreachable upstream: the errors in _UPSTREAM_DOWN, after which callers serve what is cached."""
        gathered: list[Any] | None = None
        pages = self.client.get_json_pages(path, scope=self.client.scope_for(repo))
        async with contextlib.aclosing(pages):
            async for page in pages:
                if page.status in (401, 403, 404):
                    raise NameUnknown(detail={"name": repo})
                if page.status != 200:
                    raise UpstreamUnavailable(f"upstream {self.name} answered GET {path} with {page.status}")
                items = page.data.get(key) if isinstance(page.data, dict) else None
                if not isinstance(items, list):
                    break  # a last page with `"tags": null`, or not a listing at all
                gathered = gathered if gathered is not None else []
                gathered.extend(items)
                if len(gathered) >= max_items:
                    if len(gathered) > max_items or page.next_url is not None:
                        log.warning("upstream %s: %s stopped after %d entries", self.name, path, max_items)
                    del gathered[max_items:]
                    break
        return gathered

    async def list_repositories(self) -> list[str]:
        return await asyncio.to_thread(self.repos.repositories)

    async def close(self) -> None:
        for task in list(self._prefetches):
            task.cancel()
        await asyncio.gather(*self._prefetches, return_exceptions=True)
        await self._manifest_flights.close()
        await self._tag_flights.close()
