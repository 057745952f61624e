"""Any registry over HTTP, read and write, as a `Registry`: the copier's source and destination on the wire.

Built on `UpstreamClient`, so a remote destination gets the same token and Basic auth, redirect policy,
retries and rate-limit bookkeeping as the pull-through cache; a rule whose source is a configured upstream
uses that upstream's own client (one token cache, one view of its rate limit).

What the copier relies on:
- reads are cheap first: `stat_manifest` and `stat_blob` are HEADs; every GET of a manifest or blob awaits
  `before_get(kind)` first, so a rate-limit gate can hold it back without holding back the HEADs;
- blobs stream (`read_blob`, a Range GET for `start`); uploads never hold more than one chunk in memory:
  a blob up to `chunk_bytes` goes as POST + PUT, a larger one as PATCHes of `chunk_bytes`;
- a chunked upload is resumable: its Location and offset are written to an `UploadJournal` after every
  chunk, and the next attempt (after a crash or kill) asks the registry how much it holds and sends only
  the rest. A registry that no longer knows the upload (or refuses a stale one, as distribution 2.8 does
  when a chunk was cut halfway) is answered with a fresh upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode, urljoin, urlsplit

import aiohttp

from mirror.config import UpstreamConfig
from mirror.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    Unsupported,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import ACCEPT_ALL_MANIFESTS, OCI_INDEX, Descriptor, parse_manifest
from mirror.storage.files import atomic_write
from mirror.storage.interface import (
    BlobBody,
    BlobInfo,
    Manifest,
    ManifestInfo,
    PutManifestResult,
    Registry,
    ReopenableBytes,
    TagMoveCheck,
)
from mirror.upstream.client import KEEPALIVE_SECONDS, USER_AGENT, UpstreamClient

if TYPE_CHECKING:
    from mirror.replication.rules import Destination

log = logging.getLogger(__name__)

BeforeGet = Callable[[str], Awaitable[None]]

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_MANIFEST_LIMIT = 4 << 20
READ_PIECE_BYTES = 1 << 20
TAG_PAGE_SIZE = 1000
REFERRERS_API_RECHECK = 3600.0  # seconds a registry's answer "no referrers API" is believed
HEAD_CONCURRENCY = 16  # HEADs in flight at once when one call needs many
MAX_TAG_PAGES = 1000  # a million tags: past that a Link loop is more likely than a real repository
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_RANGE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)$")


# -- the journal of interrupted uploads ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UploadState:
    location: str  # path (with query) of the upload at the registry, as its last answer gave it
    offset: int  # bytes the registry acknowledged


class UploadJournal:
    """Where a chunked upload is recorded while it runs: one small JSON file per (registry, repository,
    digest) in a directory the caller owns (a rule's state directory), written atomically after every
    acknowledged chunk, removed when the blob is complete."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, registry: str, repo: str, digest: Digest) -> Path:
        key = hashlib.sha256(f"{registry}\n{repo}\n{digest}".encode()).hexdigest()
        return self.directory / f"{key}.json"

    async def load(self, registry: str, repo: str, digest: Digest) -> UploadState | None:
        def read() -> UploadState | None:
            try:
                data = json.loads(self._path(registry, repo, digest).read_text())
                return UploadState(str(data["location"]), int(data["offset"]))
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                return None  # absent, or torn by a crash mid-write (atomic_write makes that unlikely)

        return await asyncio.to_thread(read)

    async def save(self, registry: str, repo: str, digest: Digest, state: UploadState) -> None:
        body = json.dumps({"registry": registry, "repository": repo, "digest": str(digest),
                           "location": state.location, "offset": state.offset}).encode()
        await asyncio.to_thread(atomic_write, self._path(registry, repo, digest), body)

    async def forget(self, registry: str, repo: str, digest: Digest) -> None:
        await asyncio.to_thread(self._path(registry, repo, digest).unlink, True)


# -- the registry ----------------------------------------------------------------------------------
class RemoteRegistry(Registry):
    def __init__(
        self,
        client: UpstreamClient,
        *,
        before_get: BeforeGet | None = None,
        journal: UploadJournal | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        manifest_limit: int = DEFAULT_MANIFEST_LIMIT,
        push: bool = False,
        page_size: int = TAG_PAGE_SIZE,
    ) -> None:
        """`push`: ask for `pull,push` tokens from the first request on (a destination), so one token serves
        the HEADs and the uploads that follow them."""
        self.client = client
        self.name = client.name
        self.before_get = before_get
        self.journal = journal
        self.chunk_bytes = chunk_bytes
        self.manifest_limit = manifest_limit
        self.push = push
        self.page_size = page_size
        self.read_only_message = f"{client.name} is used read-only here"
        self._listed: dict[str, set[str]] = {}  # repo -> the tags list_tags found (this instance's run)
        self._referrer_locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _scope(self, repo: str) -> str:
        return f"repository:{repo}:pull,push" if self.push else self.client.scope_for(repo)

    async def _gate(self, kind: str) -> None:
        if self.before_get is not None:
            await self.before_get(kind)

    async def _request(
        self,
        method: str,
        path: str,
        repo: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        scope: str | None = None,
    ) -> aiohttp.ClientResponse:
        return await self.client.open(method, path, scope=scope or self._scope(repo), headers=headers, data=data)

    def _path_of(self, location: str, request_path: str) -> str:
        """The path (and query) of an upload Location relative to the registry's URL. A Location on another
        host is refused: the upload's chunks would carry our credentials there."""
        base = self.client.config.url.rstrip("/")
        absolute = urljoin(f"{base}{request_path}", location)
        if not absolute.startswith(base + "/"):
            raise UpstreamInvalid(f"{self.name} sent an upload Location on another host: {location[:200]!r}")
        return absolute[len(base):]

    # -- manifests ---------------------------------------------------------------------------------
    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        response = await self._request(
            "HEAD", f"/v2/{repo}/manifests/{reference}", repo, headers={"Accept": ACCEPT_ALL_MANIFESTS}
        )
        response.release()
        if response.status == 404:
            raise ManifestUnknown(detail={"reference": reference})
        _check_auth(response, self.name, f"{repo}:{reference}")
        if response.status != 200:
            raise _unexpected(response, self.name, "HEAD manifest")
        header = response.headers.get("Docker-Content-Digest")
        media_type = _media_type(response.headers.get("Content-Type"))
        size = response.content_length or 0
        if header:
            try:
                # The digest is what the copier compares; a HEAD without Content-Type still says it.
                return ManifestInfo(Digest.parse(header), media_type or "", size)
            except RegistryError:
                pass
        # A registry whose HEAD names no digest: the only way to know is the manifest itself (a GET, so
        # through the before_get gate like any other).
        return (await self.get_manifest(repo, reference)).info

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        await self._gate("manifest")
        response = await self._request(
            "GET", f"/v2/{repo}/manifests/{reference}", repo, headers={"Accept": ACCEPT_ALL_MANIFESTS}
        )
        try:
            if response.status == 404:
                raise ManifestUnknown(detail={"reference": reference})
            _check_auth(response, self.name, f"{repo}:{reference}")
            if response.status != 200:
                raise _unexpected(response, self.name, "GET manifest")
            body = await _read_capped(response, self.manifest_limit, self.name)
            content_type = response.headers.get("Content-Type")
            header = response.headers.get("Docker-Content-Digest")
        finally:
            response.release()
        expected = Digest.parse(reference) if looks_like_digest(reference) else None
        digest = Digest.of(body, expected.algorithm if expected else "sha256")
        if expected is not None and digest != expected:
            raise UpstreamInvalid(f"{self.name} returned a manifest that does not match {expected}")
        if expected is None and header and header.startswith("sha256:") and header != str(digest):
            raise UpstreamInvalid(f"{self.name}: manifest {repo}:{reference} does not match its Docker-Content-Digest")
        try:
            parsed = parse_manifest(body, _media_type(content_type))
        except RegistryError as exc:
            raise UpstreamInvalid(f"{self.name} returned an invalid manifest: {exc.message}") from exc
        return Manifest(digest, parsed.media_type, body)

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        self._refuse_tag_move_check(on_tag_move)
        parsed = parse_manifest(body, content_type)
        response = await self._request(
            "PUT", f"/v2/{repo}/manifests/{reference}", repo,
            headers={"Content-Type": parsed.media_type}, data=body,
        )
        try:
            if response.status not in (200, 201, 202):
                raise await _refusal(response, self.name, f"PUT manifest {repo}:{reference}")
            # OCI 1.1: a registry that indexes referrers itself says so by answering with OCI-Subject.
            indexed = "OCI-Subject" in response.headers
        finally:
            response.release()
        digest = Digest.of(body)
        if parsed.subject is not None and not indexed:
            referrer = Descriptor(parsed.media_type, digest, len(body), parsed.artifact_type,
                                  parsed.annotations or None)
            await self._add_to_referrers_tag(repo, parsed.subject.digest, referrer)
        return PutManifestResult(digest, parsed.subject.digest if parsed.subject else None)

    async def _add_to_referrers_tag(self, repo: str, subject: Digest, referrer: Descriptor) -> None:
        """The referrers tag schema (OCI distribution 1.1's fallback for registries without the referrers
        API, distribution 2.8 among them): the tag `sha256-<hex>` of the subject holds an index listing its
        referrers, which skopeo, oras and cosign read there. One update of a subject's tag at a time in
        this process; another writer between our read and our PUT could lose an entry (the spec's own
        race: registries without the API cannot do better)."""
        tag = referrers_tag(subject)
        lock = self._referrer_locks.setdefault((repo, tag), asyncio.Lock())
        async with lock:
            # Read fresh, never from a tag list remembered earlier: an entry another writer added since
            # would be lost.
            entries = [entry for entry in await self._referrers_from_tag(repo, subject, fresh=True)
                       if entry.digest != referrer.digest]
            entries.append(referrer)
            index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                "manifests": [entry.to_json() for entry in entries]},
                               separators=(",", ":")).encode()
            response = await self._request("PUT", f"/v2/{repo}/manifests/{tag}", repo,
                                           headers={"Content-Type": OCI_INDEX}, data=index)
            try:
                if response.status not in (200, 201, 202):
                    raise await _refusal(response, self.name, f"PUT the referrers tag {repo}:{tag}")
            finally:
                response.release()
        self._listed.get(repo, set()).add(tag)
        log.info("%s has no referrers API: %s listed under the tag %s:%s (%d referrers)", self.name,
                 referrer.digest, repo, tag, len(entries))

    async def delete_manifest(self, repo: str, reference: str) -> None:
        response = await self._request("DELETE", f"/v2/{repo}/manifests/{reference}", repo)
        try:
            if response.status == 404:
                raise ManifestUnknown(detail={"reference": reference})
            if response.status not in (200, 202, 204):
                refusal = await _refusal(response, self.name, f"DELETE manifest {repo}:{reference}")
                if looks_like_digest(reference) or response.status not in (400, 405):
                    raise refusal
            else:
                return
        finally:
            response.release()
        await self._untag(repo, reference, refusal)

    async def _untag(self, repo: str, tag: str, refusal: RegistryError) -> None:
        """A registry that deletes manifests only by digest (distribution 2.8 refuses a tag with
        DIGEST_INVALID): delete the tag's manifest by digest, which removes the tag — but only when no other
        tag names that manifest, since it would go with it."""
        digest = (await self.stat_manifest(repo, tag)).digest
        others = [other for other in await self.list_tags(repo) if other != tag]
        slots = asyncio.Semaphore(HEAD_CONCURRENCY)

        async def names_it(other: str) -> bool:
            async with slots:
                try:
                    return (await self.stat_manifest(repo, other)).digest == digest
                except ManifestUnknown:
                    return False

        sharing = [other for other, same in zip(others, await asyncio.gather(*map(names_it, others)), strict=True)
                   if same]
        if sharing:
            raise Unsupported(f"{self.name} deletes manifests only by digest, and {repo}:{tag}'s manifest is also "
                              f"tagged {', '.join(sharing[:5])}: the tag was left") from refusal
        await self.delete_manifest(repo, str(digest))

    # -- discovery ---------------------------------------------------------------------------------
    async def list_tags(self, repo: str) -> list[str]:
        tags: list[str] = []
        path: str | None = f"/v2/{repo}/tags/list?n={self.page_size}"
        pages = 0
        while path is not None:
            pages += 1
            if pages > MAX_TAG_PAGES:
                raise UpstreamInvalid(f"{self.name}: more than {MAX_TAG_PAGES} pages of tags for {repo}")
            data, link = await self._get_json(repo, path)
            found = data.get("tags") if isinstance(data, dict) else None
            tags.extend(tag for tag in found or [] if isinstance(tag, str))
            path = self._next_page(link, path)
        self._listed[repo] = set(tags)
        return sorted(set(tags))

    def _next_page(self, link: str | None, current: str) -> str | None:
        match = _NEXT_LINK.search(link or "")
        if not match:
            return None
        return self._path_of(match.group(1), current)

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        """The OCI 1.1 referrers API, or, from a registry without it (distribution 2.8 answers 404), the
        referrers tag `sha256-<hex>` (OCI's fallback). A 404 teaches the client (shared by every run from
        that registry) that it has no API: for the next REFERRERS_API_RECHECK seconds only the tag is asked,
        and not even that when the tag list this instance read for `repo` does not have it — a referrer
        pushed there since is still found, since its pusher must update that tag. (cosign's
        `.sig/.att/.sbom` tags are the copier's business.)"""
        known = self.client.referrers_api
        if known is None or known[0] or time.monotonic() - known[1] > REFERRERS_API_RECHECK:
            response = await self._request("GET", f"/v2/{repo}/referrers/{subject}", repo)
            try:
                if response.status not in (400, 404, 405):
                    _check_auth(response, self.name, f"{repo} referrers")
                    if response.status != 200:
                        raise _unexpected(response, self.name, "GET referrers")
                    self.client.referrers_api = (True, time.monotonic())
                    return _descriptors(await _read_capped(response, self.manifest_limit, self.name))
            finally:
                response.release()
            # A registry with the API answers 200 (an empty list) for any subject: this one has none.
            self.client.referrers_api = (False, time.monotonic())
        return await self._referrers_from_tag(repo, subject)

    async def _referrers_from_tag(self, repo: str, subject: Digest, *, fresh: bool = False) -> list[Descriptor]:
        tag = referrers_tag(subject)
        listed = None if fresh else self._listed.get(repo)
        if listed is not None and tag not in listed:
            return []  # not in the tag list read in this run: no GET at all
        try:
            index = await self.get_manifest(repo, tag)
        except ManifestUnknown:
            return []
        if index.media_type != OCI_INDEX:
            return []  # a tag of that shape that is not a referrers index: nothing to list
        return _descriptors(index.body)

    async def list_repositories(self) -> list[str]:
        names: list[str] = []
        path: str | None = f"/v2/_catalog?n={self.page_size}"
        pages = 0
        while path is not None and pages < MAX_TAG_PAGES:
            pages += 1
            data, link = await self._get_json("", path, scope="registry:catalog:*")
            found = data.get("repositories") if isinstance(data, dict) else None
            names.extend(name for name in found or [] if isinstance(name, str))
            path = self._next_page(link, path)
        return sorted(set(names))

    async def _get_json(self, repo: str, path: str, *, scope: str | None = None) -> tuple[object, str | None]:
        response = await self._request("GET", path, repo, scope=scope)
        try:
            if response.status == 404:
                raise NameUnknown(detail={"name": repo})
            _check_auth(response, self.name, repo)
            if response.status != 200:
                raise _unexpected(response, self.name, f"GET {path.split('?')[0]}")
            body = await _read_capped(response, 16 << 20, self.name)
            link = response.headers.get("Link")
        finally:
            response.release()
        try:
            return json.loads(body), link
        except ValueError as exc:
            raise UpstreamInvalid(f"{self.name} returned invalid JSON for {path.split('?')[0]}") from exc

    # -- blobs -------------------------------------------------------------------------------------
    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        response = await self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        response.release()
        if response.status == 404:
            raise BlobUnknown(detail={"digest": str(digest)})
        _check_auth(response, self.name, f"{repo}@{digest}")
        if response.status != 200:
            raise _unexpected(response, self.name, "HEAD blob")
        return BlobInfo(digest, response.content_length if response.content_length is not None else -1)

    async def open_blob(self, repo: str, digest: Digest) -> BlobBody:
        raise Unsupported(f"{self.name}: blobs of a remote registry are read as streams (read_blob)")

    def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        return self._stream_blob(repo, digest, start)

    async def _stream_blob(self, repo: str, digest: Digest, start: int) -> AsyncIterator[bytes]:
        await self._gate("blob")
        headers = {"Range": f"bytes={start}-"} if start else None
        response = await self._request("GET", f"/v2/{repo}/blobs/{digest}", repo, headers=headers)
        try:
            if response.status == 404:
                raise BlobUnknown(detail={"digest": str(digest)})
            _check_auth(response, self.name, f"{repo}@{digest}")
            if response.status not in (200, 206):
                raise _unexpected(response, self.name, "GET blob")
            # A registry that ignores Range sends the whole blob: skip what the caller already has.
            skip = start if response.status == 200 else 0
            try:
                async for piece in response.content.iter_chunked(READ_PIECE_BYTES):
                    if skip:
                        if len(piece) <= skip:
                            skip -= len(piece)
                            continue
                        piece, skip = piece[skip:], 0
                    yield piece
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(f"{self.name}: blob {digest} was cut short: {exc}") from exc
        finally:
            response.release()

    async def mount_blob(self, repo: str, source_repo: str, digest: Digest) -> bool:
        query = urlencode({"mount": str(digest), "from": source_repo})
        scope = f"{self._scope(repo)} repository:{source_repo}:pull"
        response = await self._request("POST", f"/v2/{repo}/blobs/uploads/?{query}", repo, scope=scope)
        try:
            if response.status == 201:
                return True
            if response.status == 202 and "Location" in response.headers:
                # The registry would not mount (it does not have it there, or we may not read it there) and
                # opened an upload instead: close it, the copier sends the blob the ordinary way.
                location = self._path_of(response.headers["Location"], f"/v2/{repo}/blobs/uploads/")
                with contextlib.suppress(RegistryError):
                    cancel = await self._request("DELETE", location, repo)
                    cancel.release()
                return False
            if response.status in (401, 403, 404, 405):
                return False
            raise await _refusal(response, self.name, f"mount {digest} into {repo}")
        finally:
            response.release()

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        state = await self._resumable_upload(repo, digest)
        if state is None and size is not None and 0 <= size <= self.chunk_bytes:
            return await self._put_whole(repo, digest, chunks, size)
        offset = state.offset if state is not None else 0
        if state is None:
            state = UploadState(await self._start_upload(repo), 0)
            await self._journal_save(repo, digest, state)
        else:
            log.info("%s: resuming upload of %s into %s at byte %d", self.name, digest, repo, offset)
        try:
            body = _from_offset(chunks, offset)
            buffer = bytearray()
            async for piece in body:
                buffer += piece
                while len(buffer) >= self.chunk_bytes:
                    state = await self._patch(repo, digest, state, bytes(buffer[: self.chunk_bytes]))
                    del buffer[: self.chunk_bytes]
            # The last chunk travels with the PUT that closes the upload: one request fewer per blob.
            final = await self._finish(repo, digest, state, bytes(buffer))
        except (DigestInvalid, BlobUploadInvalid, UpstreamInvalid, Unsupported):
            # Refused, not interrupted: resuming this upload would be refused again, run after run.
            await self._journal_forget(repo, digest)
            raise
        await self._journal_forget(repo, digest)
        if size is not None and final != size:
            raise UpstreamInvalid(f"{self.name}: blob {digest} arrived as {final} bytes, expected {size}")
        return BlobInfo(digest, final)

    async def _put_whole(self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], size: int) -> BlobInfo:
        """A small blob: POST for the upload, one PUT with the bytes and the digest."""
        buffer = bytearray()
        async for piece in chunks:
            buffer += piece
            if len(buffer) > self.chunk_bytes:
                raise UpstreamInvalid(f"blob {digest} is larger than the {size} bytes its descriptor says")
        location = await self._start_upload(repo)
        await self._finish(repo, digest, UploadState(location, 0), bytes(buffer))
        return BlobInfo(digest, len(buffer))

    async def _start_upload(self, repo: str) -> str:
        path = f"/v2/{repo}/blobs/uploads/"
        response = await self._request("POST", path, repo)
        try:
            if response.status != 202 or "Location" not in response.headers:
                raise await _refusal(response, self.name, f"start an upload in {repo}")
            return self._path_of(response.headers["Location"], path)
        finally:
            response.release()

    async def _patch(self, repo: str, digest: Digest, state: UploadState, chunk: bytes) -> UploadState:
        end = state.offset + len(chunk) - 1
        response = await self._request(
            "PATCH", state.location, repo, data=chunk,
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{state.offset}-{end}",
                     "Content-Length": str(len(chunk))},
        )
        try:
            if response.status != 202 or "Location" not in response.headers:
                raise await _refusal(response, self.name, f"upload a chunk of {digest} to {repo}")
            location = self._path_of(response.headers["Location"], state.location)
        finally:
            response.release()
        state = UploadState(location, end + 1)
        await self._journal_save(repo, digest, state)
        return state

    async def _finish(self, repo: str, digest: Digest, state: UploadState, last: bytes) -> int:
        separator = "&" if "?" in state.location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(last))}
        if last:
            headers["Content-Range"] = f"{state.offset}-{state.offset + len(last) - 1}"
        response = await self._request(
            "PUT", f"{state.location}{separator}digest={quote(str(digest))}", repo, data=last, headers=headers
        )
        try:
            if response.status not in (201, 204):
                raise await _refusal(response, self.name, f"finish the upload of {digest} to {repo}")
        finally:
            response.release()
        return state.offset + len(last)

    async def _resumable_upload(self, repo: str, digest: Digest) -> UploadState | None:
        """The upload an earlier attempt left, with the offset the registry says it holds; None when
        there is none, or the registry no longer has it (then a fresh upload starts)."""
        if self.journal is None:
            return None
        state = await self.journal.load(self.client.config.url, repo, digest)
        if state is None:
            return None
        try:
            response = await self._request("GET", state.location, repo)
        except (UpstreamUnavailable, TooManyRequests):
            raise  # the registry is away for now: the upload may still be there when it is back
        except RegistryError:
            await self._journal_forget(repo, digest)
            return None
        response.release()
        match = _RANGE.match(response.headers.get("Range", "").strip())
        if response.status != 204 or "Location" not in response.headers:
            log.info("%s: the interrupted upload of %s is gone (HTTP %d); starting again", self.name, digest,
                     response.status)
            await self._journal_forget(repo, digest)
            return None
        offset = int(match.group(2)) + 1 if match else 0
        if offset == 1 and state.offset == 0:
            offset = 0  # distribution says `0-0` for an upload holding nothing yet (and for one byte)
        return UploadState(self._path_of(response.headers["Location"], state.location), offset)

    async def _journal_save(self, repo: str, digest: Digest, state: UploadState) -> None:
        if self.journal is not None:
            await self.journal.save(self.client.config.url, repo, digest, state)

    async def _journal_forget(self, repo: str, digest: Digest) -> None:
        if self.journal is not None:
            await self.journal.forget(self.client.config.url, repo, digest)

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        response = await self._request("DELETE", f"/v2/{repo}/blobs/{digest}", repo)
        try:
            if response.status == 404:
                raise BlobUnknown(detail={"digest": str(digest)})
            if response.status not in (200, 202, 204):
                raise await _refusal(response, self.name, f"DELETE blob {digest}")
        finally:
            response.release()


