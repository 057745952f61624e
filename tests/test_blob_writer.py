"""The writer under pushes: a slow disk bounds memory instead of growing it, bytes and digest
come out exact whatever the piece boundaries, and a disk error reaches the caller with the file closed."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest

from mirror.storage import blobs
from mirror.storage.blobs import MAX_BUFFERED_BYTES, BlobWriter

CHUNK = 256 << 10


async def test_bytes_and_digest_are_exact_across_odd_chunk_sizes(tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)
    writer = await BlobWriter.open(tmp_path / "blob", "sha256")
    offset, step = 0, 1
    while offset < len(data):  # chunk sizes from 1 byte to a few MiB, so pieces split everywhere
        await writer.write(data[offset : offset + step])
        offset += step
        step = step * 3 + 1
        if step > 3 << 20:
            writer.kick()
            step = 7
    await writer.close()
    assert writer.size == len(data)
    assert writer.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "blob").read_bytes() == data


async def test_a_stalled_disk_makes_the_producer_wait_with_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_free = threading.Event()
    real_write = BlobWriter._write_sync

    def stalled_write(self: BlobWriter, chunks: list[bytes]) -> None:
        disk_free.wait(timeout=30)
        real_write(self, chunks)

    monkeypatch.setattr(BlobWriter, "_write_sync", stalled_write)
    writer = await BlobWriter.open(tmp_path / "blob", "sha256")
    accepted = 0
    data = os.urandom(CHUNK)

    async def produce() -> None:
        nonlocal accepted
        for _ in range((3 * MAX_BUFFERED_BYTES) // CHUNK):
            await writer.write(data)
            accepted += CHUNK

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.5)
    # The disk took nothing: the producer is held just past the bound, not 3x the bound in memory.
    assert not producer.done()
    assert MAX_BUFFERED_BYTES <= accepted <= MAX_BUFFERED_BYTES + CHUNK
    assert writer.size == 0
    disk_free.set()
    await asyncio.wait_for(producer, 30)
    await writer.close()
    assert writer.size == 3 * MAX_BUFFERED_BYTES
    assert writer.hasher.hexdigest() == hashlib.sha256(data * (3 * MAX_BUFFERED_BYTES // CHUNK)).hexdigest()


async def test_a_disk_error_reaches_the_caller_and_the_file_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: BlobWriter, chunks: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BlobWriter, "_write_sync", full_disk)
    writer = await BlobWriter.open(tmp_path / "blob", "sha256")
    with pytest.raises(OSError) as raised:
        for _ in range(4 * blobs.WRITE_BUFFER_BYTES // CHUNK):
            await writer.write(os.urandom(CHUNK))
        await writer.close()
    assert raised.value.errno == errno.ENOSPC
    assert writer._handle.closed
    await asyncio.wait_for(writer.close(), 5)  # closing again (cleanup paths do) neither hangs nor raises
