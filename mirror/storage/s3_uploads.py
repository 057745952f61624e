"""Blob upload sessions kept in the S3 bucket, so a push started through one node continues and finishes
through any other node that shares the bucket. The same observable behaviour as `UploadStore` (uploads.py).

Keys, all under `sessions/<id>/` (the id is 32 lowercase hex characters, checked before it names a key):
- `info.json`: `{"repository": ..., "created": ...}`; a session exists exactly while this object does;
- `<16-digit zero-padded start offset>`: one object per appended chunk, so keys sort in offset order and the
  session's size is the sum of its chunk objects (one listing; S3 and RGW listings are strongly consistent).

A chunk becomes visible only whole, so a chunk that is refused (declared length not met, over
`max_bytes`), or whose client hangs up, leaves the session exactly as it was:
- up to `part_size` bytes are held in memory and written with one PutObject once the body ended and had its
  declared length;
- a larger chunk goes up as a multipart upload to its key (a few parts in memory at most) that is completed
  only then, and aborted otherwise, which leaves nothing.

Finishing reads every chunk back in offset order and streams it through the backend's `put_stream`: the sink
hashes the bytes and publishes the blob only when they match the digest (S3 has no rename, and a running hash
cannot pass from one node to another, so each byte crosses the node twice). A wrong digest ends the session;
a failing backend keeps it, so the client's retry finds every byte it sent. When the backend already has the
blob, the chunks are still read and verified, and the write is skipped.

Concurrency: requests on one session are serialised within a node by an asyncio.Lock per id (only ids that
exist get one). Across nodes nothing is locked: a client sends its chunks one after the other, each one after
the previous one was answered, and every request reads the session afresh from the bucket. Two chunks sent at
once through two nodes for the same offset both write that offset's key (the last one stays); a mix of
chunks that is not the pushed blob then fails the digest check when the upload is finished.
After writing a chunk, a node checks that `info.json` is still there: if another node cancelled or expired
the session meanwhile, the chunk is deleted again and the client told the upload is unknown.

Expiry: a session whose newest object (or the newest part of a chunk still uploading) is older than the
idle time is removed, objects, unfinished multipart uploads and all, so a node that died mid-push leaves
nothing behind for long. Objects' ages are the bucket's LastModified against this node's clock.

What is per node only: `open_bytes` counts the sessions this node created or appended to, at the size it
last saw them (another node's appends to them are counted the next time this node handles the session, and
sessions finished elsewhere are dropped at the next expiry pass): an approximation for a gauge. `max_bytes`
bounds that same count, so it bounds what one node lets its clients hold, not the bucket's total.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from mirror.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    SizeInvalid,
)
from mirror.oci.digest import Digest
from mirror.storage.backend import BlobBackend, put_stream
from mirror.storage.s3 import (
    MIN_PART_BYTES,
    READ_PIECE_BYTES,
    MultipartUpload,
    S3BlobBackend,
    _client_error_code,
    _is_missing,
    _s3_call,
    _unavailable,
)
from mirror.storage.s3_objects import S3Objects
from mirror.storage.upload_bytes import UploadBytes, expiring_sessions
from mirror.storage.uploads import Upload

log = logging.getLogger(__name__)

SESSIONS_PREFIX = "sessions/"
_INFO = "info.json"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_OFFSET = re.compile(r"[0-9]{16}")


@dataclass(frozen=True, slots=True)
class _Chunk:
    offset: int
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class _Session:
    upload: Upload
    chunks: tuple[_Chunk, ...]


@dataclass(frozen=True, slots=True)
class _Pending:
    """An unfinished multipart upload of a chunk (in flight on some node, or left by one that died)."""

    key: str
    upload_id: str
    initiated: float


@dataclass(slots=True)
class _Activity:
    """What a session holds in the bucket, as expiry sees it."""

    newest: float = 0.0
    size: int = 0  # bytes of its chunks
    pending: list[_Pending] = field(default_factory=list)


class S3UploadSessions:
    """UploadSessions (mirror/storage/metadata.py) in the bucket of `backend`; see the module docstring."""

    def __init__(
        self, objects: S3Objects, backend: S3BlobBackend, *, part_size: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """`part_size`: the largest chunk written with one PutObject, and the part size of larger ones
        (None: the backend's)."""
        if objects.bucket != backend.bucket:
            raise ValueError("upload sessions and their backend must share one bucket")
        self.part_size = backend.part_size if part_size is None else part_size
        if self.part_size < MIN_PART_BYTES:
            raise ValueError(f"part_size must be at least {MIN_PART_BYTES} bytes (S3's smallest part)")
        self.objects = objects
        self.backend = backend
        self.client = backend.client
        self.bucket = backend.bucket
        self.max_bytes = max_bytes
        self.bytes = UploadBytes(max_bytes)
        self._locks: dict[str, asyncio.Lock] = {}
        # A session's repository never changes: read once per node, not on every request.
        self._repositories: dict[str, str] = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def open_bytes(self) -> int:
        """Bytes the open sessions hold together (the `mirror_uploads_open_bytes` gauge)."""
        return self.bytes.total

    def _forget(self, upload_id: str) -> None:
        self.bytes.record(upload_id, None)
        self._repositories.pop(upload_id, None)
        self._locks.pop(upload_id, None)

    def _prefix(self, upload_id: str) -> str:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise BlobUploadUnknown("unknown upload id", detail={"id": upload_id[:100]})
        return f"{SESSIONS_PREFIX}{upload_id}/"

    def _lock(self, upload_id: str) -> asyncio.Lock:
        """Serialise requests on one session within this node (two PATCHes must not both write at one offset).

        Only ids that exist get a lock (callers load the session first), so garbage ids cannot grow this."""
        return self._locks.setdefault(upload_id, asyncio.Lock())

    # -- sessions ----------------------------------------------------------------------------------
    async def create(self, repository: str) -> Upload:
        upload_id = uuid.uuid4().hex
        info = json.dumps({"repository": repository, "created": time.time()}).encode()
        await self.objects.put(f"{self._prefix(upload_id)}{_INFO}", info, action="start an upload")
        self._repositories[upload_id] = repository
        self.bytes.record(upload_id, 0)
        return Upload(upload_id, repository, 0)

    async def get(self, repository: str, upload_id: str) -> Upload:
        return (await self._load(repository, upload_id)).upload

    async def _load(self, repository: str, upload_id: str) -> _Session:
        """The session as the bucket has it now, or BlobUploadUnknown."""
        prefix = self._prefix(upload_id)
        chunks: list[_Chunk] = []
        exists = False
        async for entry in self.objects.entries(prefix, action="read an upload"):
            name = entry.key[len(prefix):]
            if name == _INFO:
                exists = True
            elif _OFFSET.fullmatch(name):
                chunks.append(_Chunk(int(name), entry.key, entry.size))
        owner = self._repositories.get(upload_id) if exists else None
        if exists and owner is None:
            found = await self.objects.get(f"{prefix}{_INFO}", action="read an upload")
            try:
                owner = json.loads(found[0])["repository"] if found is not None else None
            except (ValueError, KeyError, TypeError):
                owner = None
            if isinstance(owner, str):
                self._repositories[upload_id] = owner
        if not isinstance(owner, str):
            self._forget(upload_id)
            raise BlobUploadUnknown("unknown upload id", detail={"id": upload_id})
        if owner != repository:
            raise BlobUploadUnknown("upload belongs to another repository", detail={"id": upload_id})
        size = sum(chunk.size for chunk in chunks)
        return _Session(Upload(upload_id, repository, size), tuple(chunks))

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
        await self._load(repository, upload_id)
        async with self._lock(upload_id):
            session = await self._load(repository, upload_id)  # the size may have moved while we waited
            return (await self._append_locked(session, chunks, start=start, length=length)).upload

    async def _append_locked(
        self, session: _Session, chunks: AsyncIterable[bytes], *, start: int | None, length: int | None
    ) -> _Session:
        upload = session.upload
        # What the bucket holds now, whatever was counted before; a chunk that cannot fit is refused up front.
        self.bytes.admit(upload.id, upload.size, start=start, length=length)
        prefix = self._prefix(upload.id)
        key = f"{prefix}{upload.size:016d}"
        try:
            received = await self._put_chunk(key, self.bytes.within(upload.id, chunks), length)
        except BaseException:
            self.bytes.record(upload.id, upload.size)  # refused whole: the session is what it was
            raise
        if not received:
            return session
        if not await self.objects.exists(f"{prefix}{_INFO}", action="store an upload"):
            # Cancelled or expired through another node while this chunk was on its way: not resurrected.
            await self.objects.delete_many([key], action="store an upload")
            self._forget(upload.id)
            raise BlobUploadUnknown("unknown upload id", detail={"id": upload.id})
        size = upload.size + received
        self.bytes.record(upload.id, size)
        chunk = _Chunk(upload.size, key, received)
        return _Session(Upload(upload.id, upload.repository, size), (*session.chunks, chunk))

    async def _put_chunk(self, key: str, chunks: AsyncIterable[bytes], length: int | None) -> int:
        """Write one request body to `key`, visible only whole and of the declared `length`; return its size.
        Whatever stops it (a wrong length, a client that hung up, S3 failing, cancellation) leaves no object
        and no multipart upload."""
        buffer = bytearray()
        received = 0
        multipart: MultipartUpload | None = None
        try:
            async for piece in chunks:
                received += len(piece)
                if length is not None and received > length:
                    raise SizeInvalid(f"chunk declared {length} bytes but more arrived")
                buffer += piece
                if multipart is not None:
                    with _s3_call("store an upload", self.bucket):
                        multipart.raise_if_failed()  # a part that failed while this piece was on its way
                while len(buffer) >= self.part_size:
                    if multipart is None:
                        multipart = MultipartUpload(
                            self.client, self.bucket, key, part_size=self.part_size,
                            parts_in_flight=self.backend.parts_in_flight,
                        )
                    part = bytes(buffer[:self.part_size])
                    del buffer[:self.part_size]
                    with _s3_call("store an upload", self.bucket):
                        await multipart.send(part)
            if length is not None and received != length:
                raise SizeInvalid(f"chunk declared {length} bytes but {received} arrived")
            with _s3_call("store an upload", self.bucket):
                if multipart is not None:
                    await multipart.complete(bytes(buffer))
                    multipart = None  # completed: nothing to abort
                elif received:
                    await self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buffer))
        except BaseException:
            if multipart is not None:
                await multipart.abort()
            raise
        return received

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
        """Append the final body (if any), verify every byte against `digest` and publish the blob in
        `backend`; return its size. A wrong digest ends the session; a failing backend keeps it."""
        await self._load(repository, upload_id)
        async with self._lock(upload_id):
            session = await self._load(repository, upload_id)
            if chunks is not None:
                session = await self._append_locked(session, chunks, start=start, length=length)
            try:
                size = await backend.stat(digest)
                if size is None:
                    size = await put_stream(backend, digest, self._read(session), size=session.upload.size)
                else:
                    await self._verify(session, digest)
            except DigestInvalid:
                # Refused: the session is over, a refused upload must not linger half-verified.
                await self._remove(upload_id)
                raise
            await self._remove(upload_id)
            return size

    async def _read(self, session: _Session) -> AsyncIterator[bytes]:
        """The session's bytes, chunk after chunk in offset order."""
        for chunk in session.chunks:
            try:
                answer = await self.client.get_object(Bucket=self.bucket, Key=chunk.key)
            except Exception as exc:
                if _is_missing(exc):
                    raise BlobUploadUnknown(
                        "upload was removed while it was being finished", detail={"id": session.upload.id}
                    ) from exc
                raise _unavailable(exc, "read an upload", self.bucket) from exc
            with _s3_call("read an upload", self.bucket):
                async with answer["Body"] as body:
                    async for piece in body.iter_chunks(READ_PIECE_BYTES):
                        yield piece

    async def _verify(self, session: _Session, digest: Digest) -> None:
        hasher = hashlib.new(digest.algorithm)
        async for piece in self._read(session):
            # hashlib releases the GIL on large pieces: the loop keeps going meanwhile.
            await asyncio.to_thread(hasher.update, piece)
        actual = hasher.hexdigest()
        if actual != digest.hex:
            raise DigestInvalid(
                f"content digest {digest.algorithm}:{actual} does not match {digest}",
                detail={"expected": str(digest), "actual": f"{digest.algorithm}:{actual}"},
            )

    async def cancel(self, repository: str, upload_id: str) -> None:
        await self._load(repository, upload_id)
        async with self._lock(upload_id):
            await self._load(repository, upload_id)
            await self._remove(upload_id)

    async def _remove(self, upload_id: str) -> None:
        """Delete every object and unfinished multipart upload of the session."""
        self._forget(upload_id)
        prefix = self._prefix(upload_id)
        # info.json first: from then on every node finds the session gone, even if the rest fails here
        # (what is left is removed by expiry).
        await self.objects.delete_many([f"{prefix}{_INFO}"], action="remove an upload")
        keys = [entry.key async for entry in self.objects.entries(prefix, action="remove an upload")]
        await self.objects.delete_many(keys, action="remove an upload")
        for pending in await self._pending(prefix):
            with _s3_call("remove an upload", self.bucket):
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=pending.key, UploadId=pending.upload_id
                )

    async def _pending(self, prefix: str) -> list[_Pending]:
        found: list[_Pending] = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        with _s3_call("list uploads", self.bucket):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", ()):
                    if upload["Key"].startswith(prefix):
                        found.append(_Pending(upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()))
        return found

    # -- expiry ------------------------------------------------------------------------------------
    async def _activity(self, prefix: str) -> dict[str, _Activity]:
        """Every session (by id) with objects or unfinished multipart uploads under `prefix`."""
        sessions: dict[str, _Activity] = {}

        def of(key: str) -> _Activity | None:
            upload_id = key[len(SESSIONS_PREFIX):].partition("/")[0]
            if not _UPLOAD_ID.fullmatch(upload_id):
                return None  # not a session of ours
            return sessions.setdefault(upload_id, _Activity())

        async for entry in self.objects.entries(prefix, action="list uploads"):
            if (activity := of(entry.key)) is not None:
                activity.newest = max(activity.newest, entry.modified)
                if _OFFSET.fullmatch(entry.key.rpartition("/")[2]):
                    activity.size += entry.size
        for pending in await self._pending(prefix):
            if (activity := of(pending.key)) is not None:
                activity.newest = max(activity.newest, pending.initiated)
                activity.pending.append(pending)
        return sessions

    async def _newest_part(self, pending: _Pending) -> float:
        """When a chunk still uploading last received a part (when it started, before its first part)."""
        newest = pending.initiated
        paginator = self.client.get_paginator("list_parts")
        with _s3_call("list uploads", self.bucket):
            try:
                async for page in paginator.paginate(Bucket=self.bucket, Key=pending.key, UploadId=pending.upload_id):
                    for part in page.get("Parts", ()):
                        newest = max(newest, part["LastModified"].timestamp())
            except Exception as exc:
                if _client_error_code(exc) != "NoSuchUpload":
                    raise
                return time.time()  # completed or aborted this very moment: not idle
        return newest

    async def expire(self, idle_seconds: float) -> tuple[int, int]:
        """Remove sessions that received nothing for `idle_seconds`, whichever node they were pushed through;
        return (sessions, bytes) freed.

        A session a request of this node is writing to right now is left alone (its lock is held), and so is
        one with a chunk whose parts are still arriving through another node; the others are removed under
        their lock, so a request arriving here meanwhile finds the session gone (404) rather than half of it."""
        cutoff = time.time() - idle_seconds
        known = self.bytes.ids() | set(self._repositories) | set(self._locks)
        sessions = await self._activity(SESSIONS_PREFIX)
        for upload_id in known - sessions.keys():
            lock = self._locks.get(upload_id)
            if lock is None or not lock.locked():
                self._forget(upload_id)  # finished, cancelled or expired through another node
        removed = freed = 0
        for upload_id, activity in sessions.items():
            if activity.newest >= cutoff:
                continue
            lock = self._locks.get(upload_id)
            if lock is not None and lock.locked():
                continue
            async with self._lock(upload_id):
                current = (await self._activity(self._prefix(upload_id))).get(upload_id)
                if current is None or current.newest >= cutoff:
                    continue  # removed or written to meanwhile
                if any([await self._newest_part(pending) >= cutoff for pending in current.pending]):
                    continue
                await self._remove(upload_id)
                removed += 1
                freed += current.size
        return removed, freed

    def expiring(
        self, idle_seconds: float, on_expired: Callable[[int, int], None]
    ) -> AbstractAsyncContextManager[None]:
        """While open, a task of the app's removes sessions idle for `idle_seconds` (uploads.expire)."""
        # Every node runs this over the same bucket; two passes that meet on one session both delete it,
        # which is harmless.
        return expiring_sessions(self.expire, idle_seconds, on_expired)

