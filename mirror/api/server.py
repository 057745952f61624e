"""Running the app: aiohttp's runner, with connections that answer unparseable requests as a registry.

A request HTTP itself cannot parse (`PUT *`, a NUL in a header, a bad request line) never reaches the
application, its middlewares or its signals: aiohttp's connection handler answers it with a text/plain
400 of its own. A registry client expects every 4xx in the `{"errors": [...]}` shape, with the API version
header. No public hook of aiohttp changes that answer, so `mirror serve` runs the app with a runner whose
connection handler renders it (`RegistryRequestHandler.handle_error`); everything else is aiohttp's
`run_app`, step for step (signals, graceful shutdown with a timeout, then the remaining tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mirror.api.errors import API_VERSION, API_VERSION_HEADER
from mirror.api.protocol_log import one_line_reason
from mirror.errors import BadRequest


class RegistryRequestHandler(web.RequestHandler):
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
    def __call__(self) -> web.RequestHandler:
        return RegistryRequestHandler(self, loop=self._loop, **self._kwargs)


class RegistryAppRunner(web.AppRunner):
    """web.AppRunner whose connections are RegistryRequestHandlers; the app's lifecycle is aiohttp's."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _RegistryServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,  # what the app's handler_args and the runner's settings made of them
        )


async def _serve(
    app: web.Application, host: str, port: int, print_line: Callable[[str], None], **runner_args: Any
) -> None:
    runner = RegistryAppRunner(app, handle_signals=True, **runner_args)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
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
