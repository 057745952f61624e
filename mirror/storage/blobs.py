"""Content-addressed blob store: `blobs/<algorithm>/<2 hex>/<hex>`, shared by every repository.

A blob file exists only once its bytes were verified against its digest: writers fill a temp file under
`tmp/`, check size and digest, fsync and rename it into place. A crash at any moment leaves either no
blob or a whole one. Which repositories may read a blob is decided by repository links, not here.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

from mirror.errors import DigestInvalid, SizeInvalid, StorageFull
from mirror.oci.digest import Digest
from mirror.storage.files import fsync_dir

# Writes are gathered into buffers of this size before a thread hop: fewer hops, same memory bound.
WRITE_BUFFER_BYTES = 2 << 20
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


class BlobWriter:
    """Streams bytes to a file while hashing them; every write runs in a thread in large pieces.

    Used for uploads (appending to the session's data file) and for upstream fills. One piece is written
    and hashed in a thread while the next one is being received: the network and the disk+hash work
    overlap instead of taking turns. `size` counts bytes that are on disk; `on_written` hears of each
    step (a fill uses it to let readers move on).
    """

    def __init__(self, path: Path, handle: BinaryIO, hasher: "hashlib._Hash", size: int) -> None:
        self.path = path
        self.hasher = hasher
        self.size = size
        self.on_written: Callable[[int], None] | None = None
        # Pending chunks, written and hashed together in one thread hop (no joining copy).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._in_flight: asyncio.Future[None] | None = None
        self._handle = handle

    @classmethod
    async def open(
        cls, path: Path, algorithm: str, *, append_to: int = 0, hasher: "hashlib._Hash | None" = None
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

    async def write(self, chunk: bytes) -> None:
        """Queue `chunk`. Pieces of WRITE_BUFFER_BYTES go to the threads as they fill up; at most one is
        being written while the next gathers, so memory stays bounded and few thread hops are paid."""
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes < WRITE_BUFFER_BYTES:
            return
        if self._in_flight is not None:
            await self._drain()
        if self._pending:
            self._start_piece()

    def kick(self) -> None:
        """Start writing what has gathered now, if the threads are idle: for a producer about to wait (a
        slow stream), so readers see its bytes without waiting for a full piece."""
        if self._in_flight is None and self._pending:
            self._start_piece()

    def _start_piece(self) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        self._in_flight = asyncio.ensure_future(self._write_and_hash(chunks))
        self._in_flight.add_done_callback(self._piece_done)

    def _piece_done(self, piece: asyncio.Future[None]) -> None:
        if piece is not self._in_flight or piece.cancelled() or piece.exception() is not None:
            return  # a failed piece stays in flight: the next write, flush or close raises its error
        self._in_flight = None
        if self.on_written is not None:
            self.on_written(self.size)

    async def _drain(self) -> None:
        while self._in_flight is not None:
            piece = self._in_flight
            await piece
            if self._in_flight is piece:  # its done-callback has not run yet
                self._piece_done(piece)

    async def flush(self) -> None:
        """Wait until every byte given to `write` is on disk and hashed."""
        await self._drain()
        if self._pending:
            self._start_piece()
            await self._drain()

    async def _write_and_hash(self, chunks: list[bytes]) -> None:
        # Writing into the page cache and hashing each take about a core at these speeds; both release
        # the GIL, so they run side by side in two threads.
        await asyncio.gather(asyncio.to_thread(self._write_sync, chunks), asyncio.to_thread(self._hash_sync, chunks))
        self.size += sum(len(chunk) for chunk in chunks)

    def _write_sync(self, chunks: list[bytes]) -> None:
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
            if self._in_flight is not None:  # a failed flush: never close under a running write
                await asyncio.gather(self._in_flight, return_exceptions=True)
                self._in_flight = None
                self._pending, self._pending_bytes = [], 0
            await asyncio.to_thread(self._handle.close)
