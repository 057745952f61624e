"""A local registry's metadata behind two small protocols, so it can live on this node's disk or in a bucket
that every node shares.

`MetadataStore` holds what a repository links (blobs, manifests), its tags and its referrers;
`UploadSessions` holds blob uploads in progress. The filesystem implementations (`FsMetadataStore` here over
`RepoStore`, and `UploadStore`) are today's layout and guarantees; the S3 ones (`mirror/storage/s3_meta.py`,
`mirror/storage/s3_uploads.py`) put the same things in the bucket next to the blob bytes, so a tag pushed
through one node is read through another and an upload started on one node is finished on another.

What every implementation keeps:
- `store_manifest` writes the manifest link before the referrer entry and the tag: a reader that sees the
  tag always finds the manifest it names;
- a tag is read-judged-written by callers under a lock of theirs (the coordinator's, cluster-wide), not here;
- names and tags are validated by the handlers before they reach a store; stores refuse to build a key or a
  path from an invalid one all the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mirror.oci.digest import Digest
from mirror.oci.manifest import Descriptor
from mirror.storage.backend import BlobBackend
from mirror.storage.repos import ManifestLink, RepoStore, TagLink
from mirror.storage.uploads import Upload

__all__ = ["FsMetadataStore", "ManifestLink", "MetadataStore", "TagLink", "UploadSessions"]


class MetadataStore(Protocol):
    """Links, tags and referrers of local repositories. Every method is safe on the event loop."""

    async def has_blob(self, repo: str, digest: Digest) -> bool: ...

    async def link_blob(self, repo: str, digest: Digest) -> None: ...

    async def unlink_blob(self, repo: str, digest: Digest) -> bool: ...

    async def missing(self, repo: str, blobs: list[Digest], manifests: list[Digest]) -> list[Digest]:
        """Those of `blobs` the repository does not link, then those of `manifests` it does not link."""
        ...

    async def manifest_link(self, repo: str, digest: Digest) -> ManifestLink | None: ...

    async def resolve(self, repo: str, reference: str) -> ManifestLink | None:
        """The manifest a reference (digest or tag) names in this repository, if it links it."""
        ...

    async def store_manifest(
        self, repo: str, link: ManifestLink, *, referrer_of: Digest | None, referrer: Descriptor | None,
        tag: str | None,
    ) -> None:
        """Link a manifest, record it as a referrer of `referrer_of` (with descriptor `referrer`) and point
        `tag` at it, in that order."""
        ...

    async def tag(self, repo: str, tag: str) -> TagLink | None: ...

    async def delete_tag(self, repo: str, tag: str) -> bool: ...

    async def unlink_manifest(self, repo: str, digest: Digest, *, subject: Digest | None) -> None:
        """Remove the manifest's tags, its referrer entry under `subject` (when it has one), then its link."""
        ...

    async def tags(self, repo: str) -> list[str] | None:
        """The repository's tags, sorted; None when there is no such repository."""
        ...

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]: ...

    async def repositories(self) -> list[str]:
        """Every repository name, sorted."""
        ...

    async def close(self) -> None: ...


class UploadSessions(Protocol):
    """Blob uploads in progress (`UploadStore` on disk, `S3UploadSessions` in the bucket)."""

    async def create(self, repository: str) -> Upload: ...

    async def get(self, repository: str, upload_id: str) -> Upload:
        """The session, or BlobUploadUnknown when it does not exist or belongs to another repository."""
        ...

    async def append(
        self, repository: str, upload_id: str, chunks: AsyncIterable[bytes], *, start: int | None = None,
        length: int | None = None,
    ) -> Upload:
        """Add a chunk at `start` (must be the current size: else RangeNotSatisfiable); a chunk whose
        received length differs from `length` is refused whole (SizeInvalid), the session unchanged."""
        ...

    async def finish_into(
        self, backend: BlobBackend, repository: str, upload_id: str, digest: Digest,
        chunks: AsyncIterable[bytes] | None = None, *, start: int | None = None, length: int | None = None,
    ) -> int:
        """Append the last chunk, verify every byte against `digest` and publish the blob in `backend`;
        return its size. A wrong digest ends the session (DigestInvalid); a failing backend keeps it."""
        ...

    async def cancel(self, repository: str, upload_id: str) -> None: ...

    @property
    def open_bytes(self) -> int:
        """Bytes the open sessions hold (what uploads.max_bytes bounds), as far as this node knows."""
        ...

    def expiring(
        self, idle_seconds: float, on_expired: Callable[[int, int], None]
    ) -> AbstractAsyncContextManager[None]:
        """While open, sessions idle for `idle_seconds` are removed; `on_expired(sessions, bytes)` is told."""
        ...


