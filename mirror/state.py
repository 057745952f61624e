"""Typed keys for what the application owns; handlers reach shared resources only through these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from mirror.cache.manager import CacheManager
    from mirror.config import Config
    from mirror.coordination.interface import Coordinator
    from mirror.metrics import Metrics
    from mirror.proxy.peers import ClusterFills
    from mirror.routing import Router

CONFIG: web.AppKey[Config] = web.AppKey("config")
ROUTER: web.AppKey[Router] = web.AppKey("router")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
CACHE: web.AppKey[CacheManager] = web.AppKey("cache")
COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
CLUSTER_FILLS: web.AppKey[ClusterFills] = web.AppKey("cluster_fills")  # only on a node that shares fills
