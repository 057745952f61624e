"""Blob bytes in an S3 bucket (AWS, Ceph RGW, MinIO, ...), through aiobotocore.

Keys: `blobs/<algorithm>/<hex>` for committed blobs; `_uploads/<uuid>` only for the short moment a blob whose
digest was not known when its writer opened is copied to its final key.

How a write stays invisible until it is verified (S3 has no rename):
- A blob smaller than one part is held in memory and PUT to its final key at `commit`, after its hash matched.
- A larger one goes up as a multipart upload, part by part (`part_size`, at most `parts_in_flight` parts
  uploading while the next one fills, so memory is bounded by a few parts, never the blob). When the writer
  knew the digest up front (`open_sink(expected=...)`), the multipart upload is made under the final key and
  completed only once the hash matched: completing is atomic, so the key appears whole or not at all. A
  mismatch aborts the multipart upload, which leaves nothing (not even the parts). Without a digest up front
  the parts go to `_uploads/<uuid>`, which is completed, server-side copied to the final key and deleted.
- `abort` (a client that hung up, a cancelled task) aborts the multipart upload and deletes any temp key.
Two writers of one digest may race: both complete, the bytes are the same, one object results.

Nothing here blocks the event loop: hashing runs in a thread a part at a time, the HTTP is aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.errors import BlobUnknown, DigestInvalid, RegistryError, SizeInvalid, StorageUnavailable
from mirror.oci.digest import Digest

if TYPE_CHECKING:
    from mirror.config import S3Config

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_PART_BYTES = 8 * MiB
# S3's limits: parts of at least 5 MiB (but the last), at most 10,000 of them, CopyObject up to 5 GiB.
MIN_PART_BYTES = 5 * MiB
MAX_PARTS = 10_000
MAX_COPY_BYTES = 5 << 30
COPY_PART_BYTES = 1 << 30
READ_PIECE_BYTES = 1 * MiB
BLOB_PREFIX = "blobs/"
TEMP_PREFIX = "_uploads/"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """What the backend needs to reach its bucket (mirror/config.py's S3Config has the same fields)."""

    bucket: str
    endpoint: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None  # never logged, never repr'd
    path_style: bool = True
    presign: bool = False
    presign_expires: float = 900.0

    def __repr__(self) -> str:
        return f"S3Settings(bucket={self.bucket!r}, endpoint={self.endpoint!r}, region={self.region!r})"


def settings_from_config(config: S3Config) -> S3Settings:
    return S3Settings(
        bucket=config.bucket,
        endpoint=config.endpoint,
        region=config.region,
        access_key=config.access_key,
        secret_key=config.secret_key,
        path_style=config.path_style,
        presign=config.presign,
        presign_expires=config.presign_expires,
    )


class S3Unavailable(ConnectionError):
    """The bucket cannot be reached or used: a sentence an operator can act on (no secrets in it)."""


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    code = error.get("Code")
    return str(code) if code is not None else None


def _is_missing(exc: BaseException) -> bool:
    return _client_error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _unavailable(exc: BaseException, action: str, bucket: str) -> BaseException:
    """What a failed S3 call becomes for the registry: a 503 naming the bucket (never a key), or itself when
    it is not the backend's (a registry error, a cancellation, a bug)."""
    if isinstance(exc, RegistryError) or not isinstance(exc, Exception):
        return exc
    backend_error = isinstance(exc, OSError | TimeoutError) or type(exc).__module__.split(".")[0] in (
        "botocore", "aiobotocore", "aiohttp",
    )
    if not backend_error:
        return exc
    reason = _client_error_code(exc) or type(exc).__name__
    log.warning("S3 %s in bucket %s failed: %s", action, bucket, exc)
    return StorageUnavailable(f"storage backend failed to {action}: {reason}", detail={"bucket": bucket})


@contextlib.contextmanager
def _s3_call(action: str, bucket: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        translated = _unavailable(exc, action, bucket)
        if translated is exc:
            raise
        raise translated from exc


class S3BlobBackend:
    """A BlobBackend (mirror/storage/backend.py) over one bucket. Open with `await S3BlobBackend.open(...)`."""

    def __init__(
        self, settings: S3Settings, client: Any, stack: AsyncExitStack, *, part_size: int, parts_in_flight: int,
        blob_prefix: str = BLOB_PREFIX,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client
        self._stack = stack
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        self.blob_prefix = blob_prefix

    def key(self, digest: Digest) -> str:
        return f"{self.blob_prefix}{digest.algorithm}/{digest.hex}"

    def view(self, blob_prefix: str) -> S3BlobBackend:
        """The same bucket and client with blobs under another prefix (the pull-through cache's shared tier
        keeps its own, so evicting from it can never touch a pushed blob). Closing a view closes nothing."""
        return S3BlobBackend(self.settings, self.client, AsyncExitStack(), part_size=self.part_size,
                             parts_in_flight=self.parts_in_flight, blob_prefix=blob_prefix)

    @classmethod
    async def open(
        cls, settings: S3Settings, *, part_size: int = DEFAULT_PART_BYTES, parts_in_flight: int = 2
    ) -> S3BlobBackend:
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"part_size must be at least {MIN_PART_BYTES} bytes (S3's smallest part)")
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as exc:
            raise S3Unavailable(f"storage.backend s3 needs the s3 extra (pip install 'mirror[s3]'): {exc}") from exc

        config = AioConfig(
            s3={"addressing_style": "path" if settings.path_style else "virtual"},
            signature_version="s3v4",
            # botocore's default since 1.36 (trailing CRC checksums with aws-chunked bodies) is refused by
            # many S3-compatible servers, Ceph RGW among them; the digest check here covers integrity.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(10, parts_in_flight * 4),
        )
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=settings.endpoint,
                region_name=settings.region,
                aws_access_key_id=settings.access_key,
                aws_secret_access_key=settings.secret_key,
                config=config,
            )
        )
        return cls(settings, client, stack, part_size=part_size, parts_in_flight=parts_in_flight)

    async def close(self) -> None:
        await self._stack.aclose()

    async def check(self) -> None:
        """HEAD the bucket: raises S3Unavailable with what went wrong (check-config, start-up)."""
        where = f"bucket {self.bucket!r} at {self.settings.endpoint or 'AWS S3'}"
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - every failure is the same sentence with its reason
            code = _client_error_code(exc)
            reason = {
                "404": "no such bucket",
                "NoSuchBucket": "no such bucket",
                "403": "access denied (check access_key and secret_key)",
                "AccessDenied": "access denied (check access_key and secret_key)",
            }.get(code or "", f"{type(exc).__name__}: {exc}")
            raise S3Unavailable(f"{where} does not answer: {reason}") from exc

    # -- reads -------------------------------------------------------------------------------------
    async def stat(self, digest: Digest) -> int | None:
        try:
            answer = await self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise _unavailable(exc, "look up a blob", self.bucket) from exc
        return int(answer["ContentLength"])

    async def read(self, digest: Digest, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            if await self.stat(digest) is None:
                raise BlobUnknown(detail={"digest": str(digest)})
            return
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(digest)}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            answer = await self.client.get_object(**request)
        except Exception as exc:
            if _is_missing(exc):
                raise BlobUnknown(detail={"digest": str(digest)}) from exc
            if _client_error_code(exc) == "InvalidRange":
                return  # a start at (or past) the end: nothing to send
            raise _unavailable(exc, "read a blob", self.bucket) from exc
        with _s3_call("read a blob", self.bucket):
            async with answer["Body"] as body:
                async for piece in body.iter_chunks(READ_PIECE_BYTES):
                    yield piece

    async def local_file(self, digest: Digest) -> Path | None:
        return None

    async def presigned_url(self, digest: Digest, *, expires: float | None = None) -> str | None:
        if not self.settings.presign:
            return None
        return await self.signed_url(digest, expires=self.settings.presign_expires if expires is None else expires)

    async def signed_url(self, digest: Digest, *, expires: float) -> str:
        """A GET URL for the blob, whatever `presign` says: what this node itself fetches a shared blob by
        (through its blocking pool, so the fill machinery streams it like an upstream's body)."""
        url = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)}, ExpiresIn=int(expires)
        )
        return str(url)

    async def list(self) -> AsyncIterator[Digest]:
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_call("list blobs", self.bucket):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.blob_prefix):
                for entry in page.get("Contents", ()):
                    algorithm, _, hex_part = entry["Key"][len(self.blob_prefix):].partition("/")
                    try:
                        yield Digest.parse(f"{algorithm}:{hex_part}")
                    except DigestInvalid:
                        continue  # not a blob of ours

    # -- writes ------------------------------------------------------------------------------------
    async def open_sink(self, algorithm: str = "sha256", *, expected: Digest | None = None) -> S3BlobSink:
        return S3BlobSink(self, algorithm, expected)

    async def delete(self, digest: Digest) -> bool:
        if await self.stat(digest) is None:
            return False
        with _s3_call("delete a blob", self.bucket):
            await self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        return True

    async def pending_multipart_uploads(self) -> tuple[str, ...]:
        """Keys with an unfinished multipart upload (what an abort must never leave behind)."""
        keys: tuple[str, ...] = ()
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket):
            keys += tuple(upload["Key"] for upload in page.get("Uploads", ()))
        return keys


