"""What each request did, for the access log and the status page.

A `RequestNote` rides along with every request (in a ContextVar, so code deep in the proxy can say "this was
a cache hit" without the handlers passing it down); the access logger writes one line from
it once the response is sent, and `PullStats` counts pulls per repository for the status page's top list
(repository names are unbounded, so they are never Prometheus labels).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from mirror.state import METRICS

ACCESS_LOGGER = "mirror.access"
TOP_REPOSITORIES_TRACKED = 2000  # distinct names kept; the least pulled are dropped past this
RECENT_FILLS_KEPT = 20
# Lookup results whose bytes came from a download running for this request (started by it, joined, or a
# layer prefetch it caught up with) rather than from what was stored before it.
STREAMED_FROM_UPSTREAM = frozenset({"miss", "joined", "prefetched"})


@dataclass(slots=True)
class RequestNote:
    cache: str | None = None  # hit, miss, joined, stale, revalidated
    # Body bytes of a blob sent with sendfile, which aiohttp's own count (`body_length`) never sees.
    blob_bytes: int | None = None


_CURRENT_NOTE: contextvars.ContextVar[RequestNote | None] = contextvars.ContextVar("mirror_request_note", default=None)


def note_cache_result(result: str) -> None:
    """Called where the proxy decides; a no-op outside a request (replication, prefetch)."""
    note = _CURRENT_NOTE.get()
    if note is not None:
        if note.cache is None or result != "hit":  # a miss or stale answer is what the line should say
            note.cache = result


@dataclass(frozen=True, slots=True)
class FillRecord:
    upstream: str
    repository: str
    digest: str
    size: int
    seconds: float
    result: str
    finished_at: float


@dataclass(slots=True)
class PullStats:
    """App-owned counters since start: pulls (manifest GETs answered 200) per repository, recent fills."""

    started_at: float = field(default_factory=time.time)
    pulls: Counter[str] = field(default_factory=Counter)
    recent_fills: deque[FillRecord] = field(default_factory=lambda: deque(maxlen=RECENT_FILLS_KEPT))

    def record_pull(self, repository: str) -> None:
        self.pulls[repository] += 1
        if len(self.pulls) > TOP_REPOSITORIES_TRACKED:
            for name, _count in self.pulls.most_common()[TOP_REPOSITORIES_TRACKED // 2 :]:
                del self.pulls[name]

    def record_fill(self, record: FillRecord) -> None:
        self.recent_fills.appendleft(record)

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.pulls.most_common(n)


PULL_STATS: web.AppKey[PullStats] = web.AppKey("pull_stats", PullStats)


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    note = RequestNote()
    request["note"] = note
    token = _CURRENT_NOTE.set(note)
    try:
        response = await handler(request)
    finally:
        _CURRENT_NOTE.reset(token)
    if request.method != "GET":
        return response
    endpoint = request.get("endpoint")
    upstream = request.get("upstream")
    metrics = request.app[METRICS]
    if endpoint == "manifest" and response.status == 200:
        metrics.pulls.labels(upstream or "local").inc()
        repository = request.get("repository")
        if isinstance(repository, str):
            request.app[PULL_STATS].record_pull(repository)
    elif endpoint == "blob" and response.status in (200, 206) and response.prepared:
        # Blob handlers send the whole body before they return (sendfile inside the in-use mark), so the
        # bytes are out by now, unless the client left: then the transport is closing and nothing counts.
        transport = request.transport
        if transport is not None and not transport.is_closing():
            source = "local" if upstream is None else "upstream" if note.cache in STREAMED_FROM_UPSTREAM else "cache"
            note.blob_bytes = response.content_length or 0
            metrics.served_bytes.labels(source).inc(note.blob_bytes)
    return response


class RequestLogger(AbstractAccessLogger):
    """One line per request once its response went out: method, route, repository, status, bytes, time,
    cache result and upstream. With `log.format: json` the fields are JSON keys (see mirror.observe.logs).
    The query string is never logged whole: only `ns`, which names a registry, not a secret."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        note = request.get("note")
        endpoint = request.get("endpoint", "other")
        repository = request.get("repository")
        fields = {
            "method": request.method,
            "route": endpoint,
            "repository": repository,
            "status": response.status,
            "bytes": note.blob_bytes if note and note.blob_bytes is not None else response.body_length,
            "duration_ms": round(time * 1000, 2),
            "cache": note.cache if note else None,
            "upstream": request.get("upstream"),
            "remote": request.remote,
        }
        # The plain line starts with the method already; JSON keeps it as a field of its own.
        shown = " ".join(
            f"{key}={value}" for key, value in fields.items() if value is not None and key != "method"
        )
        self.logger.info("%s %s %s", request.method, request.path[:300], shown, extra={"http": fields})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
