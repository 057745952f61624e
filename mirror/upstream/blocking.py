"""Blocking HTTP for blob bodies: requests sent from threads, with keep-alive connections kept per host.

Why not aiohttp here: a blob body pulled through the event loop costs a Python-level callback, a new
bytes object and a parser pass for every 256 KiB, on the one thread that also serves every client
(TLS through asyncio's memory BIOs costs more again). Measured on the benchmark machine, receiving,
writing and hashing a 200 MB blob in threads with blocking sockets ran at 770-1070 MB/s where the
asyncio fill managed 430-500 MB/s. Everything else (manifests, tokens, HEADs) stays on aiohttp.

The event loop never waits on these sockets: requests are opened in the pool's own executor (so a
stalled upstream cannot starve the default executor that file and index calls use), and bodies are read
by the threads of `mirror.proxy.download`.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

# Error bodies up to this size are read at once, so their connection can be used again.
SMALL_BODY_BYTES = 64 << 10
IDLE_CONNECTIONS_PER_HOST = 8
# Open connections per upstream (its CDN hosts included) at most, busy or idle: aiohttp's default.
MAX_CONNECTIONS = 64
# Servers close idle keep-alive connections after a while (nginx 75 s, many CDNs 60 s); a connection
# idle this long is closed by us rather than found dead.
IDLE_SECONDS = 30.0
OPENING_THREADS = 32

_HostKey = tuple[str, str, int]  # scheme, host, port
# What a dead keep-alive connection looks like when it is used again: worth one retry on a new one.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class BlockingResponse:
    """A response whose headers are in and whose body is read, from a thread, with `read1`."""

    def __init__(self, pool: BlockingPool, key: _HostKey, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, *, head: bool) -> None:
        self._pool = pool
        self._head = head
        self._key = key
        self._connection: http.client.HTTPConnection | None = connection
        self._response = response
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(response.getheaders()))
        # The whole body was read: only then may the connection carry another request. (http.client
        # also calls a body cut short by the server "closed".)
        self._complete = False

    @property
    def content_length(self) -> int | None:
        """The body's length, or None when the upstream did not say (chunked)."""
        if self._response.chunked:
            return None
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def read1(self, limit: int) -> bytes:
        """Blocking: up to `limit` body bytes from one receive; b"" at the end. Raises IncompleteRead when
        the upstream closes before the length it announced, OSError on a broken or timed-out socket."""
        data = self._response.read1(limit)
        if self._response.chunked:
            # http.client raises IncompleteRead on a cut chunked body: an empty read is its real end.
            self._complete = self._complete or (not data and bool(limit))
        elif self._response.length == 0:
            self._complete = True
            if not self._response.isclosed():
                self._response.close()  # read1 never marks a complete body done (read does)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Blocking: fill `buffer` with body bytes (fewer only at the end); 0 at the end. Reads into the
        caller's memory, so a receiver can reuse its buffers instead of allocating a bytes per read.
        Raises like read1."""
        count = self._response.readinto(buffer)
        if self._response.chunked:
            self._complete = self._complete or (not count and len(buffer) > 0)
        elif self._response.length == 0 or (not count and len(buffer) > 0):
            # http.client closes a body it read to its announced length itself; without a length, the
            # server closing the connection is the end (will_close then keeps it out of the pool).
            self._complete = True
        return count

    def read_small_body(self) -> None:
        """Blocking: read a short body now (an error page), so the connection can carry the next request."""
        length = self.content_length
        if self._head or (length is not None and length <= SMALL_BODY_BYTES):
            self._response.read()  # raises IncompleteRead if the body is cut short
            self._complete = True

    def abort(self) -> None:
        """Wake a thread blocked reading this body (any thread may call this): the read fails at once."""
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            try:
                # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would drop the TLS
                # object that the reading thread is using at this very moment.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        """Done with the response: a fully read one gives its connection back to the pool, any other
        closes it. Never blocks."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and self._response.isclosed() and not self._response.will_close:
            self._pool.give_back(self._key, connection)
        else:
            self._response.close()
            self._pool.discard(connection)


