"""The one interface every content source answers: local repositories, upstream caches, and later
OCI layouts and remote registries for the copier. HTTP handlers see only this.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from mirror.errors import BlobUnknown, Unsupported
from mirror.oci.digest import Digest
from mirror.oci.manifest import Descriptor

if TYPE_CHECKING:
    from mirror.storage.backend import BlobBackend
    from mirror.storage.uploads import Upload


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A whole, verified blob on disk: served with sendfile."""

    digest: Digest
    size: int
    path: Path


class BlobStream(Protocol):
    """A blob whose bytes are still arriving (an upstream fill): served by streaming as they land."""

    digest: Digest
    size: int

    async def open_reader(self) -> BinaryIO:
        """A file object of the caller's own over the bytes (close it when done)."""
        ...

    async def readable(self, offset: int, end: int) -> int:
        """Wait until bytes past `offset` may be sent; return how far (at most `end`); raise if it failed."""
        ...

    def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) as they become available; raises if the fill fails."""
        ...


@dataclass(frozen=True, slots=True)
class BlobInBackend:
    """A whole, verified blob in a BlobBackend without local files (S3): streamed from it, or redirected to
    a presigned URL when the backend offers one."""

    digest: Digest
    size: int
    backend: BlobBackend

    def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.backend.read(self.digest, start, end)


BlobBody = BlobFile | BlobStream | BlobInBackend

# Asked by a registry, while it holds the tag, when a manifest PUT would point an existing tag at another
# manifest: (current target, new manifest). It raises (e.g. Denied) to refuse the move. Because the
# registry reads the tag, asks and writes as one step, two concurrent PUTs cannot both pass it.
TagMoveCheck = Callable[[Digest, Digest], None]


@runtime_checkable
class ReopenableBytes(Protocol):
    """A blob's bytes that can be read again from any offset: what the copier hands to `put_blob`, so a
    destination resuming an interrupted upload reads only the missing part from the source. Iterating it
    reads from the start; a writer that cannot resume needs nothing else."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def from_offset(self, offset: int) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: Digest
    media_type: str
    body: bytes

    @property
    def info(self) -> ManifestInfo:
        return ManifestInfo(self.digest, self.media_type, len(self.body))


@dataclass(frozen=True, slots=True)
class PutManifestResult:
    digest: Digest
    subject: Digest | None


class Registry:
    """Base for content sources. Reads must be implemented; writes default to 405 UNSUPPORTED so a
    read-only source (an upstream cache) needs no write code at all."""

    read_only_message = "this repository is read-only"

    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        raise NotImplementedError

    async def open_blob(self, repo: str, digest: Digest) -> BlobBody:
        raise NotImplementedError

    def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `start` on, as an async stream: the read path of the copier, which must
        work the same for a local store, a remote registry, an OCI layout and (later) S3, so it never sees
        a file path. The default goes through `open_blob`; a backend without files overrides it."""
        return _stream_body(self, repo, digest, start)

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        raise NotImplementedError

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        raise NotImplementedError

    async def list_tags(self, repo: str) -> list[str]:
        raise NotImplementedError

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        raise NotImplementedError

    async def list_repositories(self) -> list[str]:
        raise NotImplementedError

    # -- writes ------------------------------------------------------------------------------------
    def _unsupported(self) -> Unsupported:
        return Unsupported(self.read_only_message)

    def _refuse_tag_move_check(self, on_tag_move: TagMoveCheck | None) -> None:
        """For a destination only the copier writes: a tag-move check it cannot make atomic with the write
        is refused, never skipped."""
        if on_tag_move is not None:
            raise Unsupported("this repository cannot check a tag move atomically")

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        """Store a streamed blob under `digest` (verified before it becomes visible). `size`, when the
        caller knows it, lets a remote destination choose a monolithic or a chunked upload."""
        raise self._unsupported()

    async def mount_blob(self, repo: str, source_repo: str, digest: Digest) -> bool:
        raise self._unsupported()

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        raise self._unsupported()

    async def delete_manifest(self, repo: str, reference: str) -> None:
        raise self._unsupported()

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        raise self._unsupported()


    # -- upload sessions (only writable sources have them) ------------------------------------------
    async def start_upload(self, repo: str) -> Upload:
        raise self._unsupported()

    async def upload_status(self, repo: str, upload_id: str) -> Upload:
        raise self._unsupported()

    async def append_upload(
        self, repo: str, upload_id: str, chunks: AsyncIterable[bytes], *, start: int | None, length: int | None
    ) -> Upload:
        raise self._unsupported()

    async def finish_upload(
        self,
        repo: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterable[bytes] | None,
        *,
        start: int | None,
        length: int | None,
    ) -> BlobInfo:
        raise self._unsupported()

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        raise self._unsupported()


STREAM_PIECE_BYTES = 1 << 20


async def _stream_body(registry: Registry, repo: str, digest: Digest, start: int) -> AsyncIterator[bytes]:
    body = await registry.open_blob(repo, digest)
    if isinstance(body, BlobInBackend):
        async for piece in body.iter_range(start, body.size):
            yield piece
        return
    if not isinstance(body, BlobFile):
        async for piece in body.iter_range(start, body.size):
            yield piece
        return
    handle = await asyncio.to_thread(open, body.path, "rb", buffering=0)
    try:
        offset = start
        while offset < body.size:
            piece = await asyncio.to_thread(os.pread, handle.fileno(), STREAM_PIECE_BYTES, offset)
            if not piece:
                raise BlobUnknown(f"blob {digest} is shorter than its recorded size")
            offset += len(piece)
            yield piece
    finally:
        await asyncio.to_thread(handle.close)
