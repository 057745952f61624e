"""`create_app(config)`: the aiohttp application that owns every long-lived resource."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.errors import add_api_version, registry_errors
from mirror.api.routes import api_dispatcher
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.routing import Router
from mirror.state import CONFIG, METRICS, ROUTER
from mirror.storage.blobs import BlobStore
from mirror.storage.local import LocalRegistry
from mirror.storage.repos import RepoStore
from mirror.storage.uploads import UploadStore

log = logging.getLogger(__name__)

STORES: web.AppKey[BlobStore] = web.AppKey("blob_store")


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
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[count_requests, registry_errors])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app.on_response_prepare.append(add_api_version)
    app.cleanup_ctx.append(_storage)
    dispatcher = api_dispatcher()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_route("*", "/v2{tail:.*}", dispatcher.handle)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Open the stores, recover from an interrupted previous run, and build the router."""
    config = app[CONFIG]
    root = config.storage.path
    blobs, local_repos, uploads = await asyncio.to_thread(_open_stores, config)
    removed_temps = await asyncio.to_thread(blobs.remove_stale_temps_sync, config.storage.temp_grace)
    removed_uploads = await asyncio.to_thread(uploads.remove_stale_sync, config.storage.temp_grace)
    if removed_temps or removed_uploads:
        log.info("start-up recovery: removed %d stale temp files and %d stale uploads", removed_temps, removed_uploads)
    local = LocalRegistry(
        blobs,
        local_repos,
        uploads,
        manifest_limit=config.limits.manifest_bytes,
        allow_delete=config.storage.delete,
    )
    app[STORES] = blobs
    app[ROUTER] = Router(local, {}, None, config.local.repositories)
    log.info("storage at %s", root.resolve())
    yield


def _open_stores(config: Config) -> tuple[BlobStore, RepoStore, UploadStore]:
    root = config.storage.path
    blobs = BlobStore(root)
    return blobs, RepoStore(root / "repositories"), UploadStore(root, blobs)
