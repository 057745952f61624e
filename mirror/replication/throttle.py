"""A rule's `bandwidth`: a source whose blob bytes are read no faster than a cap (a token bucket)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from mirror.oci.digest import Digest
from mirror.oci.manifest import Descriptor
from mirror.storage.interface import BlobBody, BlobInfo, Manifest, ManifestInfo, Registry

BURST_SECONDS = 0.5  # bytes allowed ahead of the average, as seconds of the cap


class Bucket:
    """Shared by every blob of a run, so parallel blobs together stay under the cap."""

    def __init__(self, bytes_per_second: int) -> None:
        self.rate = float(bytes_per_second)
        self.capacity = max(self.rate * BURST_SECONDS, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self, count: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        if self.tokens < 0:
            # Go into debt and sleep it off: a piece larger than the bucket still passes, at the right pace.
            await asyncio.sleep(-self.tokens / self.rate)


class ThrottledRegistry(Registry):
    """Reads like `inner`, blob bytes paced by `bucket`. Writes are not part of a source's job."""

    def __init__(self, inner: Registry, bucket: Bucket) -> None:
        self.inner = inner
        self.bucket = bucket

    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        return await self.inner.stat_blob(repo, digest)

    async def open_blob(self, repo: str, digest: Digest) -> BlobBody:
        return await self.inner.open_blob(repo, digest)

    async def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        async for piece in self.inner.read_blob(repo, digest, start=start):
            await self.bucket.take(len(piece))
            yield piece

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        return await self.inner.stat_manifest(repo, reference)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        return await self.inner.get_manifest(repo, reference)

    async def list_tags(self, repo: str) -> list[str]:
        return await self.inner.list_tags(repo)

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return await self.inner.referrers(repo, subject)
