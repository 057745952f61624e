"""The filesystem BlobBackend: today's BlobStore (`blobs/<alg>/<2 hex>/<hex>`, temp file + fsync + rename)
behind the backend protocol, with its guarantees unchanged: it only delegates to BlobStore and BlobWriter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.errors import BlobUnknown, SizeInvalid
from mirror.oci.digest import Digest
from mirror.storage.blobs import BlobStore, BlobWriter

READ_PIECE_BYTES = 1 << 20


class FilesystemBlobBackend:
    def __init__(self, store: BlobStore) -> None:
        self.store = store

    async def stat(self, digest: Digest) -> int | None:
        stored = await self.store.stat(digest)
        return None if stored is None else stored.size

    async def read(self, digest: Digest, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self.store.path_for(digest)
        try:
            handle = await asyncio.to_thread(open, path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobUnknown(detail={"digest": str(digest)}) from exc
        try:
            size = (await asyncio.to_thread(os.fstat, handle.fileno())).st_size
            stop = size if end is None else min(end, size)
            offset = start
            while offset < stop:
                piece = await asyncio.to_thread(os.pread, handle.fileno(), min(READ_PIECE_BYTES, stop - offset), offset)
                if not piece:
                    raise BlobUnknown(f"blob {digest} is shorter than its recorded size")
                offset += len(piece)
                yield piece
        finally:
            await asyncio.to_thread(handle.close)

    async def local_file(self, digest: Digest) -> Path | None:
        stored = await self.store.stat(digest)
        return None if stored is None else stored.path

    async def presigned_url(self, digest: Digest, *, expires: float | None = None) -> str | None:
        return None

    async def open_sink(self, algorithm: str = "sha256", *, expected: Digest | None = None) -> FilesystemBlobSink:
        # The temp file is renamed into place at commit either way: knowing the digest early changes nothing.
        temp = self.store.new_temp_path()
        return FilesystemBlobSink(self.store, temp, await BlobWriter.open(temp, algorithm))

    async def delete(self, digest: Digest) -> bool:
        return await asyncio.to_thread(self.store.delete_sync, digest)

    async def list(self) -> AsyncIterator[Digest]:
        for digest in await asyncio.to_thread(self.store.iter_digests_sync):
            yield digest

    async def close(self) -> None:
        return None


class FilesystemBlobSink:
    def __init__(self, store: BlobStore, temp: Path, writer: BlobWriter) -> None:
        self._store = store
        self._temp = temp
        self._writer = writer
        self._accepted = 0
        self._finished = False

    @property
    def size(self) -> int:
        return self._accepted  # the writer's own size counts bytes already on disk

    async def write(self, chunk: bytes) -> None:
        await self._writer.write(chunk)
        self._accepted += len(chunk)

    async def commit(self, digest: Digest, *, size: int | None = None) -> int:
        try:
            await self._writer.close()
            if size is not None and self._writer.size != size:
                raise SizeInvalid(f"blob is {self._writer.size} bytes, expected {size}")
            stored = await asyncio.to_thread(
                self._store.commit_sync, self._temp, digest, self._writer.hasher.hexdigest(), self._writer.size
            )
        except BaseException:
            await self.abort()
            raise
        self._finished = True
        return stored.size

    async def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        # close() raises a failed write again (ENOSPC): that must not skip removing the temp file.
        with contextlib.suppress(Exception):
            await self._writer.close()
        await asyncio.to_thread(self._temp.unlink, True)
