"""Air-gap bundles: `mirror export` writes images into an OCI layout, `mirror import` verifies one and
stores its images so a mirror with no upstream at all serves them.

A bundle is an OCI image layout (folder, `FILE.tar`, or `FILE.tar.001`, `.002`, ... with `FILE.tar.sha256`)
plus `mirror-bundle.json`: its id, the base bundle it is a delta of, every image (full name, digest, size)
and every blob it carries or relies on. Images are named in `index.json` with their full names
(`docker.io/library/alpine:3.20`), so skopeo, crane and oras read a full bundle as it is.

Names. Export names an image as the mirror's clients reach it by path prefix: `<upstream>/<repository>`
for an upstream's image (`docker.io/library/alpine`, `ghcr.io/owner/app`), the bare name for a local one
(`team/app`). Import routes that name through the importing mirror's router, the way a path-prefix client
would: with no upstream, `docker.io/library/alpine` becomes local `library/alpine` (what Docker's
registry-mirrors and containerd's `?ns=docker.io` ask for) and `ghcr.io/owner/app` stays local
`ghcr.io/owner/app` (what `?ns=ghcr.io` asks for) — see mirror/routing.py.

A delta (`--since PREVIOUS`) leaves out every blob and manifest the earlier bundle carried or relied on
and lists them as inherited; importing it needs them already imported, and says which are missing and
from which bundle before anything is written.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from mirror.config import Config
from mirror.errors import BlobUnknown, ManifestUnknown, NameUnknown, RegistryError
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import parse_manifest
from mirror.oci.names import is_valid_name, is_valid_tag
from mirror.replication.cache_dest import cache_destination
from mirror.replication.copier import Copier, CopyOptions, CopyStats, is_distributable
from mirror.replication.layout import (
    LayoutError,
    LayoutRegistry,
    archive_pieces,
    checksum_file,
)
from mirror.replication.planner import select_tags
from mirror.routing import Router, Target
from mirror.state import ROUTER
from mirror.storage.interface import (
    BlobInfo,
    Manifest,
    ManifestInfo,
    PutManifestResult,
    Registry,
    TagMoveCheck,
)

log = logging.getLogger(__name__)

BUNDLE_FILE = "mirror-bundle.json"
BUNDLE_SUFFIX = ".bundle.json"  # FILE.tar.bundle.json: the bundle manifest of an archive, beside it
BUNDLE_MEDIA_TYPE = "application/vnd.mirror.bundle.v1+json"
MAX_PROBLEMS_SHOWN = 20


class BundleError(Exception):
    """A bundle that cannot be exported or imported; the message says what and where, nothing changed."""


# -- the bundle manifest ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleImage:
    name: str  # full reference: docker.io/library/alpine:3.20
    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class BundleBlob:
    digest: Digest
    size: int
    image: str  # the repository (full name) it was first written for
    bundle: str  # id of the bundle that carries its bytes


@dataclass(slots=True)
class BundleManifest:
    id: str
    created: str
    base: dict[str, str] | None
    images: list[BundleImage] = field(default_factory=list)
    blobs: list[BundleBlob] = field(default_factory=list)

    def carried(self) -> list[BundleBlob]:
        return [blob for blob in self.blobs if blob.bundle == self.id]

    def inherited(self) -> dict[Digest, BundleBlob]:
        return {blob.digest: blob for blob in self.blobs if blob.bundle != self.id}

    def to_json(self) -> bytes:
        document = {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "id": self.id,
            "created": self.created,
            "base": self.base,
            "images": [
                {"name": i.name, "digest": str(i.digest), "mediaType": i.media_type, "size": i.size}
                for i in self.images
            ],
            "blobs": [
                {"digest": str(b.digest), "size": b.size, "image": b.image, "bundle": b.bundle} for b in self.blobs
            ],
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> BundleManifest:
        try:
            document = json.loads(data)
            if document.get("mediaType") != BUNDLE_MEDIA_TYPE:
                raise ValueError(f"mediaType is not {BUNDLE_MEDIA_TYPE}")
            return cls(
                id=str(document["id"]),
                created=str(document["created"]),
                base=document.get("base"),
                images=[
                    BundleImage(i["name"], Digest.parse(i["digest"]), i["mediaType"], int(i["size"]))
                    for i in document["images"]
                ],
                blobs=[
                    BundleBlob(Digest.parse(b["digest"]), int(b["size"]), b["image"], b["bundle"])
                    for b in document["blobs"]
                ],
            )
        except (ValueError, KeyError, TypeError, AttributeError, RegistryError) as exc:
            raise BundleError(f"{where}: {BUNDLE_FILE} is not a bundle manifest ({exc})") from exc


async def read_bundle_manifest(path: Path) -> BundleManifest:
    """The bundle manifest of a bundle (folder, archive, pieces) or of a saved `mirror-bundle.json`."""
    if path.is_file() and path.suffix == ".json":
        return BundleManifest.from_json(await asyncio.to_thread(path.read_bytes), path)
    layout = await _open_layout(path)
    try:
        data = await layout.read_file(BUNDLE_FILE)
    finally:
        await layout.close()
    if data is None:
        raise BundleError(f"{path}: no {BUNDLE_FILE}; --since needs a bundle written by `mirror export`")
    return BundleManifest.from_json(data, path)


async def _open_layout(path: Path, bare_tags_repository: str | None = None) -> LayoutRegistry:
    try:
        return await LayoutRegistry.open(path, bare_tags_repository=bare_tags_repository)
    except LayoutError as exc:
        raise BundleError(exc.message) from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from exc


# -- names ----------------------------------------------------------------------------------------------


def split_image(text: str) -> tuple[str, str]:
    """`alpine:3.20` -> (`alpine`, `3.20`); no tag means `latest`; digests are refused (bundles name
    images by tag, which is what index.json's ref.name holds)."""
    if "@" in text:
        raise BundleError(f"{text}: export images by tag (name:tag), not by digest")
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        name, tag = text, "latest"
    if not is_valid_name(name) or not is_valid_tag(tag):
        raise BundleError(f"{text}: not an image reference (name[:tag])")
    return name, tag


def full_name(target: Target) -> str:
    """The name a bundle gives an image: as the mirror's clients reach it by path prefix."""
    return f"{target.upstream}/{target.repo}" if target.upstream else target.repo


async def rule_images(config: Config, router: Router, name: str) -> tuple[list[str], frozenset[str] | None, bool]:
    """What a replication rule selects now, as image names for `export --rule`: its source's tags through
    its tag filter, with its platforms and referrers settings."""
    rules = config.replication
    rule = next((r for r in rules if r.name == name), None)
    if rule is None:
        known = ", ".join(r.name for r in rules) or "none are configured"
        raise BundleError(f"--rule {name}: no replication rule of that name ({known})")
    target = router.route(str(rule.source))
    try:
        tags = await target.registry.list_tags(target.repo)
    except RegistryError as exc:
        raise BundleError(f"--rule {name}: cannot list the tags of {rule.source}: {exc.message}") from exc
    selected = select_tags(tags, rule.tags)
    if not selected:
        raise BundleError(f"--rule {name}: the rule selects no tag of {rule.source} now")
    return [f"{rule.source}:{tag}" for tag in selected], rule.platforms, bool(rule.referrers)


# -- export ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportResult:
    bundle: BundleManifest
    files: list[Path]
    bytes_written: int
    blobs_written: int
    blobs_left_out: int


OnBytes = Callable[[int], None]


async def export_bundle(
    router: Router,
    images: Collection[str],
    to: Path,
    *,
    since: Path | None = None,
    split_bytes: int | None = None,
    referrers: bool = True,
    platforms: frozenset[str] | None = None,
    on_bytes: OnBytes | None = None,
) -> ExportResult:
    """Copy `images` (as the mirror's clients name them) from the router's registries into a new bundle."""
    if not images:
        raise BundleError("nothing to export: name at least one image")
    base = await read_bundle_manifest(since) if since is not None else None
    inherited = {blob.digest: blob for blob in base.blobs} if base else {}
    requested = [(text, *split_image(text)) for text in images]
    try:
        layout = await LayoutRegistry.create(
            to, split_bytes=split_bytes, inherited={d: b.size for d, b in inherited.items()}
        )
    except LayoutError as exc:
        raise BundleError(exc.message) from exc
    bundle = BundleManifest(
        id=uuid.uuid4().hex,
        created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        base={"id": base.id, "created": base.created} if base else None,
    )
    # An archive is written front to back: one blob at a time.
    concurrency = 1 if to.name.endswith(".tar") else 4
    copier = Copier(CopyOptions(platforms=platforms, referrers=referrers, blob_concurrency=concurrency),
                    on_bytes=on_bytes)
    total = CopyStats()
    try:
        for text, name, tag in requested:
            target = router.route(name)
            full = full_name(target)
            try:
                outcome = await copier.copy(target.registry, target.repo, tag, layout, full, dest_tag=tag)
            except RegistryError as exc:
                raise BundleError(f"{text}: {exc.message}") from exc
            total.add(outcome.stats)
            info = await layout.stat_manifest(full, tag)
            bundle.images.append(BundleImage(f"{full}:{tag}", info.digest, info.media_type, info.size))
        for digest, repo in layout.written_for.items():
            size = (await layout.stat_blob(repo, digest)).size
            bundle.blobs.append(BundleBlob(digest, size, repo, bundle.id))
        carried = {blob.digest for blob in bundle.blobs}
        # Everything the base had stays listed (as inherited), so a delta of this delta leaves it out too.
        bundle.blobs.extend(blob for digest, blob in inherited.items() if digest not in carried)
        layout.extra_files[BUNDLE_FILE] = bundle.to_json()
        files = await layout.close()
    except BaseException:
        await layout.abort()
        raise
    if to.name.endswith(".tar"):
        # Beside the archive too: the connected side keeps this small file for the next --since when the
        # media itself goes across the gap.
        beside = to.with_name(to.name + BUNDLE_SUFFIX)
        await asyncio.to_thread(beside.write_bytes, bundle.to_json())
        files.append(beside)
    return ExportResult(bundle, files, total.bytes_written, total.blobs_written, len(layout.inherited_used))


# -- import ---------------------------------------------------------------------------------------------

ResolveTarget = Callable[[str], Target]


def local_target(router: Router) -> ResolveTarget:
    """Where an imported image goes: its full name routed as a path-prefix client would send it. A name
    an upstream owns would land in that upstream's read-only cache, which import cannot write."""

    def resolve(name: str) -> Target:
        target = router.route(name)
        if target.upstream is not None:
            raise BundleError(
                f"{name} is routed to the upstream {target.upstream} on this mirror, whose cache import "
                "cannot write; import on a mirror without that upstream"
            )
        return target

    return resolve


# Imported content in an upstream's cache is pinned under this name, as a replication rule's would be.
IMPORT_PINS = "imported"


def app_target(app: web.Application) -> ResolveTarget:
    """Like `local_target`, but a name an upstream owns goes into that upstream's cache, pinned against
    eviction (replication's `cache` destination), where the pull-through path serves it even with the
    upstream unreachable."""
    router = app[ROUTER]
    caches: dict[str, Registry] = {}

    def resolve(name: str) -> Target:
        target = router.route(name)
        if target.upstream is None:
            return target
        cache = caches.get(target.upstream)
        if cache is None:
            cache = caches[target.upstream] = cache_destination(app, target.upstream, IMPORT_PINS)
        return Target(cache, target.repo, target.upstream)

    return resolve


@dataclass(frozen=True, slots=True)
class ImportedImage:
    name: str
    repository: str  # where it is served on this mirror
    digest: Digest


@dataclass(frozen=True, slots=True)
class ImportResult:
    path: Path
    bundle_id: str | None
    images: list[ImportedImage]
    bytes_written: int


@dataclass(frozen=True, slots=True)
class _Image:
    ref: str
    repo: str  # repository inside the layout
    tag: str
    digest: Digest
    size: int


async def import_bundles(
    router: Router,
    paths: Collection[Path],
    *,
    repository: str | None = None,
    on_bytes: OnBytes | None = None,
    resolve: ResolveTarget | None = None,
) -> list[ImportResult]:
    """Verify and import bundles in order (a base before its deltas, whatever order they were named in).
    Each bundle is verified whole before any of it is written; a bundle that fails changes nothing."""
    resolve = resolve or local_target(router)
    opened: list[tuple[Path, LayoutRegistry, BundleManifest | None]] = []
    try:
        for path in paths:
            await check_pieces(path)
            layout = await _open_layout(path, repository)
            opened.append((path, layout, None))
            data = await layout.read_file(BUNDLE_FILE)
            if data is not None:
                opened[-1] = (path, layout, BundleManifest.from_json(data, path))
        results = []
        for path, layout, bundle in _base_first(opened):
            results.append(await _import_one(path, layout, bundle, resolve, on_bytes))
        return results
    finally:
        for _, layout, _ in opened:
            await layout.close()


def _base_first(
    opened: list[tuple[Path, LayoutRegistry, BundleManifest | None]],
) -> list[tuple[Path, LayoutRegistry, BundleManifest | None]]:
    ids = {bundle.id: i for i, (_, _, bundle) in enumerate(opened) if bundle is not None}
    ordered: list[int] = []

    def visit(i: int, seen: frozenset[int]) -> None:
        if i in ordered or i in seen:
            return
        bundle = opened[i][2]
        if bundle is not None and bundle.base is not None and bundle.base.get("id") in ids:
            visit(ids[bundle.base["id"]], seen | {i})
        ordered.append(i)

    for i in range(len(opened)):
        visit(i, frozenset())
    return [opened[i] for i in ordered]


async def _import_one(
    path: Path,
    layout: LayoutRegistry,
    bundle: BundleManifest | None,
    resolve: ResolveTarget,
    on_bytes: OnBytes | None,
) -> ImportResult:
    images = _images_of(layout, path)
    inherited = bundle.inherited() if bundle else {}
    verifier = _Verifier(path, layout, bundle, inherited, resolve)
    await verifier.run(images)
    source = _BundleSource(layout, verifier.elsewhere)
    copier = Copier(CopyOptions(referrers=True), on_bytes=on_bytes)
    imported = []
    written = 0
    for image in images:
        target = resolve(image.repo)
        outcome = await copier.copy(source, image.repo, image.tag, target.registry, target.repo, dest_tag=image.tag)
        written += outcome.stats.bytes_written
        imported.append(ImportedImage(image.ref, full_name(target), outcome.dest_digest))
        log.info("imported %s as %s:%s (%s)", image.ref, target.repo, image.tag, outcome.dest_digest)
    return ImportResult(path, bundle.id if bundle else None, imported, written)


async def check_pieces(path: Path) -> None:
    """An archive's pieces against the checksum file export wrote beside them: a piece damaged or cut
    short on the removable medium is named before anything else is read."""
    if path.is_dir():
        return
    try:
        pieces = archive_pieces(path)
    except LayoutError as exc:
        raise BundleError(exc.message) from exc
    sums = checksum_file(pieces)
    if not sums.is_file():
        return  # an archive another tool wrote: the blob digests are the check
    expected: dict[str, str] = {}
    for line in (await asyncio.to_thread(sums.read_text)).splitlines():
        digest, _, name = line.partition("  ")
        expected[name.strip()] = digest.strip()
    problems = []
    present = {p.name for p in pieces}
    for name in sorted(set(expected) - present):
        problems.append(f"piece {name} is missing")
    for piece in pieces:
        if piece.name not in expected:
            continue
        actual = await asyncio.to_thread(_sha256_file, piece)
        if actual != expected[piece.name]:
            problems.append(f"piece {piece.name} is damaged (its checksum differs from {sums.name})")
    if problems:
        raise BundleError(f"{path}: refused, nothing was imported: " + "; ".join(problems))


def _images_of(layout: LayoutRegistry, path: Path) -> list[_Image]:
    images = []
    unnamed = []
    for entry in layout.entries:
        if entry.tag is None or entry.repo is None:
            if entry.ref is not None:
                unnamed.append(entry.ref)
            continue
        if not is_valid_name(entry.repo) or not is_valid_tag(entry.tag):
            raise BundleError(f"{path}: {entry.ref!r} in index.json is not an image name")
        size = entry.descriptor.get("size")
        images.append(_Image(f"{entry.repo}:{entry.tag}", entry.repo, entry.tag, entry.digest,
                             size if isinstance(size, int) else -1))
    if unnamed:
        raise BundleError(
            f"{path}: images named only by tag ({', '.join(sorted(unnamed)[:5])}): "
            "pass --repository NAME to say which repository they belong to"
        )
    if not images:
        raise BundleError(f"{path}: the bundle names no images (index.json has no ref.name annotations)")
    return images


class _Verifier:
    """Checks a whole bundle before any of it is written: every carried blob hashes to its name and
    has the size its descriptors give; every manifest and blob an image needs is either carried or,
    for a delta, already on this mirror."""

    def __init__(
        self,
        path: Path,
        layout: LayoutRegistry,
        bundle: BundleManifest | None,
        inherited: dict[Digest, BundleBlob],
        resolve: ResolveTarget,
    ) -> None:
        self.path = path
        self.layout = layout
        self.bundle = bundle
        self.inherited = inherited
        self.resolve = resolve
        self.carried: dict[Digest, int] = {}
        self.problems: list[str] = []
        self.missing: list[str] = []
        self.elsewhere: list[Target] = []  # where on this mirror inherited content was found
        self._walked: set[Digest] = set()

    async def run(self, images: list[_Image]) -> None:
        self.carried = dict(await asyncio.to_thread(self.layout.blob_names))
        for digest, size in sorted(self.carried.items(), key=lambda item: str(item[0])):
            actual, read = await self.layout.hash_blob(digest)
            if actual != digest.hex or read != size:
                self.problems.append(f"{digest} is corrupt (its bytes hash to {digest.algorithm}:{actual})")
        for image in images:
            target = self.resolve(image.repo)
            await self._manifest(image.digest, image.size, image.ref, image.repo, target)
        for entry in self.layout.entries:
            if entry.tag is None:  # an untagged referrer: checked like an image of no repository
                declared = entry.descriptor.get("size")
                await self._manifest(entry.digest, declared if isinstance(declared, int) else -1,
                                     f"referrer {entry.digest}", "", None)
        if self.missing:
            base = self.bundle.base if self.bundle else None
            needs = f" it is a delta of bundle {base['id']} ({base['created']}); import that first" if base else ""
            raise BundleError(
                f"{self.path}: {len(self.missing)} manifest(s)/blob(s) are neither in the bundle nor on this "
                f"mirror;{needs}. Missing: " + "; ".join(self.missing[:MAX_PROBLEMS_SHOWN])
                + (" ..." if len(self.missing) > MAX_PROBLEMS_SHOWN else "")
            )
        if self.problems:
            raise BundleError(
                f"{self.path}: refused, nothing was imported: " + "; ".join(self.problems[:MAX_PROBLEMS_SHOWN])
                + (" ..." if len(self.problems) > MAX_PROBLEMS_SHOWN else "")
            )

    def _size_ok(self, digest: Digest, size: int, what: str) -> None:
        if size >= 0 and self.carried.get(digest) not in (None, size):
            self.problems.append(f"{what} {digest} is {self.carried[digest]} bytes, its descriptor says {size}")

    async def _manifest(self, digest: Digest, size: int, what: str, repo: str, target: Target | None) -> None:
        if digest in self._walked:
            return
        self._walked.add(digest)
        if digest not in self.carried:
            await self._inherited(digest, f"manifest of {what}", target, manifest=True)
            return
        self._size_ok(digest, size, "manifest")
        try:
            manifest = await self.layout.get_manifest(repo or "_", str(digest))
            parsed = parse_manifest(manifest.body, manifest.media_type)
        except RegistryError as exc:
            self.problems.append(f"manifest {digest} of {what}: {exc.message}")
            return
        for child in parsed.manifests:
            await self._manifest(child.digest, child.size, what, repo, target)
        for blob in parsed.blobs:
            if not is_distributable(blob):
                continue
            if blob.digest in self.carried:
                self._size_ok(blob.digest, blob.size, "blob")
            else:
                await self._inherited(blob.digest, f"blob of {what}", target, manifest=False)

    async def _inherited(self, digest: Digest, what: str, target: Target | None, *, manifest: bool) -> None:
        """Content the bundle relies on: present on this mirror (under the image's own repository, or the
        one the base bundle wrote it for), or missing."""
        record = self.inherited.get(digest)
        candidates = [t for t in (target, self._target_of(record)) if t is not None]
        for candidate in candidates:
            if await _has(candidate, digest, manifest=manifest):
                if candidate not in self.elsewhere:
                    self.elsewhere.append(candidate)
                return
        carrier = f", carried by bundle {record.bundle}" if record else ""
        self.missing.append(f"{digest} ({what}{carrier})")

    def _target_of(self, record: BundleBlob | None) -> Target | None:
        if record is None:
            return None
        try:
            return self.resolve(record.image)
        except BundleError:
            return None


async def _has(target: Target, digest: Digest, *, manifest: bool) -> bool:
    try:
        if manifest:
            return (await target.registry.stat_manifest(target.repo, str(digest))).digest == digest
        await target.registry.stat_blob(target.repo, digest)
        return True
    except (BlobUnknown, ManifestUnknown, NameUnknown):
        return False


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


class _BundleSource(Registry):
    """The bundle as the copier's source. What a delta relies on is read from this mirror, from the
    repositories where the verifier found inherited content (a blob already stored is then linked, not
    copied: the local store reuses it)."""

    def __init__(self, layout: LayoutRegistry, elsewhere: list[Target]) -> None:
        self.layout = layout
        self.elsewhere = elsewhere

    def _carried(self, digest: Digest) -> bool:
        return self.layout.carries(digest)

    async def _holder(self, digest: Digest, *, manifest: bool) -> Target:
        for target in self.elsewhere:
            if await _has(target, digest, manifest=manifest):
                return target
        if manifest:
            raise ManifestUnknown(detail={"digest": str(digest)})
        raise BlobUnknown(detail={"digest": str(digest)})

    def _digest(self, repo: str, reference: str) -> Digest | None:
        return Digest.parse(reference) if looks_like_digest(reference) else self.layout.tag_digest(repo, reference)

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        digest = self._digest(repo, reference)
        if digest is not None and not await asyncio.to_thread(self._carried, digest):
            holder = await self._holder(digest, manifest=True)
            return await holder.registry.stat_manifest(holder.repo, str(digest))
        return await self.layout.stat_manifest(repo, reference)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        digest = self._digest(repo, reference)
        if digest is not None and not await asyncio.to_thread(self._carried, digest):
            holder = await self._holder(digest, manifest=True)
            return await holder.registry.get_manifest(holder.repo, str(digest))
        return await self.layout.get_manifest(repo, reference)

    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        if not await asyncio.to_thread(self._carried, digest):
            holder = await self._holder(digest, manifest=False)
            return await holder.registry.stat_blob(holder.repo, digest)
        return await self.layout.stat_blob(repo, digest)

    def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        return self._read(repo, digest, start)

    async def _read(self, repo: str, digest: Digest, start: int) -> AsyncIterator[bytes]:
        if await asyncio.to_thread(self._carried, digest):
            stream = self.layout.read_blob(repo, digest, start=start)
        else:
            holder = await self._holder(digest, manifest=False)
            stream = holder.registry.read_blob(holder.repo, digest, start=start)
        async for chunk in stream:
            yield chunk

    async def list_tags(self, repo: str) -> list[str]:
        return await self.layout.list_tags(repo)

    async def referrers(self, repo: str, subject: Digest) -> list[Any]:
        return await self.layout.referrers(repo, subject)

    async def list_repositories(self) -> list[str]:
        return await self.layout.list_repositories()

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        raise self._unsupported()

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        raise self._unsupported()
