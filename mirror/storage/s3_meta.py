"""The MetadataStore in the bucket: links, tags and referrers every node reads and writes alike.

Layout under the prefix (`repositories/` unless told), the same as `RepoStore`'s on disk (repos.py):

    <name>/_layers/<alg>/<hex>                 empty object: the blob is readable through <name>
    <name>/_manifests/<alg>/<hex>              JSON {mediaType, size[, referencesLinked]}: the manifest
                                               belongs to <name>
    <name>/_tags/<tag>                         the digest the tag points to (LastModified = last validated)
    <name>/_referrers/<alg>/<subject hex>/<alg>-<hex>   JSON descriptor of a manifest whose subject it is
    _names/<name>                              empty object: <name> exists (written with its first link)

Name components start with [a-z0-9], so `_layers` & co can never collide with a nested repository, nor
`_names` with a top-level one. The `_names/` markers let `repositories()` list one key per repository instead
of every link in the bucket; like the folders on disk, a marker stays when the links are gone.

S3 is read-after-write consistent (AWS since 2020, Ceph RGW, MinIO), so a tag one node writes is what the next
read on any node sees. Every failing call raises StorageUnavailable (S3Objects translates them); a torn or
foreign object reads as absent, as a torn file does on disk.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from mirror.errors import DigestInvalid
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import Descriptor
from mirror.oci.names import is_valid_name, is_valid_tag, validate_tag
from mirror.storage.repos import (
    ManifestLink,
    TagLink,
    decode_manifest_link,
    decode_referrer,
    encode_manifest_link,
    encode_referrer,
)
from mirror.storage.s3_objects import S3Objects

__all__ = ["DEFAULT_PREFIX", "S3MetadataStore"]

DEFAULT_PREFIX = "repositories/"
# How many requests one operation keeps in flight (a push checking a manifest's layers, reading a subject's
# referrers); the client's connection pool caps the node's total anyway.
_FAN_OUT = 16
_DIGEST_KEY = re.compile(r"(sha256|sha512):[0-9a-f]+")

T = TypeVar("T")


async def _bounded(calls: Iterable[Awaitable[T]], limit: int = _FAN_OUT) -> list[T]:
    """Await every call, at most `limit` at a time, and return their results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        # The first failure is the answer (S3 down is down for all of them): no point in queueing the rest.
        for task in tasks:
            task.cancel()
        raise


