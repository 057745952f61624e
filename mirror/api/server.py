"""Running the app: aiohttp's runner, with connections that answer unparseable requests as a registry.

A request HTTP itself cannot parse (`PUT *`, a NUL in a header, a bad request line) never reaches the
application, its middlewares or its signals: aiohttp's connection handler answers it with a text/plain
400 of its own. A registry client expects every 4xx in the `{"errors": [...]}` shape, with the API version
header. No public hook of aiohttp changes that answer, so `mirror serve` runs the app with a runner whose
connection handler renders it (`RegistryRequestHandler.handle_error`); everything else is aiohttp's
`run_app`, step for step (signals, graceful shutdown with a timeout, then the remaining tasks).

The same connection handler bounds how long a request's headers may take to arrive (`http.header_timeout`),
which aiohttp does not: its keep-alive timer runs only while a connection is idle *between* requests, and a
client that sends one header byte every few seconds (slowloris) holds its connection, and a slot of the
process's file descriptors, as long as it likes. The timer starts when a connection opens and at the first
byte of each further request, and stops when aiohttp's parser has the whole header block; on expiry an idle
connection gets a 408 in the registry's error shape and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from mirror.api.errors import API_VERSION, API_VERSION_HEADER
from mirror.api.protocol_log import one_line_reason
from mirror.errors import BadRequest, RegistryError

log = logging.getLogger(__name__)


class HeadersTimedOut(RegistryError):
    code, status, default_message = "UNSUPPORTED", 408, "request headers not complete in time"


class RegistryRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with a bound on the header phase and registry-shaped parse errors."""

    def __init__(
        self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, header_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        # The body of the last request whose headers arrived: until it has all come, what the client sends
        # is body (bounded by body_idle_timeout), not the start of the next request.
        self._open_body: StreamReader | None = None

    # -- the header timer ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # the first request's headers are due from the start (after TLS)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and self._between_requests():
            self._open_body = None  # done with; not kept alive until the next request's headers
            self._arm_header_timer()  # the first byte of the next request (pipelined or after keep-alive idle)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # aiohttp parsed at least one whole header block
            self._disarm_header_timer()
            self._open_body = self._messages[-1][1]
        # Anything after that block in this same read is the next request; its timer starts with its next
        # byte: a client that sends nothing more is then idle, which keepalive_timeout bounds.

    def _between_requests(self) -> bool:
        return self._open_body is None or self._open_body.is_eof()

    def _arm_header_timer(self) -> None:
        if self._header_timeout:
            self._header_timer = self._loop.call_later(self._header_timeout, self._header_time_is_up)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_time_is_up(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or self._force_close or self._close:
            return
        if self._buffer_paused:
            # Reading is paused because 32 parsed requests wait for handlers: the wait is ours, not the client's.
            self._arm_header_timer()
            return
        peer = transport.get_extra_info("peername")
        log.warning("closing a connection from %s: request headers not complete after %gs",
                    peer[0] if isinstance(peer, tuple) else peer, self._header_timeout)
        if self._request_in_progress:
            # A pipelined request trickles in behind one being answered: finish that answer, then hang up.
            self.close()
            return
        error = HeadersTimedOut(f"request headers not complete after {self._header_timeout:g}s")
        body = json.dumps(error.to_json()).encode()
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n{API_VERSION_HEADER}: {API_VERSION}\r\n".encode()
            + b"Connection: close\r\n\r\n" + body
        )
        self.force_close()  # closing the transport still sends what was written

    # -- unparseable requests -----------------------------------------------------------------------
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling first: it logs (through the app's ProtocolLog) and refuses to answer twice.
        plain = super().handle_error(request, status, exc, message)
        if not 400 <= status < 500:
            return plain
        reason = one_line_reason(exc) if isinstance(exc, HttpProcessingError) else (message or "")
        error = BadRequest(f"malformed HTTP request: {reason}" if reason else None)
        response = web.Response(
            status=status, body=json.dumps(error.to_json()).encode(), content_type="application/json"
        )
        response.headers[API_VERSION_HEADER] = API_VERSION
        response.force_close()  # what follows on this connection cannot be trusted to be a request
        return response


class _RegistryServer(web.Server):
    def __init__(self, *args: Any, header_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> web.RequestHandler:
        return RegistryRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class RegistryAppRunner(web.AppRunner):
    """web.AppRunner whose connections are RegistryRequestHandlers; the app's lifecycle is aiohttp's.
    `header_timeout` (seconds; None = unbounded) is how long one request's headers may take to arrive."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _RegistryServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout=self._header_timeout,
            **server._kwargs,  # what the app's handler_args and the runner's settings made of them
        )


async def _serve(
    app: web.Application, host: str, port: int, print_line: Callable[[str], None],
    ssl_context: ssl.SSLContext | None = None, **runner_args: Any
) -> None:
    runner = RegistryAppRunner(app, handle_signals=True, **runner_args)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)  # HTTPS when `tls:` is configured
        await site.start()
        print_line(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def run_app(
    app: web.Application, *, host: str, port: int, print_line: Callable[[str], None], **runner_args: Any
) -> None:
    """`web.run_app(app, host=..., port=..., **runner_args)` with RegistryAppRunner: until SIGINT/SIGTERM,
    then a graceful shutdown (`shutdown_timeout`), the app's cleanup, and the tasks left cancelled last."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, host, port, print_line, **runner_args))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    remaining = asyncio.all_tasks(loop)
    for task in remaining:
        task.cancel()
    if remaining:
        loop.run_until_complete(asyncio.gather(*remaining, return_exceptions=True))
