"""The copier: moves an image — a manifest and everything it references — from any Registry to any Registry.

It reads and writes only through the `Registry` interface (`stat_manifest`, `get_manifest`, `read_blob`,
`stat_blob`, `mount_blob`, `put_blob`, `put_manifest`, `referrers`) with async byte streams, so a remote
registry, the local store, the cache, an OCI layout and later S3 are all the same to it.

Order is what makes a copy safe to interrupt: blobs before the manifest that references them, children
before their index, the tag last. A destination therefore never holds a manifest whose references are
missing, and a copy that was killed resumes by asking the destination what it already has (HEAD per blob)
instead of sending it again. Manifests are written byte for byte with their own media type, so digests are
identical on both sides (a Docker schema 2 image stays one). The one exception is an index filtered by
platform, which is a new document by construction; the caller is told its digest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, fields

from mirror.errors import BlobUnknown, ManifestUnknown, RegistryError, Unsupported
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import Descriptor, parse_manifest
from mirror.storage.interface import Manifest, Registry

log = logging.getLogger(__name__)

# Layers that registries do not store (their bytes live at `urls`, or may not be redistributed): a copy
# carries the manifest that names them, never the bytes.
_NON_DISTRIBUTABLE_MARKERS = ("nondistributable", "rootfs.foreign")
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")


def is_distributable(descriptor: Descriptor) -> bool:
    return not any(marker in descriptor.media_type for marker in _NON_DISTRIBUTABLE_MARKERS)


def cosign_tags(digest: Digest) -> list[str]:
    """The tags under which cosign keeps the signature, attestations and SBOM of `digest`."""
    return [f"{digest.algorithm}-{digest.hex}{suffix}" for suffix in COSIGN_SUFFIXES]


def platform_of(entry: dict[str, object]) -> str | None:
    """`os/architecture[/variant]` of an index entry, or None when it names no platform."""
    platform = entry.get("platform")
    if not isinstance(platform, dict):
        return None
    os_name, arch = platform.get("os"), platform.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return None
    variant = platform.get("variant")
    return f"{os_name}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_name}/{arch}"


def platform_matches(found: str | None, wanted: Collection[str]) -> bool:
    """`linux/arm64` matches `linux/arm64/v8`; `linux/arm/v7` matches only itself."""
    if found is None:
        return False
    return any(found == want or found.startswith(want + "/") for want in wanted)


async def tag_digest(registry: Registry, repo: str, reference: str) -> Digest | None:
    """What `repo:reference` names at a registry (a HEAD), or None when it has no such manifest."""
    try:
        return (await registry.stat_manifest(repo, reference)).digest
    except (ManifestUnknown, BlobUnknown):
        return None
    except RegistryError as error:
        if error.status == 404:
            return None
        raise


@dataclass(frozen=True, slots=True)
class CopyOptions:
    platforms: frozenset[str] | None = None  # None: an index is copied whole and untouched
    referrers: bool = False  # OCI referrers and cosign-style tags of every copied manifest
    blob_concurrency: int = 4


@dataclass(slots=True)
class CopyStats:
    manifests_written: int = 0
    manifests_present: int = 0
    blobs_written: int = 0
    blobs_present: int = 0
    blobs_mounted: int = 0
    bytes_written: int = 0

    def add(self, other: CopyStats) -> None:
        for item in fields(self):
            name = item.name
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True, slots=True)
class CopyOutcome:
    source_digest: Digest
    dest_digest: Digest  # differs from source_digest only for an index filtered by platform
    unchanged: bool  # the destination already had it: nothing was read from the source but a HEAD
    stats: CopyStats = field(default_factory=CopyStats)


OnBytes = Callable[[int], None]


class Copier:
    """One copier per run: it remembers which destination repositories received which blobs, so a blob
    shared by several repositories is sent once and mounted into the others."""

    def __init__(self, options: CopyOptions = CopyOptions(), *, on_bytes: OnBytes | None = None) -> None:
        self.options = options
        self.on_bytes = on_bytes
        self._placed: dict[tuple[int, Digest], str] = {}  # (id(dest), digest) -> a dest repo holding it
        self._blob_slots = asyncio.Semaphore(options.blob_concurrency)
        self._blob_locks: dict[tuple[int, Digest], asyncio.Lock] = {}

    async def copy(
        self,
        source: Registry,
        src_repo: str,
        reference: str,
        dest: Registry,
        dest_repo: str,
        *,
        dest_tag: str | None = None,
        expected_dest_digest: Digest | None = None,
        source_tags: Collection[str] | None = None,
    ) -> CopyOutcome:
        """Copy `src_repo:reference` to `dest_repo` (tagged `dest_tag` when given).

        A tag is resolved with `stat_manifest` first (a HEAD at a remote registry, free under Docker Hub's
        limits); a digest needs no asking. When the destination's tag already names the digest this copy would produce
        (`expected_dest_digest`, by default the source's own), nothing else happens: an unchanged image
        costs no source GET and no upload. `source_tags` (the source's tag list, when the caller has it)
        finds cosign signature tags without a HEAD per guess."""
        # A digest names itself: asking the source would cost a round trip and tell nothing new (the
        # engine resolves tags with HEADs first and copies by digest).
        source_digest = (Digest.parse(reference) if looks_like_digest(reference)
                         else (await source.stat_manifest(src_repo, reference)).digest)
        expected = expected_dest_digest or source_digest
        stats = CopyStats()
        if dest_tag is not None and await tag_digest(dest, dest_repo, dest_tag) == expected:
            # Up to date: no GET of the image at all. Only signatures and SBOMs may have been added since.
            if self.options.referrers:
                await self._copy_referrers(source, src_repo, source_digest, dest, dest_repo, stats, source_tags)
            unchanged = stats.manifests_written == 0 and stats.blobs_written == 0 and stats.blobs_mounted == 0
            return CopyOutcome(source_digest, expected, unchanged=unchanged, stats=stats)
        manifest = await source.get_manifest(src_repo, str(source_digest))
        written, tagged = await self._copy_manifest(
            source, src_repo, manifest, dest, dest_repo, stats, top=True, tag=dest_tag
        )
        if dest_tag is not None and not tagged:
            # The manifest was there already (untagged, or under another tag): only the tag is new. The
            # tag was seen not to name `expected`; a filtered index has a digest of its own to check.
            moved = written.digest == expected
            if moved or await tag_digest(dest, dest_repo, dest_tag) != written.digest:
                await dest.put_manifest(dest_repo, dest_tag, written.body, written.media_type)
                stats.manifests_written += 1  # a tag put back (deleted or moved there) is a write too
        if self.options.referrers:
            await self._copy_referrers(source, src_repo, source_digest, dest, dest_repo, stats, source_tags)
        unchanged = stats.manifests_written == 0 and stats.blobs_written == 0 and stats.blobs_mounted == 0
        return CopyOutcome(source_digest, written.digest, unchanged=unchanged, stats=stats)

    async def copy_referrers(
        self, source: Registry, src_repo: str, subject: Digest, dest: Registry, dest_repo: str, *,
        source_tags: Collection[str] | None = None,
    ) -> CopyStats:
        """Only the signatures, SBOMs and attestations of `subject`: for an image the caller has just seen
        up to date at the destination (the planner's HEAD), so it is not asked again."""
        stats = CopyStats()
        await self._copy_referrers(source, src_repo, subject, dest, dest_repo, stats, source_tags)
        return stats

    # -- manifests ---------------------------------------------------------------------------------
    async def _dest_has_manifest(self, dest: Registry, repo: str, digest: Digest) -> bool:
        return await tag_digest(dest, repo, str(digest)) == digest

    async def _copy_manifest(
        self,
        source: Registry,
        src_repo: str,
        manifest: Manifest,
        dest: Registry,
        dest_repo: str,
        stats: CopyStats,
        *,
        top: bool = False,
        tag: str | None = None,
    ) -> tuple[Manifest, bool]:
        """Write `manifest` and everything below it; returns what was written (filtered, for an index) and
        whether it was written under `tag` (one PUT by tag, after everything it references: the tag last)."""
        parsed = parse_manifest(manifest.body, manifest.media_type)
        if parsed.is_index and top and self.options.platforms is not None:
            manifest = self._filter_index(manifest)
            parsed = parse_manifest(manifest.body, manifest.media_type)
        if await self._dest_has_manifest(dest, dest_repo, manifest.digest):
            stats.manifests_present += 1
            return manifest, False
        for child in parsed.manifests:
            if await self._dest_has_manifest(dest, dest_repo, child.digest):
                stats.manifests_present += 1  # known without a source GET (a resumed or overlapping copy)
                continue
            child_manifest = await source.get_manifest(src_repo, str(child.digest))
            await self._copy_manifest(source, src_repo, child_manifest, dest, dest_repo, stats)
        blobs = [d for d in parsed.blobs if is_distributable(d)]
        transfers = [asyncio.ensure_future(self._copy_blob(source, src_repo, d, dest, dest_repo, stats))
                     for d in blobs]
        try:
            await asyncio.gather(*transfers)
        except BaseException:
            # One blob failed (or the run was cancelled): stop the others instead of letting them stream on
            # unobserved, into sessions the caller is about to close. The first error is what the caller sees.
            for transfer in transfers:
                transfer.cancel()
            await asyncio.gather(*transfers, return_exceptions=True)
            raise
        await dest.put_manifest(dest_repo, tag or str(manifest.digest), manifest.body, manifest.media_type)
        stats.manifests_written += 1
        return manifest, tag is not None

    def _filter_index(self, index: Manifest) -> Manifest:
        wanted = self.options.platforms or frozenset()
        document = json.loads(index.body)
        entries = document.get("manifests", [])
        kept = [entry for entry in entries if platform_matches(platform_of(entry), wanted)]
        if len(kept) == len(entries):
            return index  # nothing to drop: keep the original bytes and digest
        if not kept:
            raise ManifestUnknown(f"index {index.digest} has none of the platforms {sorted(wanted)}")
        document["manifests"] = kept
        body = json.dumps(document, separators=(",", ":")).encode()
        filtered = Manifest(Digest.of(body), index.media_type, body)
        log.info("index %s filtered to %d of %d platforms (%s): written as %s", index.digest, len(kept),
                 len(entries), ", ".join(sorted(wanted)), filtered.digest)
        return filtered

    async def _copy_referrers(
        self,
        source: Registry,
        src_repo: str,
        subject: Digest,
        dest: Registry,
        dest_repo: str,
        stats: CopyStats,
        source_tags: Collection[str] | None,
    ) -> None:
        try:
            found = await source.referrers(src_repo, subject)
        except (Unsupported, NotImplementedError):
            found = []
        for descriptor in found:
            if await self._dest_has_manifest(dest, dest_repo, descriptor.digest):
                stats.manifests_present += 1  # a rerun costs the source no GET for referrers already copied
                continue
            referrer = await source.get_manifest(src_repo, str(descriptor.digest))
            await self._copy_manifest(source, src_repo, referrer, dest, dest_repo, stats)
        for tag in cosign_tags(subject):
            if source_tags is not None and tag not in source_tags:
                continue
            try:
                info = await source.stat_manifest(src_repo, tag)
            except ManifestUnknown:
                continue
            if await tag_digest(dest, dest_repo, tag) == info.digest:
                stats.manifests_present += 1
                continue
            attached = await source.get_manifest(src_repo, str(info.digest))
            written, tagged = await self._copy_manifest(source, src_repo, attached, dest, dest_repo, stats, tag=tag)
            if not tagged:
                await dest.put_manifest(dest_repo, tag, written.body, written.media_type)

    # -- blobs -------------------------------------------------------------------------------------
    async def _copy_blob(
        self, source: Registry, src_repo: str, descriptor: Descriptor, dest: Registry, dest_repo: str,
        stats: CopyStats,
    ) -> None:
        digest = descriptor.digest
        # One blob goes to one destination once at a time, whatever the repository: two platforms of an
        # image sharing a layer, or images of several repositories copied at once sharing a base layer.
        # The second waits for the first upload, then finds it (same repository) or mounts it (another).
        lock = self._blob_locks.setdefault((id(dest), digest), asyncio.Lock())
        async with lock, self._blob_slots:
            try:
                await dest.stat_blob(dest_repo, digest)
                stats.blobs_present += 1
                self._placed.setdefault((id(dest), digest), dest_repo)
                return
            except BlobUnknown:
                pass
            holder = self._placed.get((id(dest), digest))
            if holder is not None and holder != dest_repo and await self._mount(dest, dest_repo, holder, digest):
                stats.blobs_mounted += 1
                return
            await dest.put_blob(dest_repo, digest, _SourceBytes(source, src_repo, digest, self._counter(stats)),
                                size=descriptor.size)
            stats.blobs_written += 1
            self._placed[(id(dest), digest)] = dest_repo

    @staticmethod
    async def _mount(dest: Registry, repo: str, holder: str, digest: Digest) -> bool:
        try:
            return await dest.mount_blob(repo, holder, digest)
        except Unsupported:
            return False

    def _counter(self, stats: CopyStats) -> OnBytes:
        def count(size: int) -> None:
            stats.bytes_written += size
            if self.on_bytes is not None:
                self.on_bytes(size)

        return count


class _SourceBytes:
    """A source blob as `put_blob` reads it: from the start, or (a destination resuming an interrupted
    upload) from an offset, so the part the destination already holds is not read from the source again.
    Nothing is requested from the source until it is iterated: a destination that finds the blob already
    stored costs the source nothing."""

    def __init__(self, source: Registry, repo: str, digest: Digest, on_bytes: OnBytes) -> None:
        self.source, self.repo, self.digest, self.on_bytes = source, repo, digest, on_bytes

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.from_offset(0)

    async def from_offset(self, offset: int) -> AsyncIterator[bytes]:
        async for chunk in self.source.read_blob(self.repo, self.digest, start=offset):
            self.on_bytes(len(chunk))
            yield chunk
