"""Blob uploads: POST (start, monolithic, mount), PATCH, PUT, GET status, DELETE cancel."""

from __future__ import annotations

import contextlib
import re

from aiohttp import web

from mirror.api.common import body_chunks, target_for
from mirror.api.dispatch import Params
from mirror.errors import BlobUploadInvalid, DigestInvalid, RegistryError, SizeInvalid
from mirror.oci.digest import Digest
from mirror.oci.names import validate_name
from mirror.state import ROUTER
from mirror.storage.upload_bytes import range_header
from mirror.storage.uploads import Upload

# Offsets are bounded in length: int() raises ValueError (a 500) on > 4300 digits, and no upload is 10^19 bytes.
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})(?:/(?:\d{1,19}|\*))?")


def _upload_headers(name: str, upload: Upload) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload.id}",
        "Docker-Upload-UUID": upload.id,
        "Content-Length": "0",
        **range_header(upload.size),
    }


def _created_headers(name: str, digest: Digest) -> dict[str, str]:
    return {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest), "Content-Length": "0"}


def _chunk_range(request: web.Request) -> tuple[int | None, int | None]:
    """(start, length) from Content-Range / Content-Length; (None, None) for a streamed chunk."""
    header = request.headers.get("Content-Range")
    if not header:
        return None, None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise BlobUploadInvalid(f"malformed Content-Range {header[:100]!r}")
    start, end = int(match.group(1)), int(match.group(2))
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        # The declared length disagrees with the data sent: the spec's SIZE_INVALID, not a malformed request.
        raise SizeInvalid(f"Content-Range covers {length} bytes but Content-Length is {request.content_length}")
    return start, length


def _has_body(request: web.Request) -> bool:
    return bool(request.content_length) or request.headers.get("Transfer-Encoding", "").lower() == "chunked"


def _required_digest(request: web.Request) -> Digest:
    raw = request.query.get("digest")
    if not raw:
        raise DigestInvalid("the digest query parameter is required to finish an upload")
    return Digest.parse(raw)


async def start_upload(request: web.Request, params: Params) -> web.StreamResponse:
    name = params["name"]
    target = target_for(request, name)
    mount, source = request.query.get("mount"), request.query.get("from")
    if mount is not None:
        mount_digest = Digest.parse(mount)
        if source:
            source_target = request.app[ROUTER].route(validate_name(source))
            if source_target.registry is target.registry and await target.registry.mount_blob(
                target.repo, source_target.repo, mount_digest
            ):
                return web.Response(status=201, headers=_created_headers(name, mount_digest))
        # Not mountable: the spec says answer with a fresh upload session instead.
    monolithic = request.query.get("digest")
    digest = Digest.parse(monolithic) if monolithic is not None else None
    upload = await target.registry.start_upload(target.repo)
    if digest is None:
        return web.Response(status=202, headers=_upload_headers(name, upload))
    try:
        await target.registry.finish_upload(
            target.repo, upload.id, digest, body_chunks(request), start=None, length=request.content_length
        )
    except BaseException:
        # The client never learnt this session's id, so nobody can resume it: drop it now (a client that
        # hung up mid-body) rather than leave its bytes on disk until the next start-up's cleanup.
        with contextlib.suppress(RegistryError):  # finish() already removed it after a digest mismatch
            await target.registry.cancel_upload(target.repo, upload.id)
        raise
    return web.Response(status=201, headers=_created_headers(name, digest))


async def patch_upload(request: web.Request, params: Params) -> web.StreamResponse:
    name = params["name"]
    target = target_for(request, name)
    start, length = _chunk_range(request)
    upload = await target.registry.append_upload(
        target.repo, params["upload_id"], body_chunks(request), start=start, length=length
    )
    return web.Response(status=202, headers=_upload_headers(name, upload))


async def put_upload(request: web.Request, params: Params) -> web.StreamResponse:
    name = params["name"]
    target = target_for(request, name)
    digest = _required_digest(request)
    start, length = _chunk_range(request)
    await target.registry.finish_upload(
        target.repo,
        params["upload_id"],
        digest,
        body_chunks(request) if _has_body(request) else None,
        start=start,
        length=length,
    )
    return web.Response(status=201, headers=_created_headers(name, digest))


async def upload_status(request: web.Request, params: Params) -> web.StreamResponse:
    name = params["name"]
    target = target_for(request, name)
    upload = await target.registry.upload_status(target.repo, params["upload_id"])
    return web.Response(status=204, headers=_upload_headers(name, upload))


async def cancel_upload(request: web.Request, params: Params) -> web.StreamResponse:
    target = target_for(request, params["name"])
    await target.registry.cancel_upload(target.repo, params["upload_id"])
    return web.Response(status=204)
