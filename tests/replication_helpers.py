"""Helpers for replication tests: rules around two local repositories, and an upstream source.

`upstream_source_factory()` is the project's RemoteRegistry once it exists in this build
(mirror/replication/remote.py, issue 10's remote half). Until then it is `HeadFirstSource` below: the
smallest read side of that contract — HEAD for stat_manifest, GETs through the upstream's own
UpstreamClient, `before_get(kind)` awaited before every manifest or blob GET — so the engine's rate-limit
gate is exercised against the real client and a real (fake-upstream) HTTP server either way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from mirror.errors import BlobUnknown, ManifestUnknown, NameUnknown, UpstreamUnavailable
from mirror.oci.digest import Digest
from mirror.oci.manifest import ACCEPT_ALL_MANIFESTS, Descriptor
from mirror.replication.destinations import RemoteFactory
from mirror.storage.interface import BlobInfo, Manifest, ManifestInfo, Registry
from mirror.upstream.client import UpstreamClient

BeforeGet = Callable[[str], Awaitable[None]]


class HeadFirstSource(Registry):
    def __init__(self, client: UpstreamClient, *, before_get: BeforeGet | None = None) -> None:
        self.client = client
        self.before_get = before_get

    async def _gate(self, kind: str) -> None:
        if self.before_get is not None:
            await self.before_get(kind)

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        response = await self.client.open("HEAD", f"/v2/{repo}/manifests/{reference}",
                                          scope=self.client.scope_for(repo), headers={"Accept": ACCEPT_ALL_MANIFESTS})
        response.release()
        if response.status == 404:
            raise ManifestUnknown(detail={"reference": reference})
        if response.status != 200:
            raise UpstreamUnavailable(f"HEAD answered {response.status}")
        return ManifestInfo(Digest.parse(response.headers["Docker-Content-Digest"]),
                            response.headers.get("Content-Type", ""), int(response.headers.get("Content-Length", 0)))

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        await self._gate("manifest")
        response = await self.client.open("GET", f"/v2/{repo}/manifests/{reference}",
                                          scope=self.client.scope_for(repo), headers={"Accept": ACCEPT_ALL_MANIFESTS})
        try:
            if response.status == 404:
                raise ManifestUnknown(detail={"reference": reference})
            body = await response.read()
        finally:
            response.release()
        return Manifest(Digest.of(body), response.headers.get("Content-Type", ""), body)

    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        response = await self.client.open("HEAD", f"/v2/{repo}/blobs/{digest}", scope=self.client.scope_for(repo))
        response.release()
        if response.status != 200:
            raise BlobUnknown(detail={"digest": str(digest)})
        return BlobInfo(digest, int(response.headers.get("Content-Length", 0)))

    async def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:  # type: ignore[override]
        await self._gate("blob")
        response = await self.client.open("GET", f"/v2/{repo}/blobs/{digest}", scope=self.client.scope_for(repo))
        try:
            if response.status != 200:
                raise BlobUnknown(detail={"digest": str(digest)})
            async for piece in response.content.iter_chunked(1 << 16):
                yield piece
        finally:
            response.release()

    async def list_tags(self, repo: str) -> list[str]:
        response = await self.client.open("GET", f"/v2/{repo}/tags/list", scope=self.client.scope_for(repo))
        try:
            if response.status == 404:
                raise NameUnknown(detail={"name": repo})
            data: Any = json.loads(await response.read())
        finally:
            response.release()
        return list(data.get("tags") or [])

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return []


def upstream_source_factory() -> RemoteFactory:
    try:
        from mirror.replication.remote import RemoteRegistry  # type: ignore[import-not-found]
    except ImportError:
        return lambda client, before_get: HeadFirstSource(client, before_get=before_get)
    return lambda client, before_get: RemoteRegistry(client, before_get=before_get)  # type: ignore[no-any-return]


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll until `predicate()` (sync or async) is truthy; fail naming `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


async def http_json(session: aiohttp.ClientSession, method: str, url: str) -> tuple[int, Any]:
    async with session.request(method, url) as response:
        return response.status, await response.json(content_type=None)
