"""The `cache` destination: replication into an upstream's cache, pinned against eviction.

Writes land exactly where the pull-through cache reads (the shared BlobStore and that upstream's cache
RepoStore), so a replicated image is served as a cache hit, and with the upstream stopped as stale-if-
error content. Every blob and manifest written or confirmed is held twice: `cached` (what it would be had
a client pulled it) and `pinned` (what keeps it out of eviction). A pin belongs to a rule; a digest stays
pinned while any rule selects it, and when the last one lets go only `cached` remains: the content is
ordinary LRU cache from then on, never lost at once.

Pinned bytes count as `pinned`, not against `storage.max_size`'s cached bound (like local pushes): the
bound is for what the cache chose to keep, the pins are what the operator asked for.

Tags are written with `validated_at` = now, so the proxy treats them as freshly confirmed for `tag_ttl`.
Pins are recorded per rule on disk (`<dir>/<rule>/<alg>-<hex>`), so `mirror sync` and `mirror serve`
agree about them and a restart forgets nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable
from pathlib import Path

from aiohttp import web

from mirror.cache.index import CACHED, PINNED
from mirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    RegistryError,
    Unsupported,
)
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import Descriptor, parse_manifest
from mirror.oci.names import validate_tag
from mirror.proxy.registry import ProxyRegistry
from mirror.replication.rules import Destination
from mirror.state import CONFIG, ROUTER
from mirror.storage.interface import BlobInfo, Manifest, ManifestInfo, PutManifestResult, Registry, TagMoveCheck
from mirror.storage.repos import ManifestLink

log = logging.getLogger(__name__)

_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


LOCK_POLL_SECONDS = 0.005


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def pins_dir(storage_path: Path) -> Path:
    """Where a data directory keeps its replication pins (`mirror serve` and `mirror sync` share it)."""
    return storage_path / "replication" / "pins"


class PinStore:
    """Which digests each rule pins: one empty file per (rule, digest). Blocking methods; callers on the
    event loop go through a thread, changes that involve other rules under `locked()`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Exclusive across processes (`mirror sync` beside `mirror serve`) and tasks: "does another rule
        still pin it? then release" must not interleave with another rule adding its pin. Polled without
        blocking, so no worker thread ever waits for it (the holder needs threads for its own work)."""
        fd = await asyncio.to_thread(self._open_lock)
        try:
            while not await asyncio.to_thread(_try_lock, fd):
                await asyncio.sleep(LOCK_POLL_SECONDS)
            yield
        finally:
            await asyncio.to_thread(os.close, fd)  # closing the descriptor releases the lock

    def _open_lock(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        return os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def _rule_dir(self, rule: str) -> Path:
        if not _RULE_NAME.fullmatch(rule):
            raise ValueError(f"refusing to build a path from rule name {rule!r}")
        return self.directory / rule

    @staticmethod
    def _entry(digest: Digest) -> str:
        return f"{digest.algorithm}-{digest.hex}"

    def add_sync(self, rule: str, digest: Digest) -> None:
        path = self._rule_dir(rule) / self._entry(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    def pins_sync(self, rule: str) -> set[Digest]:
        found: set[Digest] = set()
        try:
            entries = os.listdir(self._rule_dir(rule))
        except FileNotFoundError:
            return found
        for entry in entries:
            algorithm, _, hex_part = entry.partition("-")
            with contextlib.suppress(RegistryError):
                found.add(Digest.parse(f"{algorithm}:{hex_part}"))
        return found

    def remove_sync(self, rule: str, digest: Digest) -> None:
        (self._rule_dir(rule) / self._entry(digest)).unlink(missing_ok=True)

    def pinned_elsewhere_sync(self, rule: str, digest: Digest) -> bool:
        entry = self._entry(digest)
        try:
            rules = os.listdir(self.directory)
        except FileNotFoundError:
            return False
        return any(other != rule and (self.directory / other / entry).exists() for other in rules)

    def rules_sync(self) -> list[str]:
        try:
            return sorted(entry for entry in os.listdir(self.directory) if _RULE_NAME.fullmatch(entry))
        except FileNotFoundError:
            return []


class CacheDestination(Registry):
    """One rule's writes into `proxy`'s cache. Reads answer from the cache alone (never the upstream):
    they are the copier asking what the destination already holds."""

    def __init__(self, proxy: ProxyRegistry, pins: PinStore, rule: str, *, repository: str | None = None) -> None:
        """`repository`: where the rule writes (what `unpin_except`'s bare digests are looked up in)."""
        self.proxy = proxy
        self.repository = repository
        # What each tag asked or written in this run names at its end: the images the rule selects now.
        self._tag_targets: dict[tuple[str, str], Digest] = {}
        self.blobs = proxy.blobs
        self.repos = proxy.repos
        self.cache = proxy.cache
        self.pins = pins
        self.rule = rule
        self.manifest_limit = proxy.manifest_limit
        pins._rule_dir(rule)  # an unusable rule name fails here, before anything is written

    # -- pins --------------------------------------------------------------------------------------
    async def _pin(self, digest: Digest, size: int) -> None:
        """Hold as cached and pinned, and record the pin under this rule (caller keeps it in use)."""
        async with self.pins.locked():
            await asyncio.to_thread(self.pins.add_sync, self.rule, digest)
            await self.cache.hold(digest, size, CACHED)
            await self.cache.hold(digest, size, PINNED)

    def _closure_sync(self, repo: str, top: Digest) -> dict[Digest, int]:
        """Blocking: every digest under the manifest `top` in the cache (children, config, layers, and the
        manifests whose subject it is), with sizes; what a rule that selects `top` keeps pinned."""
        found: dict[Digest, int] = {}
        pending = [top]
        while pending:
            digest = pending.pop()
            if digest in found:
                continue
            link = self.repos.manifest_link(repo, digest)
            path = self.blobs.path_for(digest)
            if link is None or not path.is_file():
                continue
            found[digest] = link.size
            try:
                parsed = parse_manifest(path.read_bytes(), link.media_type)
            except RegistryError:
                continue
            pending.extend(child.digest for child in parsed.manifests)
            pending.extend(referrer.digest for referrer in self.repos.referrers(repo, digest))
            for blob in parsed.blobs:
                stored = self.blobs.stat_sync(blob.digest)
                if stored is not None and self.repos.has_blob(repo, blob.digest):
                    found[blob.digest] = stored.size
        return found

    async def pin_image(self, repo: str, top: Digest) -> set[Digest]:
        """Pin `top` and everything under it for this rule; returns what was pinned."""
        closure = await asyncio.to_thread(self._closure_sync, repo, top)
        for digest, size in closure.items():
            with self.cache.in_use(digest):
                if await self.blobs.stat(digest) is not None:
                    await self._pin(digest, size)
        return set(closure)

    async def settle(self, selected: Collection[tuple[str, Digest]] = ()) -> int:
        """After a complete run: pin what the rule selects now and let go of what it pinned before and no
        longer selects. Selected are the `(repository, manifest digest)` pairs given, and what every tag the
        copier asked for or wrote in this run names at its end (so a platform-filtered index, an unchanged
        image pulled through before the rule existed, and cosign tags all count). Returns how many digests
        lost this rule's pin; content another rule still pins stays pinned."""
        keep: set[Digest] = set()
        for repo, top in {*selected, *((repo, digest) for (repo, _tag), digest in self._tag_targets.items())}:
            keep |= await self.pin_image(repo, top)
        return await self._release_all_but(keep)

    async def unpin_except(self, rule: str, digests: Iterable[Digest]) -> int:
        """The engine's word after a complete run: `digests` are the images `rule` selects now (source
        digests, in this destination's repository)."""
        if rule != self.rule:
            raise ValueError(f"this cache destination belongs to rule {self.rule}, not {rule}")
        repository = self.repository
        return await self.settle([(repository, digest) for digest in digests] if repository else [])

    async def _release_all_but(self, kept: set[Digest]) -> int:
        async with self.pins.locked():

            def release_list() -> list[Digest]:
                released: list[Digest] = []
                for digest in self.pins.pins_sync(self.rule) - kept:
                    self.pins.remove_sync(self.rule, digest)
                    if not self.pins.pinned_elsewhere_sync(self.rule, digest):
                        released.append(digest)
                return released

            released = await asyncio.to_thread(release_list)
            for digest in released:
                await self.cache.release(digest, PINNED)
        if released:
            log.info("rule %s no longer pins %d digests: they are ordinary cache content now", self.rule,
                     len(released))
        return len(released)

    # -- blobs -------------------------------------------------------------------------------------
    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        linked = await asyncio.to_thread(self.repos.has_blob, repo, digest)
        stored = await self.blobs.stat(digest) if linked else None
        if stored is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        with self.cache.in_use(digest):
            await self._pin(digest, stored.size)
        return BlobInfo(digest, stored.size)

    async def mount_blob(self, repo: str, source_repo: str, digest: Digest) -> bool:
        with self.cache.in_use(digest):
            if not await asyncio.to_thread(self.repos.has_blob, source_repo, digest):
                return False
            stored = await self.blobs.reuse(digest)
            if stored is None:
                return False
            await asyncio.to_thread(self.repos.link_blob, repo, digest)
            await self._pin(digest, stored.size)
        return True

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        # In use from the existence check until pinned: an evictable copy found here must not go first.
        with self.cache.in_use(digest):
            # Bytes the cache does not have: only now is the source read.
            stored = await self.blobs.put_stream(digest, chunks, size=size)
            await asyncio.to_thread(self.repos.link_blob, repo, digest)
            await self._pin(digest, stored.size)
        return BlobInfo(digest, stored.size)

    # -- manifests ---------------------------------------------------------------------------------
    async def _link(self, repo: str, reference: str) -> ManifestLink:
        link = await asyncio.to_thread(self.repos.resolve, repo, reference)
        if link is None:
            raise ManifestUnknown(detail={"reference": reference})
        return link

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        link = await self._link(repo, reference)
        if not looks_like_digest(reference):
            # The copier asks only for tags the rule selects. What such a tag names at the end of the run
            # is pinned by `settle` (an unchanged image, maybe pulled through before the rule existed, is
            # written nothing and would otherwise never be pinned); a tag the copier then moves is
            # recorded again by put_manifest.
            self._tag_targets[(repo, reference)] = link.digest
        return ManifestInfo(link.digest, link.media_type, link.size)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        link = await self._link(repo, reference)
        body = await self.blobs.read_bytes(link.digest)
        if body is None:
            raise ManifestUnknown(detail={"reference": reference})
        return Manifest(link.digest, link.media_type, body)

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        self._refuse_tag_move_check(on_tag_move)
        if len(body) > self.manifest_limit:
            raise ManifestTooLarge(f"manifest is larger than {self.manifest_limit} bytes")
        parsed = parse_manifest(body, content_type)
        tag: str | None = None
        if looks_like_digest(reference):
            expected = Digest.parse(reference)
            digest = Digest.of(body, expected.algorithm)
            if digest != expected:
                raise DigestInvalid(f"manifest digest {digest} does not match {expected}",
                                    detail={"expected": str(expected), "actual": str(digest)})
        else:
            tag = validate_tag(reference)
            digest = Digest.of(body)

        def missing() -> list[str]:
            absent = [str(d.digest) for d in parsed.blobs if not self.repos.has_blob(repo, d.digest)]
            absent += [str(d.digest) for d in parsed.manifests if self.repos.manifest_link(repo, d.digest) is None]
            return absent

        absent = await asyncio.to_thread(missing)
        if absent:
            raise ManifestBlobUnknown(f"manifest references {len(absent)} blob(s) not in {repo}",
                                      detail={"digests": absent[:20]})
        with self.cache.in_use(digest):
            await self.blobs.put_bytes(body, digest)

            def link() -> None:
                self.repos.link_manifest(repo, ManifestLink(digest, parsed.media_type, len(body)))
                if parsed.subject is not None:
                    self.repos.add_referrer(repo, parsed.subject.digest, Descriptor(
                        parsed.media_type, digest, len(body), artifact_type=parsed.artifact_type,
                        annotations=parsed.annotations or None,
                    ))
                if tag is not None:
                    self.repos.set_tag(repo, tag, digest)  # validated_at: now

            await asyncio.to_thread(link)
            await self._pin(digest, len(body))
        if tag is not None:
            self.proxy.forget_tag(repo, tag)
            self._tag_targets[(repo, tag)] = digest
            await self.pin_image(repo, digest)  # what was already there (skipped by the copier) too
        return PutManifestResult(digest, parsed.subject.digest if parsed.subject else None)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        """Prune a tag: the tag goes; its content loses this rule's pin at the next `settle`."""
        if looks_like_digest(reference):
            raise ManifestUnknown("the cache destination prunes tags, not manifests by digest")
        tag = validate_tag(reference)
        if not await asyncio.to_thread(self.repos.delete_tag, repo, tag):
            raise ManifestUnknown(detail={"reference": reference})
        self._tag_targets.pop((repo, tag), None)
        self.proxy.forget_tag(repo, tag)

    # -- discovery ---------------------------------------------------------------------------------
    async def list_tags(self, repo: str) -> list[str]:
        return await asyncio.to_thread(self.repos.tags, repo)

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return await asyncio.to_thread(self.repos.referrers, repo, subject)

    async def list_repositories(self) -> list[str]:
        return await asyncio.to_thread(self.repos.repositories)


def cache_destination(
    app: web.Application, upstream: str, rule: str, *, repository: str | None = None, pins: PinStore | None = None
) -> CacheDestination:
    """The `cache` destination of `rule` for content of `upstream` (its name in the config), in the data
    directory of `app` (a running server's, or `open_app`'s)."""
    target = app[ROUTER].upstreams.get(upstream)
    if target is None or not isinstance(target.registry, ProxyRegistry):
        raise ValueError(f"no upstream named {upstream!r} is configured")
    pins = pins or PinStore(pins_dir(app[CONFIG].storage.path))
    return CacheDestination(target.registry, pins, rule, repository=repository)


async def open_cache_destination(
    spec: Destination, app: web.Application, stack: contextlib.AsyncExitStack, *, rule: str
) -> CacheDestination:
    """destinations.open_destination's `cache` kind: the rule's source upstream's cache, its repository
    (the spec's, or the source's own name). Nothing to close."""
    found = next((r for r in app[CONFIG].replication if r.name == rule), None)
    if found is None or found.source.upstream is None:
        raise Unsupported(f"rule {rule}: the cache destination holds an upstream's content; its source is not one")
    return cache_destination(app, found.source.upstream, rule,
                             repository=spec.repository or found.source.repository)
