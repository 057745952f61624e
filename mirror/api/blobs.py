"""GET / HEAD / DELETE /v2/<name>/blobs/<digest>."""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from mirror.api.common import target_for
from mirror.api.dispatch import Params
from mirror.errors import RegistryError
from mirror.oci.digest import Digest
from mirror.state import CACHE
from mirror.storage.interface import BlobFile, BlobStream

log = logging.getLogger(__name__)

BLOB_CONTENT_TYPE = "application/octet-stream"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


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
            # Judge the Range ourselves first: aiohttp serves `bytes=-0` as the whole blob, where RFC 9110 (and
            # our streamed path) answer 416. A satisfiable range is left to FileResponse.
            try:
                parse_range(request.headers.get("Range"), body.size)
            except ValueError:
                return _unsatisfiable(digest, body.size)
            # sendfile, Range and HEAD for free.
            response = _PreparedFileResponse(body.path, headers=blob_headers(digest))
            await response.prepare(request)
            return response
        return await stream_blob(request, body)


class _PreparedFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (inside the in-use mark); aiohttp prepares every returned
    response again, which FileResponse does not expect, so a second prepare is a no-op here."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=a-b` range as [start, end); None for no Range. Raises ValueError if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise ValueError("malformed range")
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise ValueError("range outside the blob")
    return start, end


def _unsatisfiable(digest: Digest, size: int) -> web.Response:
    return web.Response(status=416, headers={**blob_headers(digest), "Content-Range": f"bytes */{size}"})


async def stream_blob(request: web.Request, body: BlobStream) -> web.StreamResponse:
    """Serve a blob whose bytes are still arriving: headers now, bytes as they land on disk."""
    headers = blob_headers(body.digest)
    try:
        byte_range = parse_range(request.headers.get("Range"), body.size)
    except ValueError:
        return _unsatisfiable(body.digest, body.size)
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
