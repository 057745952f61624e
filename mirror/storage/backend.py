"""Blob bytes behind one small protocol, so the stores above never need a POSIX path.

A `BlobBackend` holds content-addressed blobs: it can say whether a digest is stored and how large it is,
stream any byte range of it, take new bytes through a `BlobSink` that publishes them under a digest only once
they hash to it, delete one and list them all. The filesystem (`mirror/storage/fs_backend.py`, today's
`blobs/<alg>/<2 hex>/<hex>` layout) also hands out a local path for sendfile; S3 (`mirror/storage/s3.py`)
hands out presigned URLs instead, when configured.

The guarantees every implementation keeps (tests/test_storage_backend.py runs the same tests on each):
- nothing is visible under a digest until `commit` verified the bytes (size and digest);
- a failed `commit` (wrong digest, wrong size) and an `abort` leave nothing behind, not even a temp object;
- two writers of the same digest may race: both commits succeed and one blob results;
- memory stays bounded by the backend's buffer (a part for S3), whatever the blob's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol

from mirror.oci.digest import Digest


class BlobSink(Protocol):
    """One blob being written: bytes go in with `write`, then exactly one of `commit` or `abort`."""

    @property
    def size(self) -> int:
        """Bytes accepted so far."""
        ...

    async def write(self, chunk: bytes) -> None:
        """Take `chunk`; may wait while the backend catches up (bounded memory)."""
        ...

    async def commit(self, digest: Digest, *, size: int | None = None) -> int:
        """Publish the bytes under `digest` if they hash to it (and are `size` long when given); return the
        size. Raises DigestInvalid / SizeInvalid, having removed everything written, when they do not."""
        ...

    async def abort(self) -> None:
        """Drop everything written; idempotent, and harmless after a failed commit."""
        ...


class BlobBackend(Protocol):
    """Where blob bytes live. Every method is safe to call from the event loop (none of them blocks it)."""

    async def stat(self, digest: Digest) -> int | None:
        """The stored blob's size, or None when it is not stored."""
        ...

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob (`end` None: to its end); raises BlobUnknown when it is missing."""
        ...

    async def local_file(self, digest: Digest) -> Path | None:
        """A path to serve with sendfile, for a backend that is a local filesystem; None otherwise."""
        ...

    async def presigned_url(self, digest: Digest, *, expires: float | None = None) -> str | None:
        """A URL a client may GET the blob from directly (a redirect target), valid for `expires` seconds
        (None: the backend's configured default), or None when not offered."""
        ...

    async def open_sink(self, algorithm: str = "sha256", *, expected: Digest | None = None) -> BlobSink:
        """A new writer; `algorithm` is the digest algorithm its commit will verify. `expected`, when the
        digest is known before the bytes (a blob PUT, a fill), lets a backend write straight to the final
        place; its commit must then name that digest."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; False when it was not stored."""
        ...

    def list(self) -> AsyncIterator[Digest]:
        """Every committed blob's digest (in no particular order)."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


async def put_stream(
    backend: BlobBackend, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
) -> int:
    """Write `chunks` and commit them under `digest`; whatever goes wrong (a bad digest, a client that hangs
    up, cancellation) leaves nothing behind. Returns the size."""
    sink = await backend.open_sink(digest.algorithm, expected=digest)
    try:
        async for chunk in chunks:
            await sink.write(chunk)
        return await sink.commit(digest, size=size)
    except BaseException:
        await sink.abort()
        raise


_FILE_PIECE_BYTES = 4 << 20


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A local file as a stream (read in threads): what goes into a sink from disk."""
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while piece := await asyncio.to_thread(handle.read, _FILE_PIECE_BYTES):
            yield piece
    finally:
        await asyncio.to_thread(handle.close)


async def one_piece(data: bytes) -> AsyncIterator[bytes]:
    """Bytes already in memory (a manifest) as the stream `put_stream` takes."""
    yield data
