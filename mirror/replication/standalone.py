"""The application's resources without a listener, for commands that run outside `mirror serve`
(`mirror sync`, `mirror export`, `mirror import`): the same stores, upstream clients, cache and router the
server builds, opened and closed by the same cleanup context, so a command can never disagree with the
server about where or how content is stored."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.app import create_app
from mirror.config import Config
from mirror.replication.hosting import RUN_SCHEDULES


@contextlib.asynccontextmanager
async def open_app(config: Config) -> AsyncIterator[web.Application]:
    """An application whose resources are open (app[ROUTER], app[CACHE], ...) until the block ends."""
    app = create_app(config)
    app[RUN_SCHEDULES] = False  # a command runs what it is asked to, never the rules' schedules
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        yield runner.app
    finally:
        await runner.cleanup()
