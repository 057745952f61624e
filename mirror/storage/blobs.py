"""Content-addressed blob store: `blobs/<algorithm>/<2 hex>/<hex>`, shared by every repository.

A blob file exists only once its bytes were verified against its digest: writers fill a temp file under
`tmp/`, check size and digest, fsync and rename it into place. A crash at any moment leaves either no
blob or a whole one. Which repositories may read a blob is decided by repository links, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mirror.errors import DigestInvalid, SizeInvalid, StorageFull
from mirror.oci.digest import Digest
from mirror.storage.files import fsync_dir

# A stage hands this much to a thread at once unless the producer is waiting (fewer hops on fast streams).
WRITE_BUFFER_BYTES = 2 << 20
# Bytes held in memory that are not yet both written and hashed; past it the producer waits for the disk.
MAX_BUFFERED_BYTES = 16 << 20
HASH_READ_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: Digest
    size: int
    path: Path


def hash_file(path: Path, algorithm: str) -> tuple[str, int]:
    """Blocking: the hex digest and size of a file, read in large pieces."""
    hasher = hashlib.new(algorithm)
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_READ_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_root = root / "blobs"
        self.temp_root = root / "tmp"
        self.blob_root.mkdir(parents=True, exist_ok=True)
        self.temp_root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: Digest) -> Path:
        return self.blob_root / digest.algorithm / digest.hex[:2] / digest.hex

    def new_temp_path(self) -> Path:
        return self.temp_root / f"{uuid.uuid4().hex}.part"

    def stat_sync(self, digest: Digest) -> StoredBlob | None:
        path = self.path_for(digest)
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredBlob(digest, size, path)

    async def stat(self, digest: Digest) -> StoredBlob | None:
        return await asyncio.to_thread(self.stat_sync, digest)

    def reuse_sync(self, digest: Digest) -> StoredBlob | None:
        """Blocking: stat_sync for a writer about to link an existing blob instead of storing it again.
        The file's mtime is refreshed, so a concurrent `mirror gc` (which spares anything younger than its
        grace period, and checks the age right before removing) leaves the blob alone."""
        path = self.path_for(digest)
        try:
            os.utime(path)
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredBlob(digest, size, path)

    async def reuse(self, digest: Digest) -> StoredBlob | None:
        return await asyncio.to_thread(self.reuse_sync, digest)

    def commit_sync(self, temp: Path, digest: Digest, actual_hex: str, size: int) -> StoredBlob:
        """Blocking: rename a verified temp file into place (its bytes hash to `actual_hex`)."""
        if actual_hex != digest.hex:
            temp.unlink(missing_ok=True)
            raise DigestInvalid(
                f"content digest {digest.algorithm}:{actual_hex} does not match {digest}",
                detail={"expected": str(digest), "actual": f"{digest.algorithm}:{actual_hex}"},
            )
        target = self.path_for(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        # Two writers of the same content may race; the bytes are identical, so the last rename wins harmlessly.
        os.replace(temp, target)
        fsync_dir(target.parent)
        return StoredBlob(digest, size, target)

    def commit_unhashed_sync(self, temp: Path, digest: Digest, expected_size: int | None = None) -> StoredBlob:
        """Blocking: hash a temp file, check it, and rename it into place."""
        actual_hex, size = hash_file(temp, digest.algorithm)
        if expected_size is not None and size != expected_size:
            temp.unlink(missing_ok=True)
            raise SizeInvalid(f"blob is {size} bytes, expected {expected_size}")
        return self.commit_sync(temp, digest, actual_hex, size)

    async def put_stream(self, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None) -> StoredBlob:
        """The stored blob `digest`: the file already here (its age refreshed, `chunks` left unread), or
        `chunks` written through a BlobWriter, checked against `size` and the digest, then committed.
        Nothing is left behind when it fails. The caller holds the digest in use until it is held."""
        stored = await self.reuse(digest)
        if stored is not None:
            return stored
        temp = self.new_temp_path()
        writer = await BlobWriter.open(temp, digest.algorithm)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
            await writer.close()
            if size is not None and writer.size != size:
                raise SizeInvalid(f"blob is {writer.size} bytes, expected {size}")
            return await asyncio.to_thread(self.commit_sync, temp, digest, writer.hasher.hexdigest(), writer.size)
        except BaseException:
            # close() raises a failed write again (ENOSPC): that must not skip removing the temp file.
            with contextlib.suppress(Exception):
                await writer.close()
            await asyncio.to_thread(temp.unlink, True)
            raise

    async def put_bytes(self, data: bytes, digest: Digest) -> StoredBlob:
        """Store a small, already-in-memory body (manifests) after checking its digest."""

        def write() -> StoredBlob:
            existing = self.reuse_sync(digest)
            if existing is not None:
                return existing
            temp = self.new_temp_path()
            try:
                temp.write_bytes(data)
                return self.commit_sync(temp, digest, hashlib.new(digest.algorithm, data).hexdigest(), len(data))
            except OSError as exc:
                # A failed write must not leave its temp file behind, and a full disk is the clean 503 a
                # client knows to retry elsewhere (Docker, containerd), not a 500.
                temp.unlink(missing_ok=True)
                if exc.errno == errno.ENOSPC:
                    raise StorageFull(f"no space left to store {len(data)} bytes") from exc
                raise

        return await asyncio.to_thread(write)

    async def read_bytes(self, digest: Digest) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self.path_for(digest).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None

        return await asyncio.to_thread(read)

    def delete_sync(self, digest: Digest) -> bool:
        try:
            self.path_for(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    async def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still put on the filesystem holding the store."""

        def free() -> int:
            stats = os.statvfs(self.temp_root)
            return stats.f_bavail * stats.f_frsize

        return await asyncio.to_thread(free)

    def iter_digests_sync(self) -> list[Digest]:
        """Blocking: every committed blob's digest (for gc, verify and index reconciliation)."""
        found: list[Digest] = []
        for algorithm_dir in self.blob_root.iterdir() if self.blob_root.exists() else []:
            for prefix_dir in algorithm_dir.iterdir():
                for entry in prefix_dir.iterdir():
                    try:
                        found.append(Digest.parse(f"{algorithm_dir.name}:{entry.name}"))
                    except DigestInvalid:
                        continue  # a stray file is not a blob; verify and recovery deal with it
        return found

    def remove_stale_temps_sync(self, grace_seconds: float) -> int:
        """Blocking: delete temp files of interrupted writes older than the grace period."""
        removed = 0
        cutoff = time.time() - grace_seconds
        for entry in self.temp_root.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class _Stage:
    """One step over a byte stream (writing or hashing), run in a thread one piece at a time, in order.

    Chunks queue here; a piece is every chunk queued when the previous piece finished. Two stages over
    the same chunks run side by side and neither waits for the other."""

    def __init__(self, work: Callable[[list[bytes]], None], on_finished: Callable[[], None]) -> None:
        self._work = work
        self._on_finished = on_finished
        self._pending: list[bytes] = []
        self.pending_bytes = 0
        self.busy_bytes = 0  # the piece in a thread now
        self.done_bytes = 0
        self.error: BaseException | None = None
        self._busy: asyncio.Future[None] | None = None

    def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self.pending_bytes += len(chunk)

    @property
    def busy(self) -> bool:
        return self._busy is not None

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: every byte given to it is done (or it failed)."""
        return self._busy is None and (not self._pending or self.error is not None)

    def start(self, at_least: int) -> None:
        """Hand the queued chunks to a thread, if it is free and at least `at_least` bytes wait."""
        if self._busy is not None or self.error is not None or not self._pending or self.pending_bytes < at_least:
            return
        chunks, self._pending = self._pending, []
        self.busy_bytes, self.pending_bytes = self.pending_bytes, 0
        # run_in_executor, not a task: nobody awaits this future directly, so cancelling a waiter can
        # never mark a piece done while its thread still runs.
        self._busy = asyncio.get_running_loop().run_in_executor(None, self._work, chunks)
        self._busy.add_done_callback(self._finished)

    def _finished(self, piece: asyncio.Future[None]) -> None:
        self._busy = None
        if piece.cancelled():
            self.error = asyncio.CancelledError()
        elif piece.exception() is not None:
            self.error = piece.exception()
        else:
            self.done_bytes += self.busy_bytes
        self.busy_bytes = 0
        self._on_finished()


class BlobWriter:
    """Streams bytes to a file while hashing them; writing and hashing each run in a thread of their own.

    Used for pushes (uploads appending to the session's data file, and monolithic blob PUTs): the request
    body arrives on the event loop, and the disk write and the hash form a pipeline behind it. Each stage
    takes whatever gathered while it was busy, so none of them waits for another unless
    MAX_BUFFERED_BYTES are held in memory (then the producer waits). `size` counts bytes on disk.
    (Upstream fills do not come through here: their bodies are read in threads, see proxy/download.py.)
    """

    def __init__(self, path: Path, handle: BinaryIO, hasher: hashlib._Hash, size: int) -> None:
        self.path = path
        self.hasher = hasher
        self._base = size
        self._handle = handle
        self._accepted = 0  # bytes given to write()
        self._eager = False  # start pieces of any size: the producer is about to wait, or is finishing
        self._changed = asyncio.Event()
        self._writing = _Stage(self._write_sync, self._piece_finished)
        self._hashing = _Stage(self._hash_sync, self._piece_finished)

    @classmethod
    async def open(
        cls, path: Path, algorithm: str, *, append_to: int = 0, hasher: hashlib._Hash | None = None
    ) -> BlobWriter:
        """Open `path` for writing; with `append_to`, keep its first bytes (an upload being resumed)."""

        def open_sync() -> BinaryIO:
            handle = open(path, "r+b" if append_to else "wb")  # noqa: SIM115 - closed in close()
            if append_to:
                handle.truncate(append_to)
                handle.seek(append_to)
            return handle

        handle = await asyncio.to_thread(open_sync)
        return cls(path, handle, hasher or hashlib.new(algorithm), append_to)

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return self._base + self._writing.done_bytes

    @property
    def _held_bytes(self) -> int:
        # Chunks are shared by both stages: memory is what the slower one has not finished.
        return self._accepted - min(self._writing.done_bytes, self._hashing.done_bytes)

    async def write(self, chunk: bytes) -> None:
        """Queue `chunk`; wait only while MAX_BUFFERED_BYTES are held in memory."""
        self._raise_if_failed()
        self._eager = False
        self._accepted += len(chunk)
        for stage in (self._writing, self._hashing):
            stage.add(chunk)
            stage.start(WRITE_BUFFER_BYTES)
        while self._held_bytes > MAX_BUFFERED_BYTES:
            await self._wait_for_a_piece()
            self._raise_if_failed()

    def kick(self) -> None:
        """Start on what has gathered now, whatever its size (a producer that is finishing)."""
        self._eager = True
        for stage in (self._writing, self._hashing):
            stage.start(1)

    def _piece_finished(self) -> None:
        for stage in (self._writing, self._hashing):
            stage.start(1 if self._eager else WRITE_BUFFER_BYTES)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for_a_piece(self) -> None:
        await self._changed.wait()

    def _raise_if_failed(self) -> None:
        for stage in (self._writing, self._hashing):
            if stage.error is not None:
                raise stage.error

    async def flush(self) -> None:
        """Wait until every byte given to `write` is on disk and hashed."""
        self.kick()
        while not (self._writing.idle and self._hashing.idle):
            await self._wait_for_a_piece()
        self._raise_if_failed()

    def _write_sync(self, chunks: list[bytes]) -> None:
        # Writing into the page cache and hashing each take about a core at these speeds; both release
        # the GIL, so the two stages really run side by side.
        self._handle.writelines(chunks)
        self._handle.flush()

    def _hash_sync(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.hasher.update(chunk)

    async def close(self) -> None:
        if self._handle.closed:
            return
        try:
            await self.flush()
        finally:
            # A failed or cancelled flush: never close the file under a piece still being written.
            while self._writing.busy or self._hashing.busy:
                try:
                    await self._wait_for_a_piece()
                except asyncio.CancelledError:
                    continue
            await asyncio.to_thread(self._handle.close)