class BlockingPool:
    """Keep-alive connections to upstream hosts for blocking requests; owned by one UpstreamClient."""

    def __init__(
        self,
        *,
        user_agent: str,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.user_agent = user_agent
        self.timeout = timeout
        self.max_connections = max_connections
        self._tls = tls  # None: the system's CAs, loaded by the first https connection (see _tls_context)
        self._tls_loading = threading.Lock()
        self._idle: dict[_HostKey, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._open: set[http.client.HTTPConnection] = set()  # busy or idle; at most max_connections
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified whenever a connection closes
        self._executor = ThreadPoolExecutor(max_workers=OPENING_THREADS, thread_name_prefix="upstream-open")
        self._closed = False
        self._warming: dict[_HostKey, int] = {}  # connections being opened ahead of requests, per host

    async def request(self, method: str, url: str, headers: Mapping[str, str]) -> BlockingResponse:
        """Send a request from a thread; return once the response headers are in. If the caller is
        cancelled meanwhile, the response that arrives later is closed, not leaked."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._request_sync, method, url, dict(headers))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_abandoned)
            raise

    def warm(self, url: str, count: int) -> int:
        """Open connections to `url`'s host ahead of requests, in the background, until `count` of them
        are idle or being opened (at most IDLE_CONNECTIONS_PER_HOST, never past max_connections); returns
        how many it started. Never blocks: a request that comes first opens its own connection.

        Why: at 30 ms from the upstream, a new TLS connection costs two round trips (TCP, TLS 1.3) before
        its request can go. Opened while the manifest that names the blobs is still on its way, the
        blob GETs that follow it need only their own round trip."""
        key = _key_of(url)
        with self._lock:
            if self._closed:
                return 0
            have = len(self._idle.get(key, ())) + self._warming.get(key, 0)
            room = self.max_connections - len(self._open) - sum(self._warming.values())
            wanted = max(0, min(count, IDLE_CONNECTIONS_PER_HOST) - have)
            started = max(0, min(wanted, room))
            if started:
                self._warming[key] = self._warming.get(key, 0) + started
        for _ in range(started):
            try:
                self._executor.submit(self._warm_one, key)
            except RuntimeError:  # shut down meanwhile
                self._warmed(key)
        return started

    def _warm_one(self, key: _HostKey) -> None:
        connection = self._new_connection(key)
        try:
            with self._lock:
                if self._closed or len(self._open) >= self.max_connections:
                    return  # requests took the room meanwhile: they come first
                self._open.add(connection)
            try:
                connection.connect()
            except (OSError, http.client.HTTPException) as exc:
                # Only a head start was lost: the request that needs a connection opens its own (and
                # reports the failure, with the retries it is owed).
                log.debug("opening a connection to %s ahead of requests failed: %s", key[1], exc)
                self.discard(connection)
                return
            self.give_back(key, connection)
        finally:
            self._warmed(key)

    def _warmed(self, key: _HostKey) -> None:
        with self._lock:
            left = self._warming.get(key, 0) - 1
            if left > 0:
                self._warming[key] = left
            else:
                self._warming.pop(key, None)

    def _request_sync(self, method: str, url: str, headers: dict[str, str]) -> BlockingResponse:
        key = _key_of(url)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers.setdefault("User-Agent", self.user_agent)
        while True:
            connection, reused = self._take(key)
            try:
                connection.request(method, target, headers=headers)
                response = connection.getresponse()
            except _STALE_CONNECTION:
                self.discard(connection)
                if reused:
                    continue  # the server closed it while it sat in the pool: once more, on a new one
                raise
            except BaseException:
                self.discard(connection)
                raise
            result = BlockingResponse(self, key, connection, response, head=method == "HEAD")
            if method == "HEAD" or result.status >= 300:
                try:
                    result.read_small_body()
                except BaseException:
                    result.release()
                    raise
            return result

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    @property
    def idle_connections(self) -> int:
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())

    def _take(self, key: _HostKey) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                connection, since = idle.pop()
                if now - since < IDLE_SECONDS:
                    return connection, True
                self._discard_locked(connection)
        fresh = self._new_connection(key)  # not connected until its first request
        self._admit(fresh)
        return fresh, False

    def _new_connection(self, key: _HostKey) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._tls_context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _tls_context(self) -> ssl.SSLContext:
        """Made in the thread that opens the first https connection, not at start-up: an upstream reached
        over plain http never needs it, and one over https pays the ~60 ms off the event loop."""
        with self._tls_loading:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls

    def _admit(self, connection: http.client.HTTPConnection) -> None:
        """Count a new connection as open once there is room: an idle one (to any host) is closed to
        make it, else one in use must end within the timeout (a TimeoutError then, which is retried)."""
        with self._room:
            if len(self._open) >= self.max_connections:
                oldest = min(((since, key) for key, idle in self._idle.items() for _, since in idle[:1]), default=None)
                if oldest is not None:
                    idle_connection, _ = self._idle[oldest[1]].pop(0)
                    self._discard_locked(idle_connection)
            if not self._room.wait_for(lambda: len(self._open) < self.max_connections, timeout=self.timeout):
                raise TimeoutError(
                    f"all {self.max_connections} upstream connections stayed busy for {self.timeout:g} s"
                )
            self._open.add(connection)

    def give_back(self, key: _HostKey, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if self._closed or len(idle) >= IDLE_CONNECTIONS_PER_HOST:
                self._discard_locked(connection)
                return
            idle.append((connection, time.monotonic()))

    def discard(self, connection: http.client.HTTPConnection) -> None:
        """Close a connection for good and free its slot."""
        with self._lock:
            self._discard_locked(connection)

    def _discard_locked(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        if connection in self._open:
            self._open.remove(connection)
            self._room.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
            for connections in idle.values():
                for connection, _ in connections:
                    self._discard_locked(connection)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _key_of(url: str) -> _HostKey:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise http.client.InvalidURL(f"not an http(s) URL: {url[:200]!r}")
    return scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)


def _release_abandoned(future: asyncio.Future[BlockingResponse]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()
