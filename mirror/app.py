"""`create_app(config)`: the aiohttp application that owns every long-lived resource."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.errors import CLIENT_CLOSED_STATUS, add_api_version, client_closed, registry_errors
from mirror.api.peer_fills import serve_peer_fill
from mirror.api.protocol_log import handler_args as protocol_handler_args
from mirror.api.replication import add_replication_routes
from mirror.api.routes import api_dispatcher
from mirror.auth.install import install_access_control
from mirror.cache.index import BlobIndex
from mirror.cache.maintenance import read_stats
from mirror.cache.manager import CacheManager
from mirror.config import Config
from mirror.coordination.factory import open_coordinator
from mirror.metrics import Metrics
from mirror.observe.budgets import refresh_shared_budgets
from mirror.observe.health import HEALTH, HealthChecks, livez, readyz_handler
from mirror.observe.requests import PULL_STATS, PullStats, observe_requests
from mirror.observe.status import StatusPage
from mirror.proxy.fills import FillManager
from mirror.proxy.peers import PEER_FILL_ROUTE, ClusterFills
from mirror.proxy.registry import ProxyRegistry
from mirror.replication.hosting import replication_context
from mirror.routing import Router, Upstream
from mirror.state import CACHE, CLUSTER_FILLS, CONFIG, COORDINATOR, METRICS, ROUTER
from mirror.storage.blobs import BlobStore
from mirror.storage.local import LocalRegistry
from mirror.storage.metadata import FsMetadataStore, MetadataStore, UploadSessions
from mirror.storage.repos import RepoStore
from mirror.storage.uploads import UploadStore
from mirror.upstream.blocking import BlockingPool
from mirror.upstream.client import KEEPALIVE_SECONDS, USER_AGENT, UpstreamClient, tls_context

if TYPE_CHECKING:
    from mirror.storage.s3 import S3BlobBackend  # aiobotocore: the optional s3 extra

log = logging.getLogger(__name__)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        # A client that left before its response was complete is counted as such, not by the status line
        # it never read whole (a streamed 200 cut short, a PUT whose body stopped coming).
        status = CLIENT_CLOSED_STATUS if client_closed(request) else response.status
        return response
    except web.HTTPException as http_error:
        status = http_error.status
        raise
    except asyncio.CancelledError:
        # Handlers are cancelled only when their connection is gone for good (shutdown, or aiohttp's
        # handler cancellation): no status was sent.
        status = CLIENT_CLOSED_STATUS
        raise
    finally:
        endpoint = request.get("endpoint", "other")
        metrics = request.app[METRICS]
        metrics.http_requests.labels(endpoint, request.method, str(status)).inc()
        metrics.http_seconds.labels(endpoint, request.method).observe(time.perf_counter() - started)


async def serve_metrics(request: web.Request) -> web.Response:
    request["endpoint"] = "metrics"
    await refresh_shared_budgets(request.app)
    body, content_type = await asyncio.to_thread(request.app[METRICS].render)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def create_app(config: Config) -> web.Application:
    metrics = Metrics(created_series=config.metrics.created_series)
    app = web.Application(
        middlewares=[count_requests, observe_requests, registry_errors],
        # What aiohttp's connection handler logs (requests it cannot parse, clients gone mid-response)
        # goes through a logger of this app's, not aiohttp's module-level one.
        handler_args=protocol_handler_args(metrics.http_malformed.inc),
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[PULL_STATS] = PullStats()
    if config.storage.max_size is not None:
        metrics.cache_max_bytes.set(config.storage.max_size)
    metrics.add_filesystem(config.storage.path)
    app.on_response_prepare.append(add_api_version)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(replication_context)  # after the stores it copies between, closed before them
    dispatcher = api_dispatcher()
    install_access_control(app, config, dispatcher)
    health = app[HEALTH] = HealthChecks(app)
    # Health and the status page come before the registry routes, and (with access control) before auth:
    # a load balancer or an operator must reach them without credentials.
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz_handler(health))
    app.router.add_get("/", StatusPage(health).handle)
    app.router.add_get("/metrics", serve_metrics)
    add_replication_routes(app)
    if config.cluster is not None and config.cluster.shares_fills:
        # Outside /v2 and before it: never behind client access control (the cluster secret guards it).
        app.router.add_get(PEER_FILL_ROUTE, serve_peer_fill)
    app.router.add_route("*", "/v2{tail:.*}", dispatcher.handle)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Open the stores, recover from an interrupted previous run, connect upstreams, build the router."""
    config = app[CONFIG]
    metrics = app[METRICS]
    blobs, local_repos, uploads = await asyncio.to_thread(_open_stores, config)
    removed_temps = await asyncio.to_thread(blobs.remove_stale_temps_sync, config.storage.temp_grace)
    # The same age as the run-time expiry: a restart must not end a push session `uploads.expire` still allows.
    removed_uploads = await asyncio.to_thread(uploads.remove_stale_sync, config.uploads.expire)
    # Opening the index is quick whatever its size; checking it against the files is not (a scan of every
    # blob and link): that runs in the background while requests are served (CacheManager.reconcile).
    index = await asyncio.to_thread(BlobIndex, config.storage.path / "index", migrate=False)
    if removed_temps or removed_uploads:
        log.info("start-up recovery: removed %d stale temp files and %d stale uploads", removed_temps, removed_uploads)
    metrics.add_maintenance_stats(functools.partial(read_stats, config.storage.path))
    # In-process unless `cluster.redis` is configured; started (a Redis PING) inside the exit stack below.
    coordinator = open_coordinator(config.cluster)
    app[COORDINATOR] = coordinator
    cache = CacheManager(index, blobs, config.storage, metrics, reconciled=False, coordinator=coordinator)
    await cache.refresh_totals()
    app[CACHE] = cache
    fills = FillManager(metrics)
    # A cluster node with an address and a secret shares its fills (mirror/proxy/peers.py); any other
    # node downloads for itself, through exactly the single-node path.
    peers = None
    if config.cluster is not None and config.cluster.shares_fills:
        peers = app[CLUSTER_FILLS] = ClusterFills(config.cluster, coordinator, fills, blobs)
    local_hint = ", ".join(config.local.repositories) or "none configured"
    # One TLS context per CA file, shared by the upstreams that trust it (loading one costs ~60 ms of
    # start-up); none for the system's CAs, see tls_context.
    tls_by_ca_file: dict[Path | None, ssl.SSLContext | None] = {}
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(coordinator.close)  # closed last: everything below may still use it
        await coordinator.start()
        if peers is not None:
            stack.callback(peers.close)
        backend = await _open_blob_backend(config)
        if backend is not None:
            stack.push_async_callback(backend.close)
        meta, sessions = _local_metadata(local_repos, uploads, backend, config)
        stack.push_async_callback(meta.close)
        local = LocalRegistry(
            blobs,
            meta,
            sessions,
            manifest_limit=config.limits.manifest_bytes,
            allow_delete=config.storage.delete,
            cache=cache,
            coordinator=coordinator,
            backend=backend,
            disk_tier=not (config.storage.s3 is not None and config.storage.s3.presign),
        )
        stack.callback(local.close)
        shared_pool = None
        if backend is not None and config.upstreams:
            # The pull-through cache's shared tier (mirror/proxy/shared_cache.py): blobs other nodes filled
            # are read from the bucket through this pool, as fills read an upstream's body.
            shared_pool = BlockingPool(user_agent=USER_AGENT, timeout=30.0)
            stack.callback(shared_pool.close)
        upstreams: dict[str, Upstream] = {}
        for upstream_config in config.upstreams:
            # One session per upstream: its own connection pool and limits. Bytes are passed through
            # exactly as sent (no transparent decompression), or digests would not match.
            if upstream_config.ca_file not in tls_by_ca_file:
                tls_by_ca_file[upstream_config.ca_file] = tls_context(upstream_config)
            tls = tls_by_ca_file[upstream_config.ca_file]
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    auto_decompress=False,
                    read_bufsize=256 << 10,
                    connector=aiohttp.TCPConnector(
                        limit=64, ttl_dns_cache=300, ssl=tls if tls is not None else True,
                        keepalive_timeout=KEEPALIVE_SECONDS,
                    ),
                    headers={"User-Agent": USER_AGENT},
                )
            )
            # A cluster node shares tags, tokens and the rate-limit budget through the coordinator.
            shared = coordinator if config.cluster is not None else None
            client = UpstreamClient(upstream_config, session, metrics, tls=tls, shared=shared)
            stack.callback(client.close)
            cache_repos = await asyncio.to_thread(RepoStore, config.storage.path / "cache" / upstream_config.name)
            shared_tier = None
            if backend is not None and shared_pool is not None:
                from mirror.proxy.shared_cache import SharedCache

                shared_tier = SharedCache(
                    upstream_config.name, backend, shared_pool, coordinator, metrics,
                    max_bytes=config.storage.s3.cache_max_size if config.storage.s3 else None,
                )
                stack.push_async_callback(shared_tier.close)
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
                peers=peers,
                shared_tags=shared,
                shared=shared_tier,
            )
            proxy.on_fill = app[PULL_STATS].record_fill
            stack.push_async_callback(proxy.close)
            upstreams[upstream_config.name] = Upstream(upstream_config.name, proxy, upstream_config.library_prefix)
        default = config.default_upstream
        app[ROUTER] = Router(local, upstreams, default.name if default else None, config.local.repositories)
        log.info("storage at %s; upstreams: %s", config.storage.path.resolve(), ", ".join(upstreams) or "none")
        # Closed in reverse: running fills first, then cache maintenance (which saves last-access times),
        # the index, and last the upstream sessions the fills were using.
        stack.callback(index.close)
        await stack.enter_async_context(cache.running(local_repos))
        stack.push_async_callback(fills.close)
        await stack.enter_async_context(_expiring_uploads(sessions, config, metrics))
        yield