def referrers_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for `subject`: `<alg>-<hex>` (the hex cut at 64 characters)."""
    return f"{subject.algorithm}-{subject.hex[:64]}"


def _descriptors(body: bytes) -> list[Descriptor]:
    """The `manifests` of a referrers list or index; malformed entries are left out."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    found: list[Descriptor] = []
    for raw in data.get("manifests", []) if isinstance(data, dict) else []:
        try:
            found.append(Descriptor(raw["mediaType"], Digest.parse(raw["digest"]), int(raw["size"]),
                                    raw.get("artifactType"), raw.get("annotations")))
        except (KeyError, TypeError, ValueError, RegistryError):
            continue
    return found


def _from_offset(chunks: AsyncIterable[bytes], offset: int) -> AsyncIterator[bytes]:
    """The bytes from `offset` on: read from there when the source can, else skipped over."""
    if offset and isinstance(chunks, ReopenableBytes):
        return chunks.from_offset(offset)
    return _skip(chunks, offset)


async def _skip(chunks: AsyncIterable[bytes], offset: int) -> AsyncIterator[bytes]:
    async for piece in chunks:
        if offset:
            if len(piece) <= offset:
                offset -= len(piece)
                continue
            piece, offset = piece[offset:], 0
        yield piece


# -- answers -----------------------------------------------------------------------------------------
def _media_type(content_type: str | None) -> str | None:
    return content_type.split(";", 1)[0].strip() if content_type else None


