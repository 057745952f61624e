"""Before /metrics or the status page reads the rate-limit gauges: on a cluster node, take the newest reading
any node published for each upstream (the budget is the cluster's, whichever node last spent from it)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from mirror.proxy.registry import ProxyRegistry
from mirror.state import ROUTER


async def refresh_shared_budgets(app: web.Application) -> None:
    router = app.get(ROUTER)
    if router is None:
        return
    clients = [u.registry.client for u in router.upstreams.values()
               if isinstance(u.registry, ProxyRegistry) and u.registry.client.shared is not None]
    if clients:
        await asyncio.gather(*(client.refresh_shared_budget() for client in clients))
