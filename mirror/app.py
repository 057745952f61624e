"""`create_app(config)`: the aiohttp application that owns every long-lived resource."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.errors import add_api_version, registry_errors
from mirror.api.replication import add_replication_routes
from mirror.api.routes import api_dispatcher
from mirror.auth.install import install_access_control
from mirror.cache.index import BlobIndex
from mirror.cache.maintenance import read_stats
from mirror.cache.manager import CacheManager, reconcile_sync
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.proxy.fills import FillManager
from mirror.proxy.registry import ProxyRegistry
from mirror.replication.engine import replication_context
from mirror.routing import Router, Upstream
from mirror.state import CACHE, CONFIG, METRICS, ROUTER
from mirror.storage.blobs import BlobStore
from mirror.storage.local import LocalRegistry
from mirror.storage.repos import RepoStore
from mirror.storage.uploads import UploadStore
from mirror.upstream.client import USER_AGENT, UpstreamClient, tls_context

log = logging.getLogger(__name__)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as http_error:
        status = http_error.status
        raise
    finally:
        endpoint = request.get("endpoint", "other")
        metrics = request.app[METRICS]
        metrics.http_requests.labels(endpoint, request.method, str(status)).inc()
        metrics.http_seconds.labels(endpoint, request.method).observe(time.perf_counter() - started)


async def serve_metrics(request: web.Request) -> web.Response:
    body, content_type = await asyncio.to_thread(request.app[METRICS].render)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[count_requests, registry_errors])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app.on_response_prepare.append(add_api_version)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(replication_context)  # after the stores it copies between, closed before them
    dispatcher = api_dispatcher()
    install_access_control(app, config, dispatcher)
    app.router.add_get("/metrics", serve_metrics)
    add_replication_routes(app)
    app.router.add_route("*", "/v2{tail:.*}", dispatcher.handle)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Open the stores, recover from an interrupted previous run, connect upstreams, build the router."""
    config = app[CONFIG]
    metrics = app[METRICS]
    blobs, local_repos, uploads = await asyncio.to_thread(_open_stores, config)
    removed_temps = await asyncio.to_thread(blobs.remove_stale_temps_sync, config.storage.temp_grace)
    removed_uploads = await asyncio.to_thread(uploads.remove_stale_sync, config.storage.temp_grace)
    index = await asyncio.to_thread(BlobIndex, config.storage.path / "index")
    dropped, indexed = await asyncio.to_thread(reconcile_sync, index, blobs, local_repos)
    if removed_temps or removed_uploads or dropped or indexed:
        log.info(
            "start-up recovery: removed %d stale temp files and %d stale uploads; index: dropped %d rows "
            "without files, indexed %d files without rows",
            removed_temps, removed_uploads, dropped, indexed,
        )
    metrics.add_maintenance_stats(functools.partial(read_stats, config.storage.path))
    cache = CacheManager(index, blobs, config.storage, metrics)
    await cache.refresh_totals()
    app[CACHE] = cache
    local = LocalRegistry(
        blobs,
        local_repos,
        uploads,
        manifest_limit=config.limits.manifest_bytes,
        allow_delete=config.storage.delete,
        cache=cache,
    )
    fills = FillManager(metrics)
    local_hint = ", ".join(config.local.repositories) or "none configured"
    async with contextlib.AsyncExitStack() as stack:
        upstreams: dict[str, Upstream] = {}
        for upstream_config in config.upstreams:
            # One session per upstream: its own connection pool and limits. Bytes are passed through
            # exactly as sent (no transparent decompression), or digests would not match.
            tls = tls_context(upstream_config)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    auto_decompress=False,
                    read_bufsize=256 << 10,
                    connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300, ssl=tls),
                    headers={"User-Agent": USER_AGENT},
                )
            )
            client = UpstreamClient(upstream_config, session, metrics, tls=tls)
            stack.callback(client.close)
            cache_repos = await asyncio.to_thread(RepoStore, config.storage.path / "cache" / upstream_config.name)
            proxy = ProxyRegistry(
                client,
                blobs,
                cache_repos,
                fills,
                metrics,
                cache,
                tag_ttl=upstream_config.tag_ttl,
                manifest_limit=config.limits.manifest_bytes,
                read_only_message=(
                    f"repositories routed to {upstream_config.name} are mirrored read-only; "
                    f"push to a local namespace ({local_hint})"
                ),
            )
            stack.push_async_callback(proxy.close)
            upstreams[upstream_config.name] = Upstream(upstream_config.name, proxy, upstream_config.library_prefix)
        default = config.default_upstream
        app[ROUTER] = Router(local, upstreams, default.name if default else None, config.local.repositories)
        log.info("storage at %s; upstreams: %s", config.storage.path.resolve(), ", ".join(upstreams) or "none")
        # Closed in reverse: running fills first, then cache maintenance (which saves last-access times),
        # the index, and last the upstream sessions the fills were using.
        stack.callback(index.close)
        await stack.enter_async_context(cache.running())
        stack.push_async_callback(fills.close)
        yield


def _open_stores(config: Config) -> tuple[BlobStore, RepoStore, UploadStore]:
    root = config.storage.path
    blobs = BlobStore(root)
    return blobs, RepoStore(root / "repositories"), UploadStore(root, blobs)
