"""Matches `/v2/...` request targets to handlers.

Repository names contain slashes, so aiohttp's router cannot split them from the rest of the path. We match
the raw, undecoded request target: `%2e%2e` or `..` in a name is then just an invalid name (400), and
nothing decoded from the URL ever reaches a filesystem path without validation.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from mirror.errors import RegistryError, Unsupported
from mirror.oci.names import validate_name

Params = dict[str, str]
Handler = Callable[[web.Request, Params], Awaitable[web.StreamResponse]]


class EndpointNotFound(RegistryError):
    code, status, default_message = "NOT_FOUND", 404, "no such endpoint"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # stable label for metrics and logs
    pattern: re.Pattern[str]
    methods: Mapping[str, Handler]


class Dispatcher:
    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints

    def match(self, raw_path: str) -> tuple[Endpoint, Params] | None:
        path = raw_path.split("?", 1)[0]
        for endpoint in self.endpoints:
            found = endpoint.pattern.fullmatch(path)
            if found:
                params = {k: v for k, v in found.groupdict().items() if v is not None}
                return endpoint, params
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        matched = self.match(request.raw_path)
        if matched is None:
            raise EndpointNotFound(detail={"path": request.raw_path.split("?", 1)[0][:300]})
        endpoint, params = matched
        request["endpoint"] = endpoint.name
        method = "GET" if request.method == "HEAD" and "HEAD" not in endpoint.methods else request.method
        handler = endpoint.methods.get(method)
        if handler is None:
            raise Unsupported(
                f"{request.method} is not supported on this endpoint",
                headers={"Allow": ", ".join(sorted(endpoint.methods))},
            )
        if "name" in params:
            validate_name(params["name"])
        for key in ("reference", "digest", "upload_id"):
            if key in params:
                params[key] = unquote(params[key])
        return await handler(request, params)


def route(pattern: str) -> re.Pattern[str]:
    """Compile a path pattern where {name} is a repository name and {x} one path segment."""
    regex = pattern.replace("{name}", r"(?P<name>.+?)")
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]*)", regex)
    return re.compile(regex)