# A manifest with more references than this is checked on a thread of the store's own: thousands of file
# lookups take seconds, which would otherwise hold a default-executor thread that blob hits need.
_REFERENCES_ON_DEFAULT_EXECUTOR = 500


class FsMetadataStore:
    """A MetadataStore over `RepoStore`'s files: each operation is one thread hop."""

    def __init__(self, repos: RepoStore) -> None:
        self.repos = repos
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest-references")

    async def has_blob(self, repo: str, digest: Digest) -> bool:
        return await asyncio.to_thread(self.repos.has_blob, repo, digest)

    async def link_blob(self, repo: str, digest: Digest) -> None:
        await asyncio.to_thread(self.repos.link_blob, repo, digest)

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        return await asyncio.to_thread(self.repos.unlink_blob, repo, digest)

    async def missing(self, repo: str, blobs: list[Digest], manifests: list[Digest]) -> list[Digest]:
        def check() -> list[Digest]:
            absent = [digest for digest in blobs if not self.repos.has_blob(repo, digest)]
            absent += [digest for digest in manifests if self.repos.manifest_link(repo, digest) is None]
            return absent

        if len(blobs) + len(manifests) <= _REFERENCES_ON_DEFAULT_EXECUTOR:
            return await asyncio.to_thread(check)
        return await asyncio.get_running_loop().run_in_executor(self._bulk, check)

    async def manifest_link(self, repo: str, digest: Digest) -> ManifestLink | None:
        return await asyncio.to_thread(self.repos.manifest_link, repo, digest)

    async def resolve(self, repo: str, reference: str) -> ManifestLink | None:
        return await asyncio.to_thread(self.repos.resolve, repo, reference)

    async def store_manifest(
        self, repo: str, link: ManifestLink, *, referrer_of: Digest | None, referrer: Descriptor | None,
        tag: str | None,
    ) -> None:
        def write() -> None:
            self.repos.link_manifest(repo, link)
            if referrer_of is not None and referrer is not None:
                self.repos.add_referrer(repo, referrer_of, referrer)
            if tag is not None:
                self.repos.set_tag(repo, tag, link.digest)

        await asyncio.to_thread(write)

    async def tag(self, repo: str, tag: str) -> TagLink | None:
        return await asyncio.to_thread(self.repos.tag, repo, tag)

    async def delete_tag(self, repo: str, tag: str) -> bool:
        return await asyncio.to_thread(self.repos.delete_tag, repo, tag)

    async def unlink_manifest(self, repo: str, digest: Digest, *, subject: Digest | None) -> None:
        def unlink() -> None:
            for tag in self.repos.tags_pointing_to(repo, digest):
                self.repos.delete_tag(repo, tag)
            if subject is not None:
                self.repos.remove_referrer(repo, subject, digest)
            self.repos.unlink_manifest(repo, digest)

        await asyncio.to_thread(unlink)

    async def tags(self, repo: str) -> list[str] | None:
        def read() -> list[str] | None:
            return self.repos.tags(repo) if self.repos.exists(repo) else None

        return await asyncio.to_thread(read)

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return await asyncio.to_thread(self.repos.referrers, repo, subject)

    async def repositories(self) -> list[str]:
        return await asyncio.to_thread(self.repos.repositories)

    async def close(self) -> None:
        self._bulk.shutdown(wait=False, cancel_futures=True)
