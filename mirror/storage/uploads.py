"""Blob upload sessions, persisted on disk so an interrupted push resumes after a restart.

`uploads/<id>/data` holds the bytes received so far, `uploads/<id>/info.json` the repository it belongs to.
The id is 32 lowercase hex characters and is checked before it is used in a path. A running sha256 of
each session is kept in memory so finishing a 1 GiB upload does not read it again; after a restart the
state is rebuilt from the file once.

Sessions are not kept forever: those idle for `uploads.expire` are removed while the server runs
(`expiring`), and the bytes all open sessions hold together are bounded by `uploads.max_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import (
    BlobUploadTooLarge,
    BlobUploadUnknown,
    DigestInvalid,
    SizeInvalid,
    StorageFull,
    UploadsFull,
    is_disk_full,
)
from mirror.oci.digest import Digest
from mirror.storage.backend import BlobBackend, file_chunks, put_stream
from mirror.storage.blobs import BlobStore, BlobWriter, StoredBlob, hash_file
from mirror.storage.files import atomic_write
from mirror.storage.upload_bytes import UploadBytes, expiring_sessions

log = logging.getLogger(__name__)

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    repository: str
    size: int  # bytes received so far


@dataclass(slots=True)
class _HashState:
    size: int
    hasher: hashlib._Hash


class UploadStore:
    def __init__(self, root: Path, blobs: BlobStore, *, max_bytes: int | None = None) -> None:
        """Blocking (reads the sessions on disk): construct it in a thread."""
        self.root = root / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.bytes = UploadBytes(max_bytes)
        self._hash_states: dict[str, _HashState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        for entry in self.root.iterdir():
            with contextlib.suppress(OSError):
                self.bytes.record(entry.name, (entry / "data").stat().st_size)

    @property
    def open_bytes(self) -> int:
        """Bytes the open sessions hold together (the `mirror_uploads_open_bytes` gauge)."""
        return self.bytes.total

    def _dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise BlobUploadUnknown("unknown upload id", detail={"id": upload_id[:100]})
        return self.root / upload_id

    def _lock(self, upload_id: str) -> asyncio.Lock:
        """Serialise requests on one session (two PATCHes at once must not interleave bytes).

        Only ids that exist get a lock (callers `get` first), so garbage ids cannot grow this dict."""
        return self._locks.setdefault(upload_id, asyncio.Lock())

    async def create(self, repository: str) -> Upload:
        upload_id = uuid.uuid4().hex
        directory = self.root / upload_id

        def create_sync() -> None:
            directory.mkdir(parents=True)
            try:
                (directory / "data").touch()
                info = {"repository": repository, "started": time.time()}
                atomic_write(directory / "info.json", json.dumps(info).encode())
            except BaseException:
                # A session without its info file (a full disk) could never be used or finished: not kept.
                shutil.rmtree(directory, ignore_errors=True)
                raise

        await asyncio.to_thread(create_sync)
        self._hash_states[upload_id] = _HashState(0, hashlib.sha256())
        self.bytes.record(upload_id, 0)
        return Upload(upload_id, repository, 0)

    async def get(self, repository: str, upload_id: str) -> Upload:
        directory = self._dir(upload_id)

        def stat_sync() -> Upload:
            try:
                info = json.loads((directory / "info.json").read_text())
                size = (directory / "data").stat().st_size
            except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
                raise BlobUploadUnknown("unknown upload id", detail={"id": upload_id}) from exc
            if info.get("repository") != repository:
                raise BlobUploadUnknown("upload belongs to another repository", detail={"id": upload_id})
            return Upload(upload_id, repository, size)

        return await asyncio.to_thread(stat_sync)

    async def _hash_state(self, upload: Upload) -> _HashState:
        state = self._hash_states.get(upload.id)
        if state is None or state.size != upload.size:
            # After a restart (or a write that failed halfway) the running hash is rebuilt from the file.
            def rebuild() -> _HashState:
                hasher = hashlib.sha256()
                with open(self.root / upload.id / "data", "rb") as handle:
                    remaining = upload.size
                    while remaining and (chunk := handle.read(min(remaining, 4 << 20))):
                        hasher.update(chunk)
                        remaining -= len(chunk)
                return _HashState(upload.size, hasher)

            state = await asyncio.to_thread(rebuild)
            self._hash_states[upload.id] = state
        return state

    async def append(
        self,
        repository: str,
        upload_id: str,
        chunks: AsyncIterable[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> Upload:
        """Append a request body. `start` (from Content-Range) must equal the bytes received so far."""
        upload = await self.get(repository, upload_id)
        async with self._lock(upload_id):
            upload = await self.get(repository, upload_id)  # the size may have moved while we waited
            return await self._append_locked(upload, chunks, start=start, length=length)

    async def _append_locked(
        self, upload: Upload, chunks: AsyncIterable[bytes], *, start: int | None, length: int | None
    ) -> Upload:
        # What the disk holds now, whatever was counted before; a chunk that cannot fit is refused up front.
        self.bytes.admit(upload.id, upload.size, start=start, length=length)
        state = await self._hash_state(upload)
        writer = await BlobWriter.open(
            self.root / upload.id / "data", "sha256", append_to=upload.size, hasher=state.hasher
        )
        try:
            try:
                async for chunk in self.bytes.within(upload.id, chunks):
                    await writer.write(chunk)
            finally:
                await writer.close()
                state.size = writer.size
                self.bytes.record(upload.id, writer.size)
        except (BlobUploadTooLarge, UploadsFull):
            # Refused whole, as a chunk of the wrong length is: the session is what it was before this
            # request, and the client can send the same chunk again once there is room.
            await asyncio.to_thread(_truncate, self.root / upload.id / "data", upload.size)
            self._hash_states.pop(upload.id, None)
            self.bytes.record(upload.id, upload.size)
            raise
        except OSError as exc:
            # A full disk is a clean 503 (the client can ask the status and resume once there is room), not
            # a 500. The session keeps what reached the disk; its running hash is rebuilt from the file.
            self._hash_states.pop(upload.id, None)
            if is_disk_full(exc):
                raise StorageFull("no space left on the registry's disk for this upload") from exc
            raise
        received = writer.size - upload.size
        if length is not None and received != length:
            # Refuse the whole chunk, not just the request: cut the file back so the session is exactly
            # what it was and the client can resend (the running hash is rebuilt from the file next time).
            await asyncio.to_thread(_truncate, self.root / upload.id / "data", upload.size)
            self._hash_states.pop(upload.id, None)
            self.bytes.record(upload.id, upload.size)
            raise SizeInvalid(f"chunk declared {length} bytes but {received} arrived")
        return Upload(upload.id, upload.repository, writer.size)

    async def finish(
        self,
        repository: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterable[bytes] | None = None,
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> StoredBlob:
        """Append the final body (if any), verify everything against `digest`, move it into the blob store."""
        upload = await self.get(repository, upload_id)
        async with self._lock(upload_id):
            upload, data_path, actual_hex = await self._last_chunk_and_digest_locked(
                repository, upload_id, digest, chunks, start=start, length=length
            )
            try:
                # reuse, not stat: refreshes the blob's age so a concurrent `mirror gc` spares it
                existing = await self.blobs.reuse(digest)
                if existing is not None and actual_hex == digest.hex:
                    return existing
                return await asyncio.to_thread(self.blobs.commit_sync, data_path, digest, actual_hex, upload.size)
            finally:
                # Committed or refused, the session is over: a refused upload must not linger half-verified.
                await self._remove(upload.id)

    async def _last_chunk_and_digest_locked(
        self,
        repository: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterable[bytes] | None,
        *,
        start: int | None,
        length: int | None,
    ) -> tuple[Upload, Path, str]:
        """Under the session's lock: append the final body, then the hex digest of all its bytes (from the
        running hash when it covers them, else read back from the file)."""
        upload = await self.get(repository, upload_id)
        if chunks is not None:
            upload = await self._append_locked(upload, chunks, start=start, length=length)
        data_path = self.root / upload.id / "data"
        state = self._hash_states.get(upload.id)
        if digest.algorithm == "sha256" and state is not None and state.size == upload.size:
            return upload, data_path, state.hasher.copy().hexdigest()
        actual_hex, _ = await asyncio.to_thread(hash_file, data_path, digest.algorithm)
        return upload, data_path, actual_hex

    async def finish_into(
        self,
        backend: BlobBackend,
        repository: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterable[bytes] | None = None,
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> int:
        """finish() for blob bytes that live in a BlobBackend (S3) rather than the blob store: the session's
        bytes are verified, then streamed into the backend, published there only once whole. Returns the size.

        A wrong digest ends the session, as in finish(). A backend that fails (S3 unreachable) keeps it: the
        client's retry of the PUT then finds every byte it sent still here."""
        upload = await self.get(repository, upload_id)
        async with self._lock(upload_id):
            upload, data_path, actual_hex = await self._last_chunk_and_digest_locked(
                repository, upload_id, digest, chunks, start=start, length=length
            )
            if actual_hex != digest.hex:
                await self._remove(upload.id)
                raise DigestInvalid(
                    f"content digest {digest.algorithm}:{actual_hex} does not match {digest}",
                    detail={"expected": str(digest), "actual": f"{digest.algorithm}:{actual_hex}"},
                )
            size = await backend.stat(digest)
            if size is None:
                size = await put_stream(backend, digest, file_chunks(data_path), size=upload.size)
            await self._remove(upload.id)
            return size

    async def cancel(self, repository: str, upload_id: str) -> None:
        upload = await self.get(repository, upload_id)
        async with self._lock(upload_id):
            await self._remove(upload.id)

    async def _remove(self, upload_id: str) -> None:
        self._hash_states.pop(upload_id, None)
        self._locks.pop(upload_id, None)
        self.bytes.record(upload_id, None)
        await asyncio.to_thread(shutil.rmtree, self.root / upload_id, True)

    async def expire(self, idle_seconds: float) -> tuple[int, int]:
        """Remove sessions that received nothing for `idle_seconds`; return (sessions, bytes) freed.

        A session a request is writing to right now is left alone (its lock is held); the others are
        removed under their lock, so a request arriving meanwhile finds the session gone (404) rather
        than half of it."""
        cutoff = time.time() - idle_seconds
        removed = freed = 0
        for upload_id in await asyncio.to_thread(self._idle_sync, cutoff):
            lock = self._locks.get(upload_id)
            if lock is not None and lock.locked():
                continue
            async with self._lock(upload_id):
                if upload_id not in await asyncio.to_thread(self._idle_sync, cutoff, upload_id):
                    continue  # a request wrote to it while we waited
                freed += self.bytes.of(upload_id)
                removed += 1
                await self._remove(upload_id)
        return removed, freed

    def _idle_sync(self, cutoff: float, only: str | None = None) -> list[str]:
        """Blocking: ids of sessions whose files were last written before `cutoff`."""
        entries = [self.root / only] if only is not None else list(self.root.iterdir())
        idle: list[str] = []
        for entry in entries:
            if not _UPLOAD_ID.fullmatch(entry.name):
                continue
            try:
                last_write = max(path.stat().st_mtime for path in (entry, entry / "data") if path.exists())
            except (OSError, ValueError):  # removed meanwhile
                continue
            if last_write < cutoff:
                idle.append(entry.name)
        return idle

    def expiring(
        self, idle_seconds: float, on_expired: Callable[[int, int], None]
    ) -> AbstractAsyncContextManager[None]:
        """While open, a task of the app's removes sessions idle for `idle_seconds` (uploads.expire)."""
        return expiring_sessions(self.expire, idle_seconds, on_expired)

    def remove_stale_sync(self, grace_seconds: float) -> int:
        """Blocking: delete sessions untouched for longer than the grace period (start-up recovery)."""
        removed = 0
        cutoff = time.time() - grace_seconds
        for entry in self.root.iterdir():
            data = entry / "data"
            try:
                mtime = data.stat().st_mtime if data.exists() else entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                self.bytes.record(entry.name, None)
                removed += 1
        return removed



def _truncate(path: Path, size: int) -> None:
    """Blocking: cut a session's data file back to `size` bytes."""
    with open(path, "r+b") as handle:
        handle.truncate(size)
