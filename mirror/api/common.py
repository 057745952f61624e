"""Helpers the handlers share: routing a request, reading bodies, headers, pagination."""

from __future__ import annotations

import asyncio
import bisect
import re
from collections.abc import AsyncIterator
from urllib.parse import quote

from aiohttp import web

from mirror.errors import ManifestTooLarge, PaginationNumberInvalid, RegistryError
from mirror.oci.digest import Digest
from mirror.routing import Target
from mirror.state import CONFIG, ROUTER

READ_CHUNK_BYTES = 1 << 20
# ASCII digits only: str.isdigit() also accepts '²' and '١', which int() then rejects or misreads.
_PAGE_NUMBER = re.compile(r"[0-9]+")
# More digits than this is "as many as you allow" anyway; int() refuses > 4300 digits with a ValueError.
_PAGE_NUMBER_MAX_DIGITS = 18
# Set by access control (mirror/auth): the predicate a listing applies to repository names, and the check
# (mirror.storage.interface.TagMoveCheck) the registry runs when a manifest PUT would move a tag. Without
# auth neither is ever set.
LISTING_FILTER = "listing_filter"
TAG_MOVE_CHECK = "tag_move_check"


def target_for(request: web.Request, name: str) -> Target:
    target = request.app[ROUTER].route(name, request.query.get("ns"))
    # What the access log, the pull counts and the metrics call this request: the repository it really
    # reached, under its upstream's name however the client spelled it (?ns=, a path prefix, a mirror root).
    request["repository"] = f"{target.upstream}/{target.repo}" if target.upstream else target.repo
    request["upstream"] = target.upstream
    return target


class BodyStalled(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 408, "the request body stopped arriving"


class BodyTooLarge(RegistryError):
    code, status, default_message = "SIZE_INVALID", 413, "request body too large"


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, never held whole in memory; a client that stops sending for
    `http.body_idle_timeout` is cut off (what it sent of an upload stays, to resume), and a body over
    `http.max_body_bytes` is refused."""
    limits = request.app[CONFIG].security.http
    cap = limits.max_body_bytes
    if cap is not None and (request.content_length or 0) > cap:
        raise BodyTooLarge(f"request bodies are limited to {cap} bytes")
    received = 0
    chunks = request.content.iter_chunked(READ_CHUNK_BYTES).__aiter__()
    while True:
        try:
            async with asyncio.timeout(limits.body_idle_timeout):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BodyStalled(f"no body data for {limits.body_idle_timeout:g}s") from None
        received += len(chunk)
        if cap is not None and received > cap:
            raise BodyTooLarge(f"request bodies are limited to {cap} bytes")
        yield chunk


async def read_limited(request: web.Request, limit: int) -> bytes:
    """Read a small body (a manifest), refusing with 413 as soon as it passes `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise ManifestTooLarge(f"manifest is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise ManifestTooLarge(f"manifest is larger than {limit} bytes")
    return bytes(body)


def visible(request: web.Request, names: list[str]) -> list[str]:
    """The repository names this caller may see (all of them without access control)."""
    allowed = request.get(LISTING_FILTER)
    return names if allowed is None else [name for name in names if allowed(name)]


def content_headers(digest: Digest, media_type: str) -> dict[str, str]:
    return {"Docker-Content-Digest": str(digest), "Content-Type": media_type, "ETag": f'"{digest}"'}


def page(request: web.Request, items: list[str]) -> tuple[list[str], str | None]:
    """Apply `n` and `last` to a sorted list; return the page and the `Link` header for the next one."""
    cap = request.app[CONFIG].limits.page_size_max
    raw_n = request.query.get("n")
    if raw_n is None or raw_n == "":
        n = cap
    elif _PAGE_NUMBER.fullmatch(raw_n):
        digits = raw_n.lstrip("0") or "0"
        n = cap if len(digits) > _PAGE_NUMBER_MAX_DIGITS else min(int(digits), cap)
    else:
        raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw_n[:50]!r}")
    last = request.query.get("last")
    start = bisect.bisect_right(items, last) if last else 0
    selected = items[start : start + n]
    if selected and start + n < len(items):
        link = f'<{request.path}?n={n}&last={quote(selected[-1], safe="")}>; rel="next"'
        return selected, link
    return selected, None
