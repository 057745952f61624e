"""What both upload stores (on disk, in a bucket) share: what they admit of a chunk (it must start where the
session ends, and the bytes all open sessions hold together stay within `uploads.max_bytes`), and the task
that removes sessions idle for `uploads.expire` while the server runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from mirror.errors import BlobUploadTooLarge, RangeNotSatisfiable, UploadsFull
from mirror.tasks import running_beside

log = logging.getLogger(__name__)

# What a client over uploads.max_bytes is told to wait: long enough for other pushes to make progress.
RETRY_AFTER_SECONDS = 60


def range_header(size: int) -> dict[str, str]:
    """The `Range` an upload's responses carry: the bytes it holds (`0-0` when it holds none)."""
    return {"Range": f"0-{max(size - 1, 0)}"}


class UploadBytes:
    """Bytes each open session holds (as far as this store knows), and their sum: what max_bytes bounds."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}
        self.total = 0

    def record(self, upload_id: str, size: int | None) -> None:
        """Record what a session holds now (None: it is gone)."""
        previous = self._sizes.pop(upload_id, 0)
        if size is not None:
            self._sizes[upload_id] = size
        self.total += (size or 0) - previous

    def of(self, upload_id: str) -> int:
        return self._sizes.get(upload_id, 0)

    def ids(self) -> set[str]:
        return set(self._sizes)

    def admit(self, upload_id: str, size: int, *, start: int | None, length: int | None) -> None:
        """Before a chunk of a session that holds `size` bytes: refuse one that starts elsewhere (416) or
        that declares more than the bound (413); count the session at its real size."""
        if start is not None and start != size:
            raise RangeNotSatisfiable(
                f"upload has {size} bytes; a chunk must start there, not at {start}", headers=range_header(size)
            )
        self.record(upload_id, size)
        if self.max_bytes is not None and length is not None and size + length > self.max_bytes:
            raise BlobUploadTooLarge(
                f"this upload would hold {size + length} bytes, more than uploads.max_bytes ({self.max_bytes})"
            )

    def reserve(self, upload_id: str, more: int) -> None:
        """Count `more` bytes of a chunk against max_bytes before they are written."""
        if self.max_bytes is None:
            return
        size = self.of(upload_id) + more
        if size > self.max_bytes:
            raise BlobUploadTooLarge(
                f"this upload would hold more than uploads.max_bytes ({self.max_bytes} bytes) on its own"
            )
        if self.total + more > self.max_bytes:
            raise UploadsFull(
                f"unfinished uploads already hold {self.total} bytes of the {self.max_bytes} allowed "
                "(uploads.max_bytes); retry once others have finished",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.record(upload_id, size)

    async def within(self, upload_id: str, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`chunks`, each counted (and refused past the bound) before it is passed on."""
        async for chunk in chunks:
            self.reserve(upload_id, len(chunk))
            yield chunk


@contextlib.asynccontextmanager
async def expiring_sessions(
    expire: Callable[[float], Awaitable[tuple[int, int]]], idle_seconds: float,
    on_expired: Callable[[int, int], None],
) -> AsyncIterator[None]:
    """While open, a task calls `expire(idle_seconds)` a few times per expiry period (at most every 5 minutes:
    a session lives at most a quarter longer than uploads.expire) and tells `on_expired(sessions, bytes)`."""
    async with running_beside(_expire_forever(expire, idle_seconds, on_expired), name="upload-expiry"):
        yield


async def _expire_forever(
    expire: Callable[[float], Awaitable[tuple[int, int]]], idle_seconds: float,
    on_expired: Callable[[int, int], None],
) -> None:
    interval = min(max(idle_seconds / 4, 0.05), 300.0)
    while True:
        await asyncio.sleep(interval)
        try:
            removed, freed = await expire(idle_seconds)
        except Exception:  # noqa: BLE001 - a failed pass (a disk error, S3 unreachable) must not end expiry
            log.exception("expiring idle upload sessions failed; retrying in %.0f s", interval)
            continue
        if removed:
            on_expired(removed, freed)
