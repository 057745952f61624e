"""Local repositories: what teams push, stored on disk and served back byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from mirror.cache.index import CACHED, LOCAL
from mirror.cache.manager import CacheManager
from mirror.coordination.interface import Coordinator, CoordinatorUnavailable
from mirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    StorageUnavailable,
    Unsupported,
)
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import Descriptor, ParsedManifest, parse_manifest
from mirror.oci.names import validate_tag
from mirror.storage.backend import BlobBackend, one_piece, put_stream
from mirror.storage.blobs import BlobStore
from mirror.storage.events import PushFeed
from mirror.storage.interface import (
    BlobFile,
    BlobInBackend,
    BlobInfo,
    Manifest,
    ManifestInfo,
    PutManifestResult,
    Registry,
    TagMoveCheck,
)
from mirror.storage.metadata import FsMetadataStore, MetadataStore, UploadSessions
from mirror.storage.repos import ManifestLink, find_blob_sync
from mirror.storage.uploads import Upload, UploadStore

log = logging.getLogger(__name__)

# Copies from the backend to the disk tier running at once (each streams one blob into the blob store).
_WARMING_AT_ONCE = 4
# Manifests larger than this are parsed and hashed in a thread (a few hundred layers and up).
_PARSE_ON_LOOP_BYTES = 64 << 10


def _same_manifest(current: Digest, new: Digest, body: bytes) -> bool:
    """Pushing the bytes a tag already names (maybe hashed with another algorithm) moves nothing."""
    return current == new or (current.algorithm != new.algorithm and Digest.of(body, current.algorithm) == current)


class LocalRegistry(Registry):
    """Two layouts, one behaviour:
    - the filesystem (no `backend`): blobs and manifests in `blobs`, shared with the pull-through cache (a
      pushed blob the cache already holds is not stored twice; the cache manager holds it as LOCAL), links
      in `FsMetadataStore`, sessions in `UploadStore`;
    - a shared bucket (`backend`, storage.backend: s3): blob and manifest bytes in the backend, links and
      sessions in S3 stores beside them, so every node on the bucket serves, and finishes, the same pushes;
      blobs read from the bucket are copied to this node's `blobs` (the disk tier, held as cached and so
      bounded by storage.max_size) and served from there with sendfile.
    Tag moves are serialised by the coordinator's lock: in-process, or cluster-wide through Redis."""

    def __init__(
        self,
        blobs: BlobStore,
        meta: MetadataStore,
        uploads: UploadSessions,
        *,
        manifest_limit: int,
        allow_delete: bool,
        cache: CacheManager,
        coordinator: Coordinator,
        backend: BlobBackend | None = None,
        disk_tier: bool = True,
    ) -> None:
        self.cache = cache
        self.blobs = blobs
        self.backend = backend
        self.meta = meta
        # The filesystem layout answers a blob GET's two questions (linked? stored?) in one thread hop.
        self._fs_repos = meta.repos if isinstance(meta, FsMetadataStore) else None
        self.uploads = uploads
        self.coordinator = coordinator
        # With a backend: blobs read from it are copied to this node's disk (the blob store, held as cached:
        # bounded and evicted by the same LRU as the pull-through cache) and served from there with
        # sendfile next time. Off with presigned redirects: then the node never serves the bytes itself.
        self.disk_tier = disk_tier and backend is not None
        self._warming: dict[Digest, asyncio.Task[None]] = {}
        self.manifest_limit = manifest_limit
        self.allow_delete = allow_delete
        # One thread: the work is pure Python and holds the GIL, so a second one would not finish it sooner,
        # only make the event loop wait longer each time it needs the GIL back.
        self._manifest_checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest-check")
        self.pushes = PushFeed()  # tag pushes, for on_push replication rules

    @contextlib.asynccontextmanager
    async def _tag_lock(self, repo: str, tag: str) -> AsyncIterator[None]:
        """The tag a manifest PUT moves is read, judged (immutable? may this caller overwrite?) and written
        under this lock, so of two concurrent PUTs, on this node or another, the second sees the first's."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.coordinator.lock(f"tag:{repo}:{tag}"))
            except CoordinatorUnavailable as exc:
                raise StorageUnavailable("cluster coordination does not answer; retry the push") from exc
            yield

    # -- blobs -------------------------------------------------------------------------------------
    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        blob = await self.open_blob(repo, digest)
        return BlobInfo(blob.digest, blob.size)

    async def open_blob(self, repo: str, digest: Digest) -> BlobFile | BlobInBackend:
        if self.backend is not None:
            if not await self.meta.has_blob(repo, digest):
                raise BlobUnknown(detail={"digest": str(digest)})
            if self.disk_tier and (hot := await self.blobs.stat(digest)) is not None:
                self.cache.note_access(digest)
                return BlobFile(digest, hot.size, hot.path)
            size = await self.backend.stat(digest)
            if size is None:
                raise BlobUnknown(detail={"digest": str(digest)})
            if self.disk_tier:
                self._warm(digest, size)
            return BlobInBackend(digest, size, self.backend)
        assert self._fs_repos is not None, "the filesystem layout keeps its links in files"
        # Content is shared between repositories, but only readable through one that links it.
        linked, stored = await asyncio.to_thread(find_blob_sync, self._fs_repos, self.blobs, repo, digest)
        if not linked or stored is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        return BlobFile(stored.digest, stored.size, stored.path)

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        """Store a streamed blob (the copier's write path) without an upload session."""
        if self.backend is not None:
            stored_size = await self.backend.stat(digest)
            if stored_size is None:
                stored_size = await put_stream(self.backend, digest, chunks, size=size)
            await self.meta.link_blob(repo, digest)
            return BlobInfo(digest, stored_size)
        # In use from the existence check until held as local: a cached copy found here must not be
        # evicted before it is held (the cache manager skips digests in use).
        with self.cache.in_use(digest):
            stored = await self.blobs.put_stream(digest, chunks, size=size)
            await self.meta.link_blob(repo, digest)
            await self.cache.hold(digest, stored.size, LOCAL)
        return BlobInfo(digest, stored.size)

    async def mount_blob(self, repo: str, source_repo: str, digest: Digest) -> bool:
        if self.backend is not None:
            if not await self.meta.has_blob(source_repo, digest):
                return False
            if await self.backend.stat(digest) is None:
                return False
            await self.meta.link_blob(repo, digest)
            return True
        repos = self._fs_repos
        assert repos is not None, "the filesystem layout keeps its links in files"

        def mount() -> int | None:
            if not repos.has_blob(source_repo, digest):
                return None
            stored = self.blobs.reuse_sync(digest)  # refreshes its age for a concurrent `mirror gc`
            if stored is None:
                return None
            repos.link_blob(repo, digest)
            return stored.size

        with self.cache.in_use(digest):  # not evicted between the check and the hold
            size = await asyncio.to_thread(mount)
            if size is None:
                return False
            await self.cache.hold(digest, size, LOCAL)
        return True

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        self._check_delete()
        # Only the link goes; the bytes stay for other repositories until `mirror gc` finds them unused.
        if not await self.meta.unlink_blob(repo, digest):
            raise BlobUnknown(detail={"digest": str(digest)})

    # -- uploads -----------------------------------------------------------------------------------
    async def start_upload(self, repo: str) -> Upload:
        return await self.uploads.create(repo)

    async def upload_status(self, repo: str, upload_id: str) -> Upload:
        return await self.uploads.get(repo, upload_id)

    async def append_upload(
        self, repo: str, upload_id: str, chunks: AsyncIterable[bytes], *, start: int | None, length: int | None
    ) -> Upload:
        return await self.uploads.append(repo, upload_id, chunks, start=start, length=length)

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
        if self.backend is not None:
            size = await self.uploads.finish_into(
                self.backend, repo, upload_id, digest, chunks, start=start, length=length
            )
            await self.meta.link_blob(repo, digest)
            return BlobInfo(digest, size)
        assert isinstance(self.uploads, UploadStore), "the filesystem layout keeps its sessions in files"
        # In use from the existence check in finish() until held as local: a cached copy of the same bytes
        # that finish() reuses must not be evicted in between (the client would get 201 for a lost blob).
        with self.cache.in_use(digest):
            stored = await self.uploads.finish(repo, upload_id, digest, chunks, start=start, length=length)
            await self.meta.link_blob(repo, digest)
            await self.cache.hold(digest, stored.size, LOCAL)
        return BlobInfo(digest, stored.size)

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        await self.uploads.cancel(repo, upload_id)

    # -- manifests ---------------------------------------------------------------------------------
    async def _resolve(self, repo: str, reference: str) -> ManifestLink:
        link = await self.meta.resolve(repo, reference)
        if link is None:
            raise ManifestUnknown(detail={"reference": reference})
        return link

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        link = await self._resolve(repo, reference)
        return ManifestInfo(link.digest, link.media_type, link.size)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        link = await self._resolve(repo, reference)
        body = await self._manifest_body(link.digest)
        if body is None:
            raise ManifestUnknown(detail={"reference": reference})
        return Manifest(link.digest, link.media_type, body)

    async def _manifest_body(self, digest: Digest) -> bytes | None:
        if self.backend is None:
            return await self.blobs.read_bytes(digest)
        try:
            return b"".join([piece async for piece in self.backend.read(digest)])  # bounded by manifest_limit
        except BlobUnknown:
            return None

    async def _store_manifest_body(self, body: bytes, digest: Digest) -> None:
        if self.backend is None:
            await self.blobs.put_bytes(body, digest)
        elif await self.backend.stat(digest) is None:
            await put_stream(self.backend, digest, one_piece(body), size=len(body))

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        if len(body) > self.manifest_limit:
            raise ManifestTooLarge(f"manifest is larger than {self.manifest_limit} bytes")
        expected = Digest.parse(reference) if looks_like_digest(reference) else None
        parsed, digest = await self._parse_and_hash(body, content_type, expected.algorithm if expected else "sha256")
        if expected is not None:
            if digest != expected:
                raise DigestInvalid(
                    f"manifest digest {digest} does not match {expected}",
                    detail={"expected": str(expected), "actual": str(digest)},
                )
            tag = None
        else:
            tag = validate_tag(reference)

        # Foreign (non-distributable) layers are not among `parsed.blobs`: clients never push them.
        missing = [
            str(d) for d in await self.meta.missing(
                # Each digest once: a manifest may list one layer many times, and on S3 each is a request.
                repo, list(dict.fromkeys(d.digest for d in parsed.blobs)),
                list(dict.fromkeys(d.digest for d in parsed.manifests)),
            )
        ]
        if missing:
            raise ManifestBlobUnknown(
                f"manifest references {len(missing)} blob(s) not in {repo}", detail={"digests": missing[:20]}
            )

        referrer = None
        if parsed.subject is not None:
            referrer = Descriptor(
                parsed.media_type, digest, len(body),
                artifact_type=parsed.artifact_type, annotations=parsed.annotations or None,
            )

        async def store() -> None:
            await self._store_manifest_body(body, digest)
            await self.meta.store_manifest(
                repo, ManifestLink(digest, parsed.media_type, len(body)),
                referrer_of=parsed.subject.digest if parsed.subject else None, referrer=referrer, tag=tag,
            )

        if tag is None:
            await store()
        else:
            async with self._tag_lock(repo, tag):
                if on_tag_move is not None:
                    current = await self.meta.tag(repo, tag)
                    if current is not None and not _same_manifest(current.digest, digest, body):
                        on_tag_move(current.digest, digest)  # raises to refuse; nothing is stored then
                await store()
        if self.backend is None:
            await self.cache.hold(digest, len(body), LOCAL)
        if tag is not None:
            self.pushes.publish(repo, tag)
        return PutManifestResult(digest, parsed.subject.digest if parsed.subject else None)

    async def _parse_and_hash(
        self, body: bytes, content_type: str | None, algorithm: str
    ) -> tuple[ParsedManifest, Digest]:
        """Validate and hash a pushed manifest, off the event loop when it is large.

        A 25,000-layer manifest (3.6 MB) takes about half a second of pure Python to parse: on the loop,
        eight of them at once held every other client for seconds. They run on a small executor of their
        own, so they neither block the loop nor take the default executor's threads that serve blob hits."""

        def check() -> tuple[ParsedManifest, Digest]:
            return parse_manifest(body, content_type, pushed=True), Digest.of(body, algorithm)

        if len(body) <= _PARSE_ON_LOOP_BYTES:
            return check()  # a typical manifest (a few KiB) parses in well under a millisecond
        return await asyncio.get_running_loop().run_in_executor(self._manifest_checks, check)

    def _warm(self, digest: Digest, size: int) -> None:
        """Copy a blob read from the backend to this node's disk, in the background, once at a time."""
        if digest in self._warming or len(self._warming) >= _WARMING_AT_ONCE:
            return  # already on its way, or enough copies running: a later read starts it
        task = asyncio.create_task(self._copy_to_disk(digest, size), name=f"disk-tier {digest}")
        self._warming[digest] = task
        task.add_done_callback(lambda _: self._warming.pop(digest, None))

    async def _copy_to_disk(self, digest: Digest, size: int) -> None:
        assert self.backend is not None
        try:
            if not await self.cache.should_keep(digest, size):
                return  # larger than the whole bound: always streamed from the backend
            with self.cache.in_use(digest):
                stored = await self.blobs.put_stream(digest, self.backend.read(digest), size=size)
                await self.cache.hold(digest, stored.size, CACHED)
        except Exception as exc:  # noqa: BLE001 - the disk tier is a saving: the backend still serves it
            log.warning("could not copy %s from the storage backend to local disk: %s", digest, exc)

    def close(self) -> None:
        for task in list(self._warming.values()):
            task.cancel()
        self._manifest_checks.shutdown(wait=False, cancel_futures=True)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        self._check_delete()
        if not looks_like_digest(reference):
            tag = validate_tag(reference)
            async with self._tag_lock(repo, tag):
                deleted = await self.meta.delete_tag(repo, tag)
            if not deleted:
                raise ManifestUnknown(detail={"reference": reference})
            return
        digest = Digest.parse(reference)
        link = await self._resolve(repo, reference)
        body = await self._manifest_body(digest)
        subject = None
        if body is not None:
            try:
                subject = parse_manifest(body, link.media_type).subject
            except Exception:  # noqa: BLE001 - a stored manifest that no longer parses still gets deleted
                subject = None

        await self.meta.unlink_manifest(repo, digest, subject=subject.digest if subject is not None else None)

    def _check_delete(self) -> None:
        if not self.allow_delete:
            raise Unsupported("deletes are disabled on this registry (storage.delete: false)")

    # -- discovery ---------------------------------------------------------------------------------
    async def list_tags(self, repo: str) -> list[str]:
        found = await self.meta.tags(repo)
        if found is None:
            raise NameUnknown(detail={"name": repo})
        return found

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return await self.meta.referrers(repo, subject)

    async def list_repositories(self) -> list[str]:
        return await self.meta.repositories()
