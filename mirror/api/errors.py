"""Every response speaks the registry dialect: API version header, and `{"errors": [...]}` on failure."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.errors import RegistryError

log = logging.getLogger(__name__)

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


def error_response(error: RegistryError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=json.dumps(error.to_json()).encode(),
        content_type="application/json",
    )
    response.headers.update(error.headers)
    return response


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
    except ConnectionResetError:
        raise
    except Exception:  # noqa: BLE001 - the catch-all that keeps tracebacks in the log, not on the wire
        log.exception("unhandled error serving %s %s", request.method, request.path)
        body = {"errors": [{"code": "UNKNOWN", "message": "internal server error"}]}
        return web.json_response(body, status=500)


def _passthrough_headers(error: web.HTTPException) -> dict[str, str]:
    keep = ("Allow", "WWW-Authenticate", "Retry-After", "Location")
    return {k: v for k, v in error.headers.items() if k in keep}


async def add_api_version(_request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: stamp every response, file and streamed ones included."""
    response.headers[API_VERSION_HEADER] = API_VERSION
