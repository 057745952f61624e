"""GET / HEAD / DELETE /v2/<name>/blobs/<digest>."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from mirror.api.common import target_for
from mirror.api.dispatch import Params
from mirror.api.errors import note_client_closed
from mirror.errors import BlobRangeInvalid, RegistryError
from mirror.oci.digest import Digest
from mirror.state import CACHE
from mirror.storage.interface import BlobFile, BlobInBackend, BlobStream

log = logging.getLogger(__name__)

BLOB_CONTENT_TYPE = "application/octet-stream"
# Offsets of at most 19 digits: no blob is 10^19 bytes, and int() refuses more than 4300 digits anyway.
_RANGE = re.compile(r"([0-9]{0,19})-([0-9]{0,19})")


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": BLOB_CONTENT_TYPE,
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


async def get_blob(request: web.Request, params: Params) -> web.StreamResponse:
    target = target_for(request, params["name"])
    digest = Digest.parse(params["digest"])
    # The blob is marked in use from before the lookup until the last byte went out, so the cache's
    # eviction cannot remove the file between finding it and sending it (FileResponse opens it by path,
    # during prepare): hence the response is prepared here, inside the mark.
    with request.app[CACHE].serving(digest):
        body = await target.registry.open_blob(target.repo, digest)
        if isinstance(body, BlobFile):
            return await send_blob_file(request, body)
        if isinstance(body, BlobInBackend):
            return await serve_from_backend(request, body)
        return await stream_blob(request, body)


async def send_blob_file(request: web.Request, body: BlobFile) -> web.StreamResponse:
    """A stored blob with sendfile (the caller holds its in-use mark until this returns)."""
    # The Range is judged here, by the same rules as for streamed blobs; FileResponse (sendfile,
    # HEAD, conditional requests) sees it only in the canonical form it agrees with, or not at all.
    byte_range = requested_range(request, body.digest, body.size)
    response = _PreparedFileResponse(body.path, headers=blob_headers(body.digest))
    try:
        await response.prepare(_with_range(request, byte_range))
    except ConnectionError:
        # Only the client's socket is written here (sendfile raises before the transport even knows
        # it is closed): the client left mid-body. Routine, it retries with Range; nothing to log.
        note_client_closed(request)
    return response


async def serve_from_backend(request: web.Request, body: BlobInBackend) -> web.StreamResponse:
    """A blob in a backend without local files (S3): a redirect to a presigned URL when the backend offers
    one (the client then fetches from the bucket, Range and all), or its bytes streamed through here."""
    byte_range = requested_range(request, body.digest, body.size)  # a bad Range is refused here either way
    url = await body.backend.presigned_url(body.digest)
    if url is not None:
        # 307 as distribution's redirect middleware answers: clients follow it for blob GETs, Range included.
        return web.Response(
            status=307, headers={"Location": url, "Docker-Content-Digest": str(body.digest), "Content-Length": "0"}
        )
    start, end = byte_range or (0, body.size)
    response = web.StreamResponse(status=206 if byte_range else 200, headers=blob_headers(body.digest))
    if byte_range:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{body.size}"
    response.content_length = end - start
    pieces = aiter(body.iter_range(start, end))
    try:
        return await _send_pieces(request, response, body, pieces, end - start)
    finally:
        # Stopped early (client gone, backend failed): the backend's own connection is released now.
        close = getattr(pieces, "aclose", None)
        if close is not None:
            await close()


async def _send_pieces(
    request: web.Request, response: web.StreamResponse, body: BlobInBackend, pieces: AsyncIterator[bytes], length: int
) -> web.StreamResponse:
    # The first piece before the headers: a blob deleted meanwhile is still a 404 (a backend error a 500)
    # rather than a 200 cut short.
    first = await anext(pieces, b"") if length else b""
    await response.prepare(request)
    sent = 0
    try:
        if first:
            await response.write(first)
            sent += len(first)
        async for piece in pieces:
            await response.write(piece)
            sent += len(piece)
    except ConnectionError:
        note_client_closed(request)  # the client left mid-body: routine, it retries with Range
        return response
    except Exception as exc:  # noqa: BLE001 - headers are gone: a cut connection is the only honest signal
        log.warning("aborting %s after %d bytes: the storage backend failed: %s", body.digest, sent, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    if sent != length:
        log.warning("aborting %s: the storage backend sent %d of %d bytes", body.digest, sent, length)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class _PreparedFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (inside the in-use mark); aiohttp prepares every returned
    response again, which FileResponse does not expect, so a second prepare is a no-op here."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The `Range` a blob GET is answered with, as [start, end); None for the whole blob.

    RFC 9110 section 14.2: a range unit the server does not know is ignored (`items=0-1` gets the whole
    blob). A `bytes=` range is honoured when it is one satisfiable range; anything else in `bytes=` (several
    ranges, `5-2`, digits missing, a range past the end) raises ValueError and is refused with 416. No
    registry client asks for several ranges in one request; a 416 says so where a 200 would silently send
    a whole (possibly huge) blob.
    """
    if header is None:
        return None
    unit, equals, spec = header.strip().partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    match = _RANGE.fullmatch(spec.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise ValueError("malformed or multiple byte ranges")
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(size - length, 0), size
    start = int(first)
    if last and int(last) < start:
        raise ValueError("the last byte is before the first")
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise ValueError("range outside the blob")
    return start, end


def requested_range(request: web.Request, digest: Digest, size: int) -> tuple[int, int] | None:
    """parse_range on the request, or the registry's 416 (JSON body, `Content-Range: bytes */SIZE`)."""
    header = request.headers.get("Range")
    try:
        return parse_range(header, size)
    except ValueError as exc:
        assert header is not None  # no header is no range, never an error
        raise BlobRangeInvalid(
            f"cannot serve Range {header[:100]!r} of a {size}-byte blob: {exc}; ask for one range within it",
            detail={"range": header[:100], "size": size},
            headers={
                "Content-Range": f"bytes */{size}",
                "Docker-Content-Digest": str(digest),
                "Accept-Ranges": "bytes",
            },
        ) from None


def _with_range(request: web.Request, byte_range: tuple[int, int] | None) -> web.Request:
    """The request FileResponse should see: the chosen range spelled canonically, or no Range at all."""
    header = request.headers.get("Range")
    if header is None:
        return request
    canonical = None if byte_range is None else f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    if header == canonical:
        return request
    headers = CIMultiDict(request.headers)
    del headers["Range"]
    if canonical is not None:
        headers["Range"] = canonical
    return request.clone(headers=headers)


async def stream_blob(request: web.Request, body: BlobStream) -> web.StreamResponse:
    """Serve a blob whose bytes are still arriving: headers now, bytes as they land on disk."""
    headers = blob_headers(body.digest)
    byte_range = requested_range(request, body.digest, body.size)
    start, end = byte_range or (0, body.size)
    response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
    if byte_range:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{body.size}"
    response.content_length = end - start
    reader = await body.open_reader()
    try:
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        offset = start
        while offset < end:
            available = await body.readable(offset, end)
            transport = request.transport
            if transport is None or transport.is_closing():
                note_client_closed(request)
                return response  # the client left; the fill goes on without it
            # sendfile from our own descriptor: the kernel moves the bytes, the event loop only waits.
            await loop.sendfile(transport, reader, offset, available - offset)
            offset = available
    except RegistryError as error:
        # Headers are gone already; the only honest signal left is a cut connection. Clients retry with Range.
        log.warning("aborting %s after a failed fill: %s", body.digest, error.message)
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        # Raised by sendfile to the client's socket: a client that hangs up mid-blob is routine (it retries
        # with Range). No traceback, and the fill goes on for the others.
        note_client_closed(request)
        return response
    finally:
        reader.close()
    await response.write_eof()
    return response


async def head_blob(request: web.Request, params: Params) -> web.StreamResponse:
    """HEAD answers from what is known (a file, a running fill, an upstream HEAD): it never starts a download."""
    digest = Digest.parse(params["digest"])
    target = target_for(request, params["name"])
    info = await target.registry.stat_blob(target.repo, digest)
    response = web.StreamResponse(headers=blob_headers(digest))
    response.content_length = info.size
    await response.prepare(request)
    await response.write_eof()
    return response


async def delete_blob(request: web.Request, params: Params) -> web.StreamResponse:
    target = target_for(request, params["name"])
    await target.registry.delete_blob(target.repo, Digest.parse(params["digest"]))
    return web.Response(status=202, headers={"Content-Length": "0"})