def _check_auth(response: aiohttp.ClientResponse, name: str, what: str) -> None:
    """401 after the client offered everything it has, or 403: a credentials problem, said as one (and
    never read as "absent", which would make the copier upload into a registry that refuses it)."""
    if response.status == 401:
        raise Unauthorized(f"{name} refused our credentials for {what} (HTTP 401)")
    if response.status == 403:
        raise Denied(f"{name} denied access to {what} (HTTP 403)")


def _unexpected(response: aiohttp.ClientResponse, name: str, what: str) -> RegistryError:
    return UpstreamUnavailable(f"{name} answered {what} with HTTP {response.status}")


async def _refusal(response: aiohttp.ClientResponse, name: str, what: str) -> RegistryError:
    """The registry's own error for a write it refused, with its code and message in ours."""
    _check_auth(response, name, what)
    try:
        body = await _read_capped(response, 64 << 10, name)
        errors = json.loads(body).get("errors") or []
        first = errors[0] if errors and isinstance(errors[0], dict) else {}
        code, message = str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, AttributeError, RegistryError):
        code, message = "", ""
    text = f"{name} refused to {what}: HTTP {response.status}" + (f" {code}: {message}" if code else "")
    if response.status == 405 or code == "UNSUPPORTED":
        return Unsupported(text)
    if code in ("DIGEST_INVALID", "BLOB_UPLOAD_INVALID") or response.status == 416:
        return DigestInvalid(text) if code == "DIGEST_INVALID" else BlobUploadInvalid(text)
    if code in ("MANIFEST_INVALID", "MANIFEST_BLOB_UNKNOWN", "TAG_INVALID"):
        return ManifestInvalid(text)
    if response.status == 413:
        return ManifestTooLarge(text)
    return UpstreamUnavailable(text) if response.status >= 500 else UpstreamInvalid(text)


