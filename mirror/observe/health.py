"""`/livez` and `/readyz`: whether the process serves, and whether it can do its job right now.

Liveness is only "the event loop answers": restarting a mirror whose upstream is down would make things
worse. Readiness checks what a pull needs — the storage is writable, the blob index answers, each upstream
answers `/v2/` — in parallel, each with a timeout, and says which failed (the shape Harbor uses:
`{status, components: [{name, status, error}]}`). Upstream probes are remembered for a few seconds so a
load balancer polling every second does not become traffic to Docker Hub.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from mirror.state import CACHE, CONFIG, ROUTER

CHECK_TIMEOUT_SECONDS = 3.0
UPSTREAM_PROBE_TTL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    error: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "status": "healthy" if self.ok else "unhealthy"}
        if self.error:
            out["error"] = self.error
        return out


class UpstreamProbe:
    """The last answer of one upstream's `/v2/` (any HTTP answer, 401 included, means it is reachable)."""

    def __init__(self, name: str, url: str, session: aiohttp.ClientSession, ttl: float) -> None:
        self.name = name
        self.ttl = ttl
        self.url = url.rstrip("/") + "/v2/"
        self.session = session
        self._checked_at = 0.0
        self._result: CheckResult | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> CheckResult:
        async with self._lock:
            if self._result is not None and time.monotonic() - self._checked_at < self.ttl:
                return self._result
            self._result = await self._probe()
            self._checked_at = time.monotonic()
            return self._result

    async def _probe(self) -> CheckResult:
        name = f"upstream:{self.name}"
        try:
            timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_SECONDS)
            async with self.session.get(self.url, timeout=timeout, allow_redirects=False) as response:
                if response.status >= 500:
                    return CheckResult(name, False, f"{self.url} answered {response.status}")
                return CheckResult(name, True)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return CheckResult(name, False, f"{self.url}: {type(exc).__name__} {exc}".strip())


async def _storage_writable(root: str) -> CheckResult:
    def probe() -> None:
        # A real write, not an access() check: root ignores permission bits, and a filesystem remounted
        # read-only or full is exactly what must be caught.
        path = os.path.join(root, "tmp", f"readyz-{uuid.uuid4().hex}.part")
        with open(path, "wb") as handle:
            handle.write(b"ok")
        os.unlink(path)

    try:
        await asyncio.to_thread(probe)
        return CheckResult("storage", True)
    except OSError as exc:
        return CheckResult("storage", False, f"{exc.strerror or exc} ({root})")


async def _timed(name: str, check: Awaitable[CheckResult]) -> CheckResult:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return CheckResult(name, False, f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s")


HEALTH: web.AppKey[HealthChecks] = web.AppKey("health")


class HealthChecks:
    """App-owned: the probes of the upstreams, and the checks `/readyz` runs."""

    def __init__(self, app: web.Application, *, upstream_ttl: float = UPSTREAM_PROBE_TTL_SECONDS) -> None:
        self.app = app
        self.upstream_ttl = upstream_ttl
        self._probes: dict[str, UpstreamProbe] = {}

    def _upstream_probes(self) -> list[UpstreamProbe]:
        router = self.app.get(ROUTER)
        if router is None:
            return []
        probes = []
        for name, upstream in router.upstreams.items():
            client = getattr(upstream.registry, "client", None)
            if client is None or client.config.offline:
                continue  # an offline upstream is never contacted, so it cannot be "down"
            probe = self._probes.get(name)
            if probe is None:
                probe = self._probes[name] = UpstreamProbe(name, client.config.url, client.session, self.upstream_ttl)
            probes.append(probe)
        return probes

    async def _index_answers(self) -> CheckResult:
        cache = self.app.get(CACHE)
        if cache is None:
            return CheckResult("index", False, "not open yet")
        try:
            await asyncio.to_thread(cache.index.get, "sha256:" + "0" * 64)
            return CheckResult("index", True)
        except Exception as exc:  # noqa: BLE001 - any failure of the index is what this check reports
            return CheckResult("index", False, f"{type(exc).__name__}: {exc}")

    async def run(self) -> list[CheckResult]:
        root = str(self.app[CONFIG].storage.path)
        checks: list[tuple[str, Callable[[], Awaitable[CheckResult]]]] = [
            ("storage", lambda: _storage_writable(root)),
            ("index", self._index_answers),
        ]
        checks += [(f"upstream:{probe.name}", probe.check) for probe in self._upstream_probes()]
        return list(await asyncio.gather(*(_timed(name, make()) for name, make in checks)))


async def livez(request: web.Request) -> web.Response:
    request["endpoint"] = "livez"
    return web.json_response({"status": "ok"})


def readyz_handler(checks: HealthChecks) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(request: web.Request) -> web.Response:
        request["endpoint"] = "readyz"
        results = await checks.run()
        healthy = all(result.ok for result in results)
        body = {
            "status": "healthy" if healthy else "unhealthy",
            "components": [result.to_json() for result in results],
        }
        return web.json_response(body, status=200 if healthy else 503)

    return readyz