class MultipartUpload:
    """One key's multipart upload, started by its first part: at most `parts_in_flight` parts uploading while
    the caller fills the next one, the key visible only once `complete` succeeds, nothing left after `abort`.

    The caller cuts the parts (S3 wants each but the last to be at least 5 MiB); this only sends them."""

    def __init__(self, client: Any, bucket: str, key: str, *, part_size: int, parts_in_flight: int) -> None:
        self._client = client
        self._bucket = bucket
        self.key = key
        self._part_size = part_size  # only to say why a blob of too many parts is refused
        self._parts_in_flight = parts_in_flight
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    @property
    def started(self) -> bool:
        """Whether S3 holds an unfinished upload of ours (a part was sent, no complete or abort yet)."""
        return self._upload_id is not None

    async def send(self, part: bytes) -> None:
        """Queue the next part; waits while `parts_in_flight` are still uploading."""
        if self._upload_id is None:
            answer = await self._client.create_multipart_upload(Bucket=self._bucket, Key=self.key)
            self._upload_id = str(answer["UploadId"])
        if len(self._parts) >= MAX_PARTS:
            raise SizeInvalid(f"blob is larger than {MAX_PARTS} parts of {self._part_size} bytes")
        number = len(self._parts) + 1
        entry: dict[str, Any] = {"PartNumber": number}
        self._parts.append(entry)
        while len(self._in_flight) >= self._parts_in_flight:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            self.raise_if_failed()
        task = asyncio.create_task(self._upload_part(number, part, entry))
        self._in_flight.add(task)
        task.add_done_callback(self._part_done)

    async def _upload_part(self, number: int, part: bytes, entry: dict[str, Any]) -> None:
        answer = await self._client.upload_part(
            Bucket=self._bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=part
        )
        entry["ETag"] = answer["ETag"]

    def _part_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def raise_if_failed(self) -> None:
        """Raise what made a part fail since the last look, if one did."""
        if self._failure is not None:
            raise self._failure

    async def complete(self, last: bytes = b"") -> None:
        """Send `last` (when not empty) as the final part, wait for the others and complete: the key appears
        whole. On failure the upload is still open; the caller aborts it."""
        if last:
            entry: dict[str, Any] = {"PartNumber": len(self._parts) + 1}
            self._parts.append(entry)
            await self._upload_part(entry["PartNumber"], last, entry)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        self.raise_if_failed()
        await self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None  # completed: nothing left to abort

    async def cancel_parts(self) -> None:
        """Stop the parts still uploading (the first half of an abort)."""
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def abort_upload(self) -> None:
        """Abort the upload in S3, which drops its parts (the second half of an abort; callers shield it)."""
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                await self._client.abort_multipart_upload(Bucket=self._bucket, Key=self.key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - already failing; a leftover is logged, not raised over the cause
                log.warning("could not abort multipart upload %s of %s", upload_id, self.key, exc_info=True)

    async def abort(self) -> None:
        await self.cancel_parts()
        # Shielded: an abort on a cancelled request must still reach S3, or the parts stay (and are billed).
        await asyncio.shield(self.abort_upload())


class S3BlobSink:
    """One blob on its way into the bucket (see the module docstring for how it stays invisible)."""

    def __init__(self, backend: S3BlobBackend, algorithm: str, expected: Digest | None) -> None:
        if expected is not None and expected.algorithm != algorithm:
            raise ValueError("expected digest and algorithm differ")
        self._backend = backend
        self._client = backend.client
        self._bucket = backend.bucket
        self._hasher = hashlib.new(algorithm)
        self._expected = expected
        self._key = backend.key(expected) if expected is not None else f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._multipart = MultipartUpload(
            backend.client, backend.bucket, self._key, part_size=backend.part_size,
            parts_in_flight=backend.parts_in_flight,
        )
        self._finished = False
        self._committed = False

    @property
    def size(self) -> int:
        return self._size

    async def write(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("write after commit or abort")
        with _s3_call("store a blob", self._bucket):
            self._multipart.raise_if_failed()  # a part that failed while this chunk was on its way
        if not chunk:
            return
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        self._size += len(chunk)
        with _s3_call("store a blob", self._bucket):
            while self._buffered >= self._backend.part_size:
                await self._send_part(self._take(self._backend.part_size))

    def _take(self, count: int) -> bytes:
        """The first `count` buffered bytes, as one piece."""
        joined = b"".join(self._buffer)
        part, rest = joined[:count], joined[count:]
        self._buffer = [rest] if rest else []
        self._buffered = len(rest)
        return part

    async def _send_part(self, part: bytes) -> None:
        # Hashed in order before it is handed on; hashlib releases the GIL, so the loop keeps going.
        await asyncio.to_thread(self._hasher.update, part)
        await self._multipart.send(part)

    async def commit(self, digest: Digest, *, size: int | None = None) -> int:
        if self._finished:
            raise RuntimeError("commit after commit or abort")
        if self._expected is not None and digest != self._expected:
            raise ValueError(f"sink opened for {self._expected}, committed as {digest}")
        try:
            rest = self._take(self._buffered)
            if rest:
                await asyncio.to_thread(self._hasher.update, rest)
            if size is not None and self._size != size:
                raise SizeInvalid(f"blob is {self._size} bytes, expected {size}")
            actual = self._hasher.hexdigest()
            if digest.algorithm != self._hasher.name or actual != digest.hex:
                raise DigestInvalid(
                    f"content digest {digest.algorithm}:{actual} does not match {digest}",
                    detail={"expected": str(digest), "actual": f"{digest.algorithm}:{actual}"},
                )
            final = self._backend.key(digest)
            if not self._multipart.started:
                # Small: one PUT of verified bytes, straight to the final key.
                await self._client.put_object(Bucket=self._bucket, Key=final, Body=rest)
            else:
                await self._multipart.complete(rest)
                if self._key != final:
                    await _copy(self._client, self._bucket, self._key, final, self._size)
                    await self._client.delete_object(Bucket=self._bucket, Key=self._key)
        except BaseException as exc:
            await self.abort()
            translated = _unavailable(exc, "store a blob", self._bucket)
            if translated is exc:
                raise
            raise translated from exc
        self._finished = self._committed = True
        return self._size

    async def abort(self) -> None:
        if self._committed:
            return
        self._finished = True
        self._buffer, self._buffered = [], 0
        await self._multipart.cancel_parts()
        # Shielded: an abort on a cancelled request must still reach S3, or the parts stay (and are billed).
        await asyncio.shield(self._cleanup())

    async def _cleanup(self) -> None:
        await self._multipart.abort_upload()
        if self._key.startswith(TEMP_PREFIX):
            with contextlib.suppress(Exception):
                await self._client.delete_object(Bucket=self._bucket, Key=self._key)


async def _copy(client: Any, bucket: str, source: str, target: str, size: int) -> None:
    """Server-side copy; beyond CopyObject's 5 GiB, a multipart copy in 1 GiB ranges."""
    if size <= MAX_COPY_BYTES:
        await client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source})
        return
    upload_id = (await client.create_multipart_upload(Bucket=bucket, Key=target))["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, COPY_PART_BYTES), 1):
            end = min(start + COPY_PART_BYTES, size) - 1
            answer = await client.upload_part_copy(
                Bucket=bucket, Key=target, UploadId=upload_id, PartNumber=number,
                CopySource={"Bucket": bucket, "Key": source}, CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
        await client.complete_multipart_upload(
            Bucket=bucket, Key=target, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        await asyncio.shield(client.abort_multipart_upload(Bucket=bucket, Key=target, UploadId=upload_id))
        raise
