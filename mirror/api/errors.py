"""Every response speaks the registry dialect: API version header, and `{"errors": [...]}` on failure."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.errors import RegistryError, StorageFull, is_disk_full

log = logging.getLogger(__name__)

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
# nginx's "client closed request": the status label of a request whose connection went away before its
# response was complete. No client ever receives it.
CLIENT_CLOSED_STATUS = 499
_CLIENT_CLOSED = "mirror.client_closed"


def error_response(error: RegistryError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=json.dumps(error.to_json()).encode(),
        content_type="application/json",
    )
    response.headers.update(error.headers)
    return response


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the client's connection is closed (or closing): nothing sent now would reach it."""
    transport = request.transport
    return transport is None or transport.is_closing()


def note_client_closed(request: web.Request) -> None:
    """Record that the client left before its response was complete (counted as 499, not by its status)."""
    request[_CLIENT_CLOSED] = True


def client_closed(request: web.Request) -> bool:
    return bool(request.get(_CLIENT_CLOSED))


@web.middleware
async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render domain errors; never let a traceback reach a client."""
    try:
        return await handler(request)
    except RegistryError as error:
        return error_response(error)
    except web.HTTPException as http_error:
        if http_error.status >= 400 and http_error.content_type != "application/json":
            # aiohttp's own answers (bad method, body too large) also get a registry error body.
            code = {404: "NOT_FOUND", 405: "UNSUPPORTED", 413: "SIZE_INVALID"}.get(http_error.status, "UNKNOWN")
            body = {"errors": [{"code": code, "message": http_error.reason}]}
            return web.json_response(body, status=http_error.status, headers=_passthrough_headers(http_error))
        raise
    except ConnectionError as exc:
        if not client_gone(request):
            # A reset of some other connection (an upstream's) that no layer below turned into a registry
            # error: a bug, and the client is still waiting for an answer.
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _internal_error()
        # The client hung up (mid-body, or while its response was being sent): nobody is left to answer,
        # and nothing went wrong on our side. A response is still returned, for the metrics and the access
        # log; writing it to the closed connection fails quietly inside aiohttp.
        log.debug("client left during %s %s: %r", request.method, request.path, exc)
        note_client_closed(request)
        return web.Response(status=CLIENT_CLOSED_STATUS)
    except OSError as exc:
        if not is_disk_full(exc):
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _internal_error()
        # Every write on the way (a tag, a manifest link, an upload's session file) removes its own partial
        # file when it fails; what is left to do is the same clean 503 the blob path gives.
        log.warning("disk full serving %s %s: %s", request.method, request.path, exc.strerror)
        return error_response(StorageFull("no space left on the registry's disk"))
    except Exception:  # noqa: BLE001 - the catch-all that keeps tracebacks in the log, not on the wire
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _internal_error()


def _internal_error() -> web.Response:
    return web.json_response({"errors": [{"code": "UNKNOWN", "message": "internal server error"}]}, status=500)


def _passthrough_headers(error: web.HTTPException) -> dict[str, str]:
    keep = ("Allow", "WWW-Authenticate", "Retry-After", "Location")
    return {k: v for k, v in error.headers.items() if k in keep}


async def add_api_version(_request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: stamp every response, file and streamed ones included."""
    response.headers[API_VERSION_HEADER] = API_VERSION
