"""Fills: one upstream download per blob digest and upstream, streamed to every client while it runs.

A fill belongs to one upstream, and so does its "who may read this" set: repositories of that upstream's
cache. A client of another upstream never joins it (its own upstream has to vouch for the blob, and the
link it earns goes into its own upstream's cache), so two upstreams asked for one digest at the same time
each download it once.

A fill writes a temp file while hashing, publishes how many bytes are on disk, verifies size and digest,
then renames the file into the blob store. Each reader gets its own duplicate of one read-only descriptor
of the temp file and sends from it with sendfile as bytes become readable: no name is needed (it changes
at commit), no byte passes through Python, and the download never waits for its readers.

The last byte is released only after the digest is verified: a client can never receive a complete body
of wrong bytes, it sees a cut connection and retries with Range. It is released as soon as the digest
is verified, not after the commit: fsyncing 200 MB took 0.13 s here, durability the cache needs and the
client does not. A body of 0 bytes has no last byte to hold back, so it is published only once verified:
its readers get nothing, headers included, before the digest is known to be the empty blob's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from mirror.errors import RegistryError, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.oci.digest import Digest

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
# At shutdown, how long a fill whose bytes are verified may take to commit them before it is cancelled.
COMMIT_GRACE_SECONDS = 10.0


class Fill:
    """One blob download in progress, as readers see it (a BlobStream)."""

    def __init__(self, digest: Digest, upstream: str, repo: str) -> None:
        self.digest = digest
        self.upstream = upstream  # whose cache the repositories below belong to
        self.repo = repo  # the repository the download was authorised for
        # Repositories of `upstream` allowed to read these bytes: the downloader's, plus any the upstream
        # vouched for on behalf of a client that joined. All of them are linked when the blob is committed.
        self.repos: set[str] = {repo}
        self.size = 0
        self.written = 0
        # The digest matched: every byte may go to readers, before the blob is fsynced and committed.
        self.verified = False
        self.committed = False
        self.path: Path | None = None  # the committed blob file
        self.error: RegistryError | None = None
        # Started by layer prefetch (a manifest named it), not by a client; `claimed` once a client asks
        # for it. An unclaimed prefetch is the first thing given up when a client's fill needs the room.
        self.prefetch = False
        self.claimed = True
        self._fd: int | None = None
        self._detached = False  # no longer joinable: the descriptor may close
        self._ready = asyncio.Event()
        # Replaced on every change: waiters hold the one that was current when they looked.
        self._changed = asyncio.Event()

    # -- the downloader's side ---------------------------------------------------------------------
    def begin(self, size: int, read_fd: int) -> None:
        """Headers are in: the size is known and bytes will land in the file behind `read_fd`.
        An empty body may begin only once verified: readers would answer it complete at once."""
        if size == 0 and not self.verified:
            raise ValueError("an empty body is published only after its digest is verified")
        self.size = size
        self._fd = read_fd
        self._ready.set()

    def advance(self, written: int) -> None:
        """`written` bytes are on disk now: wake the readers."""
        self.written = written
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def verify(self) -> None:
        """The bytes on disk match the digest: release the last byte now. Committing (fsync, rename,
        index) follows, but a client does not need to wait for the cache's durability."""
        self.verified = True
        self._notify()

    async def commit(self, path: Path | None) -> None:
        """Verified: readers may send every byte. `path` is the committed file (None: not kept)."""
        self.path = path
        self.verified = True
        self.committed = True
        await self._finish()

    async def fail(self, error: RegistryError) -> None:
        self.error = error
        self._ready.set()
        await self._finish()

    async def _finish(self) -> None:
        self._notify()

    def detach(self) -> None:
        """Called by the manager once new clients can no longer join (they find the committed blob)."""
        self._detached = True
        self._close_if_detached()

    @property
    def has_descriptor(self) -> bool:
        return self._fd is not None

    @property
    def finished(self) -> bool:
        return self.committed or self.error is not None

    def readable_by(self, repo: str) -> bool:
        return repo in self.repos

    def allow(self, repo: str) -> None:
        """Let `repo` (of this fill's upstream) read the bytes too: that upstream vouched for it, with a
        HEAD or a manifest it served. Linked at commit."""
        self.repos.add(repo)

    def _close_if_detached(self) -> None:
        if self._detached and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the readers' side -------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Wait for the upstream's headers; raise the fill's error if it failed before them."""
        await self._ready.wait()
        if self.error is not None:
            raise self.error

    def _readable_until(self) -> int:
        # Hold the last byte back until the digest is verified (see the module docstring).
        return self.size if self.verified else min(self.written, max(self.size - 1, 0))

    async def readable(self, offset: int, end: int) -> int:
        """Wait until bytes past `offset` may be sent; return how far they go (at most `end`).
        Raises the fill's error when it fails, so a reader never sends bytes of a failed download. Once
        the bytes are verified, a later failure (the commit) no longer concerns readers: their
        descriptors still hold every verified byte."""
        while True:
            if self.error is not None and not self.verified:
                raise self.error
            available = min(self._readable_until(), end)
            if available > offset:
                return available
            await self._changed.wait()

    async def open_reader(self) -> BinaryIO:
        """A file object of the reader's own over the bytes (for sendfile), valid after the fill ends."""
        await self.wait_ready()
        if self._fd is not None:
            # A duplicate shares the inode, not a name: it stays valid across the rename at commit.
            return os.fdopen(os.dup(self._fd), "rb", buffering=0)
        if self.committed and self.path is not None:
            # The fill finished and closed its descriptor between the client joining and this call.
            return await asyncio.to_thread(open, self.path, "rb", buffering=0)
        raise self.error or UpstreamUnavailable("download ended unexpectedly")

    async def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes as they become readable, for consumers that cannot use sendfile."""
        reader = await self.open_reader()
        try:
            offset = start
            while offset < end:
                available = await self.readable(offset, end)
                data = await asyncio.to_thread(
                    os.pread, reader.fileno(), min(available - offset, READ_CHUNK_BYTES), offset
                )
                if not data:
                    raise UpstreamUnavailable("download file shorter than reported")
                offset += len(data)
                yield data
        finally:
            reader.close()


Download = Callable[[Fill], Awaitable[None]]


class FillManager:
    """Owns every running fill (the application owns this): at most one per (upstream, digest)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._fills: dict[tuple[str, Digest], Fill] = {}
        self._tasks: dict[asyncio.Task[None], Fill] = {}
        self._closed = False  # no prefetch starts once shutdown began

    def running(self, upstream: str, digest: Digest) -> Fill | None:
        return self._fills.get((upstream, digest))

    def join(self, upstream: str, digest: Digest, repo: str, download: Download) -> Fill:
        """The running fill of `upstream` for `digest`, or a new one that `download` performs for `repo`."""
        key = (upstream, digest)
        fill = self._fills.get(key)
        if fill is not None:
            self.metrics.fill_waiters.inc()
            if fill.prefetch and not fill.claimed:
                self.metrics.prefetch_claims.labels(upstream).inc()
            fill.claimed = True
            return fill
        fill = Fill(digest, upstream, repo)
        self._start(fill, download)
        return fill

    def prefetch(
        self, upstream: str, digest: Digest, repo: str, download: Download
    ) -> tuple[Fill, asyncio.Task[None]] | None:
        """Start a fill no client asked for yet (its manifest was just served); None when one is running
        (or the server is stopping). The task ends when the fill does."""
        if self._closed or (upstream, digest) in self._fills:
            return None
        fill = Fill(digest, upstream, repo)
        fill.prefetch, fill.claimed = True, False
        return fill, self._start(fill, download)

    def _start(self, fill: Fill, download: Download) -> asyncio.Task[None]:
        self._fills[(fill.upstream, fill.digest)] = fill
        task = asyncio.create_task(self._run(fill, download), name=f"fill {fill.upstream} {fill.digest}")
        self._tasks[task] = fill
        task.add_done_callback(lambda done: self._tasks.pop(done, None))
        return task

    async def give_up_unclaimed_prefetches(self) -> int:
        """Cancel every prefetch no client has asked for yet and whose bytes are not verified, and wait for
        them to end (their room is released then): a client's fill that finds no room comes first.
        Returns how many were cancelled. They leave the table at once, so nobody joins them meanwhile."""
        doomed = [(task, fill) for task, fill in self._tasks.items()
                  if fill.prefetch and not fill.claimed and not fill.verified]
        for task, fill in doomed:
            if self._fills.get((fill.upstream, fill.digest)) is fill:
                del self._fills[(fill.upstream, fill.digest)]
            task.cancel()
        if doomed:
            await asyncio.wait([task for task, _ in doomed])
        return len(doomed)

    async def _run(self, fill: Fill, download: Download) -> None:
        self.metrics.fills_in_progress.inc()
        try:
            await download(fill)
            if not fill.committed:
                await fill.fail(UpstreamUnavailable("download ended without a result"))
        except RegistryError as error:
            await fill.fail(error)
        except asyncio.CancelledError:
            await fill.fail(UpstreamUnavailable("download cancelled (server shutting down)"))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure must reach every reader as a registry error
            log.exception("fill of %s from %s failed", fill.digest, fill.upstream)
            await fill.fail(UpstreamUnavailable(f"download failed: {type(exc).__name__}"))
        finally:
            self.metrics.fills_in_progress.dec()
            key = (fill.upstream, fill.digest)
            if self._fills.get(key) is fill:
                del self._fills[key]
            fill.detach()

    async def close(self) -> None:
        """Stop every download; one whose bytes are already verified is given COMMIT_GRACE_SECONDS to
        finish its commit (an fsync and a rename), so a pull that completed just before a shutdown is
        still cached after it."""
        self._closed = True
        for task, fill in list(self._tasks.items()):
            if not fill.verified:
                task.cancel()
        committing = list(self._tasks)
        if committing:
            _done, late = await asyncio.wait(committing, timeout=COMMIT_GRACE_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*committing, return_exceptions=True)