async def _read_capped(response: aiohttp.ClientResponse, limit: int, name: str) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise UpstreamInvalid(f"{name} sent a body larger than {limit} bytes")
    body = bytearray()
    try:
        async for piece in response.content.iter_chunked(64 << 10):
            body += piece
            if len(body) > limit:
                raise UpstreamInvalid(f"{name} sent a body larger than {limit} bytes")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamUnavailable(f"{name}: body cut short: {exc}") from exc
    return bytes(body)


# -- a destination of its own --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """A registry named by a replication rule's destination (not one of the configured upstreams)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or a traceback
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = 30.0

    @property
    def name(self) -> str:
        return urlsplit(self.url).netloc or self.url


def remote_tls(spec: RemoteSpec) -> ssl.SSLContext:
    if urlsplit(spec.url).scheme == "http":
        # Nothing to verify: skip loading the system's CAs (a quarter of a second per context, which a
        # `mirror sync` with nothing to copy would otherwise spend on certificates it never uses).
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context = ssl.create_default_context(cafile=str(spec.ca_file) if spec.ca_file else None)
    if not spec.tls_verify:
        # Asked for by name in the rule (a lab registry with a self-signed certificate): still TLS.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.asynccontextmanager
async def open_remote(
    spec: RemoteSpec,
    metrics: Metrics,
    *,
    journal: UploadJournal | None = None,
    before_get: BeforeGet | None = None,
    push: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> AsyncIterator[RemoteRegistry]:
    """A RemoteRegistry with an HTTP session of its own, closed when the block ends."""
    config = UpstreamConfig(
        name=spec.name, url=spec.url.rstrip("/"), username=spec.username, password=spec.password,
        ca_file=spec.ca_file, timeout=spec.timeout,
    )
    tls = remote_tls(spec)
    async with aiohttp.ClientSession(
        auto_decompress=False,  # bytes exactly as stored, or digests would not match
        read_bufsize=256 << 10,
        connector=aiohttp.TCPConnector(limit=32, ssl=tls, keepalive_timeout=KEEPALIVE_SECONDS),
        headers={"User-Agent": USER_AGENT},
    ) as session:
        client = UpstreamClient(config, session, metrics, tls=tls)
        try:
            yield RemoteRegistry(client, before_get=before_get, journal=journal, push=push, chunk_bytes=chunk_bytes)
        finally:
            client.close()


async def open_registry_destination(
    spec: Destination, stack: contextlib.AsyncExitStack, *, state_dir: Path, metrics: Metrics
) -> RemoteRegistry:
    """destinations.open_destination's `registry` kind: a session of its own (closed by `stack`), pull+push
    tokens, and the journal of its partial uploads in the destination's state folder.

    Its requests are counted in the app's `metrics` like an upstream's, labelled with the destination's
    host:port (`mirror_upstream_requests{upstream="dc2.example:5000"}`), so an operator sees what
    replication costs each registry it writes to."""
    if not spec.url:
        raise Unsupported("a registry destination needs a url")
    remote = RemoteSpec(spec.url, spec.username, spec.password, spec.ca_file, spec.tls_verify)
    return await stack.enter_async_context(
        open_remote(remote, metrics, journal=UploadJournal(state_dir / "uploads"))
    )

