"""Replication inside an application: the engine when rules are configured, and only then.

The engine and what it imports (the copier, destinations, OCI layouts and archives, cron and version
parsing) cost ~0.3 s of start-up, which a server without `replication:` rules does not pay. Such a server
still takes the data directory's serve lock: `mirror sync` (with a config of its own) learns from it that
a server owns the directory and asks that server instead of opening the stores a second time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from mirror.replication.serve_lock import take_serve_lock
from mirror.state import CONFIG

if TYPE_CHECKING:
    from mirror.replication.engine import ReplicationEngine

# Set only when the config has rules; handlers read it with app.get().
REPLICATION: web.AppKey[ReplicationEngine] = web.AppKey("replication")
# False in an app a command opens (mirror sync, export, import): it runs what it is asked to, no schedules.
RUN_SCHEDULES: web.AppKey[bool] = web.AppKey("replication_schedules")
# Whether this server holds the serve lock (and so runs rules' schedules): `GET /api/replication`'s
# "scheduling" when there are no rules and so no engine to ask.
SERVE_LOCK_OWNED: web.AppKey[bool] = web.AppKey("replication_serve_lock_owned")


async def replication_context(app: web.Application) -> AsyncIterator[None]:
    """The app-owned engine: rules' state loaded, schedules running (unless the app is a command's, see
    mirror/replication/standalone.py), everything stopped on exit."""
    config = app[CONFIG]
    if not config.replication:
        lock = await take_serve_lock(config.storage.path) if app.get(RUN_SCHEDULES, True) else None
        app[SERVE_LOCK_OWNED] = lock is not None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()
        return
    from mirror.replication.engine import ReplicationEngine  # here: only a config with rules pays its import

    engine = ReplicationEngine(app)
    await engine.load()
    app[REPLICATION] = engine
    if app.get(RUN_SCHEDULES, True):
        await engine.start_schedules()
    try:
        yield
    finally:
        await engine.close()