class S3MetadataStore:
    """A MetadataStore (mirror/storage/metadata.py) over small objects in the blob bucket."""

    def __init__(self, objects: S3Objects, prefix: str = DEFAULT_PREFIX) -> None:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"the metadata prefix must end with '/': {prefix!r}")
        self.objects = objects
        self.prefix = prefix
        self._names_prefix = f"{prefix}_names/"
        # Repositories whose marker this instance wrote: only names, so bounded by the repositories there are.
        self._marked: set[str] = set()

    # -- keys --------------------------------------------------------------------------------------
    def _repo(self, name: str) -> str:
        # Handlers validate names first; this is the last line of defence before a key is built.
        if not is_valid_name(name):
            raise ValueError(f"refusing to build a key from an invalid name {name!r}")
        return f"{self.prefix}{name}/"

    @staticmethod
    def _digest(digest: Digest) -> str:
        if not _DIGEST_KEY.fullmatch(str(digest)):
            raise ValueError(f"refusing to build a key from an invalid digest {str(digest)[:200]!r}")
        return f"{digest.algorithm}/{digest.hex}"

    @staticmethod
    def _tag(tag: str) -> str:
        if not is_valid_tag(tag):
            raise ValueError(f"refusing to build a key from an invalid tag {tag[:200]!r}")
        return tag

    def _blob_key(self, repo: str, digest: Digest) -> str:
        return f"{self._repo(repo)}_layers/{self._digest(digest)}"

    def _manifest_key(self, repo: str, digest: Digest) -> str:
        return f"{self._repo(repo)}_manifests/{self._digest(digest)}"

    def _tags_prefix(self, repo: str) -> str:
        return f"{self._repo(repo)}_tags/"

    def _tag_key(self, repo: str, tag: str) -> str:
        return f"{self._tags_prefix(repo)}{self._tag(tag)}"

    def _referrers_prefix(self, repo: str, subject: Digest) -> str:
        return f"{self._repo(repo)}_referrers/{self._digest(subject)}/"

    def _referrer_key(self, repo: str, subject: Digest, referrer: Digest) -> str:
        self._digest(referrer)
        return f"{self._referrers_prefix(repo, subject)}{referrer.algorithm}-{referrer.hex}"

    def _marker_key(self, repo: str) -> str:
        self._repo(repo)
        return f"{self._names_prefix}{repo}"

    async def _mark(self, repo: str) -> None:
        if repo in self._marked:
            return
        await self.objects.put(self._marker_key(repo), b"")
        self._marked.add(repo)  # only once it is written: a failed marker is retried with the next link

    # -- blobs -------------------------------------------------------------------------------------
    async def has_blob(self, repo: str, digest: Digest) -> bool:
        return await self.objects.exists(self._blob_key(repo, digest))

    async def link_blob(self, repo: str, digest: Digest) -> None:
        key = self._blob_key(repo, digest)
        await asyncio.gather(self._mark(repo), self.objects.put(key, b""))

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        return await self.objects.delete(self._blob_key(repo, digest))

    async def missing(self, repo: str, blobs: list[Digest], manifests: list[Digest]) -> list[Digest]:
        blob_keys = [self._blob_key(repo, digest) for digest in blobs]
        for digest in manifests:
            self._manifest_key(repo, digest)
        present = await _bounded(
            [self.objects.exists(key) for key in blob_keys]
            + [self._has_manifest(repo, digest) for digest in manifests]
        )
        return [digest for digest, found in zip([*blobs, *manifests], present, strict=True) if not found]

    async def _has_manifest(self, repo: str, digest: Digest) -> bool:
        return await self.manifest_link(repo, digest) is not None

    # -- manifests ---------------------------------------------------------------------------------
    async def manifest_link(self, repo: str, digest: Digest) -> ManifestLink | None:
        found = await self.objects.get(self._manifest_key(repo, digest))
        return None if found is None else decode_manifest_link(digest, found[0])

    async def resolve(self, repo: str, reference: str) -> ManifestLink | None:
        if looks_like_digest(reference):
            return await self.manifest_link(repo, Digest.parse(reference))
        tag = await self.tag(repo, validate_tag(reference))
        return await self.manifest_link(repo, tag.digest) if tag else None

    async def store_manifest(
        self, repo: str, link: ManifestLink, *, referrer_of: Digest | None, referrer: Descriptor | None,
        tag: str | None,
    ) -> None:
        # Every key first: an invalid name, digest or tag writes nothing at all.
        link_key = self._manifest_key(repo, link.digest)
        referrer_key = (
            self._referrer_key(repo, referrer_of, referrer.digest)
            if referrer_of is not None and referrer is not None else None
        )
        tag_key = self._tag_key(repo, tag) if tag is not None else None
        # The order readers rely on (metadata.py): the link, then the referrer entry, then the tag.
        await asyncio.gather(self._mark(repo), self.objects.put(link_key, encode_manifest_link(link)))
        if referrer_key is not None and referrer is not None:
            await self.objects.put(referrer_key, encode_referrer(referrer))
        if tag_key is not None:
            await self.objects.put(tag_key, str(link.digest).encode())

    async def unlink_manifest(self, repo: str, digest: Digest, *, subject: Digest | None) -> None:
        link_key = self._manifest_key(repo, digest)
        referrer_key = self._referrer_key(repo, subject, digest) if subject is not None else None
        tags = await self._tags_pointing_to(repo, digest)
        doomed = [self._tag_key(repo, tag) for tag in tags]
        if referrer_key is not None:
            doomed.append(referrer_key)
        # Tags and referrer entry before the link: no reader ever follows a tag to a manifest that is gone.
        if doomed:
            await self.objects.delete_many(doomed)
        await self.objects.delete_many([link_key])

    # -- tags --------------------------------------------------------------------------------------
    async def tag(self, repo: str, tag: str) -> TagLink | None:
        found = await self.objects.get(self._tag_key(repo, tag))
        if found is None:
            return None
        data, modified = found
        try:
            return TagLink(Digest.parse(data.decode().strip()), modified)
        except (UnicodeDecodeError, DigestInvalid):
            return None

    async def delete_tag(self, repo: str, tag: str) -> bool:
        return await self.objects.delete(self._tag_key(repo, tag))

    async def tags(self, repo: str) -> list[str] | None:
        found = await self._tag_names(repo)
        if found:
            return found
        return [] if await self.objects.exists(self._marker_key(repo)) else None

    async def _tag_names(self, repo: str) -> list[str]:
        prefix = self._tags_prefix(repo)
        names = [entry.key[len(prefix):] async for entry in self.objects.entries(prefix)]
        return sorted(name for name in names if is_valid_tag(name))

    async def _tags_pointing_to(self, repo: str, digest: Digest) -> list[str]:
        names = await self._tag_names(repo)
        links = await _bounded([self.tag(repo, name) for name in names])
        return [name for name, link in zip(names, links, strict=True) if link is not None and link.digest == digest]

    # -- referrers ---------------------------------------------------------------------------------
    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        prefix = self._referrers_prefix(repo, subject)
        keys = [entry.key async for entry in self.objects.entries(prefix) if "/" not in entry.key[len(prefix):]]
        bodies = await _bounded([self.objects.get(key) for key in keys])
        found: list[Descriptor] = []
        for body in bodies:
            descriptor = None if body is None else decode_referrer(body[0])
            if descriptor is not None:
                found.append(descriptor)
        return found

    # -- repositories ------------------------------------------------------------------------------
    async def repositories(self) -> list[str]:
        prefix = self._names_prefix
        names = [entry.key[len(prefix):] async for entry in self.objects.entries(prefix)]
        return sorted(name for name in names if is_valid_name(name))

    async def close(self) -> None:
        return None  # the blob backend owns the client