def _local_metadata(
    repos: RepoStore, uploads: UploadStore, backend: S3BlobBackend | None, config: Config
) -> tuple[MetadataStore, UploadSessions]:
    """Where local repositories keep links, tags and upload sessions: the files under storage.path, or
    (storage.backend: s3) the bucket, which every node on it then shares."""
    if backend is None:
        return FsMetadataStore(repos), uploads
    from mirror.storage.s3_meta import S3MetadataStore
    from mirror.storage.s3_objects import S3Objects
    from mirror.storage.s3_uploads import S3UploadSessions

    objects = S3Objects(backend.client, backend.bucket)
    return S3MetadataStore(objects), S3UploadSessions(objects, backend, max_bytes=config.uploads.max_bytes)


async def _open_blob_backend(config: Config) -> S3BlobBackend | None:
    """The S3 bucket local repositories live in (storage.backend: s3), checked with a HEAD before serving: a
    node that cannot reach its bucket must not accept pushes. None: the filesystem, as always."""
    if config.storage.backend != "s3" or config.storage.s3 is None:
        return None
    from mirror.storage.s3 import S3BlobBackend, settings_from_config  # aiobotocore: the optional s3 extra

    backend = await S3BlobBackend.open(settings_from_config(config.storage.s3))
    try:
        await backend.check()
    except BaseException:
        await backend.close()
        raise
    log.info("local repositories live in S3 bucket %s at %s", backend.bucket, backend.settings.endpoint or "AWS")
    return backend


def _expiring_uploads(
    uploads: UploadSessions, config: Config, metrics: Metrics
) -> AbstractAsyncContextManager[None]:
    """Abandoned push sessions are removed after `uploads.expire` while the server runs, not at its next start."""
    metrics.uploads_open_bytes.set_function(lambda: uploads.open_bytes)

    def expired(sessions: int, freed: int) -> None:
        metrics.uploads_expired.inc(sessions)
        log.info(
            "removed %d upload sessions idle for more than %.0f s (%d bytes)", sessions, config.uploads.expire, freed
        )

    return uploads.expiring(config.uploads.expire, expired)


def _open_stores(config: Config) -> tuple[BlobStore, RepoStore, UploadStore]:
    root = config.storage.path
    blobs = BlobStore(root)
    return blobs, RepoStore(root / "repositories"), UploadStore(root, blobs, max_bytes=config.uploads.max_bytes)
