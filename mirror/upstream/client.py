"""One upstream registry: its HTTP session, tokens, redirects, retries and rate-limit bookkeeping.

`open()` returns a response whose body the caller streams; retries happen only while opening (before a
single byte could have reached a client). 5xx, timeouts and refused connections become
UpstreamUnavailable, 429 becomes TooManyRequests with the upstream's Retry-After, so the proxy can decide
between stale content and an error that makes Docker and containerd move on quickly.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from aiocache import SimpleMemoryCache
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from mirror.config import UpstreamConfig
from mirror.errors import TooManyRequests, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.upstream.auth import Challenge, RealmPolicy, RealmRefused, parse_challenge
from mirror.upstream.blocking import BlockingPool, BlockingResponse

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
RETRY_ATTEMPTS = 3
TOKEN_DEFAULT_SECONDS = 60
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


USER_AGENT = "mirror/0.1"


class _Retryable(Exception):
    """A failure worth another attempt (connection refused, timeout, 5xx)."""


class _Response(Protocol):
    """What auth, redirects and retries need of a response, from aiohttp or from BlockingPool."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def release(self) -> object: ...


R = TypeVar("R", bound=_Response)
_Sender = Callable[[str, str, dict[str, str]], Awaitable[R]]


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    """What to trust for this upstream's certificates: its `ca_file`, or the system's CAs. One context
    serves both transports (aiohttp for requests, BlockingPool for blob bodies), so they agree."""
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


class UpstreamClient:
    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.session = session
        self.metrics = metrics
        self.policy = RealmPolicy(config.url, config.auth_hosts)
        # Tokens live for their `expires_in`; nothing about them needs to survive a restart.
        self.tokens = SimpleMemoryCache()
        self._base = urlsplit(config.url)
        # One token request per scope at a time: concurrent requests that hit the same 401 (parallel layer
        # pulls, a token expiring under many clients) wait for the first one's token. One lock per scope
        # ever used: bounded by the repositories pulled, a few hundred bytes each.
        self._token_locks: dict[str, asyncio.Lock] = {}
        # The upstream answered a Basic challenge: send the credentials up front from then on, instead of
        # paying a 401 round trip on every request.
        self._basic_challenged = False
        # Blob bodies are read from threads (see mirror.upstream.blocking): their own connections.
        self.blocking = BlockingPool(user_agent=USER_AGENT, timeout=config.timeout, tls=tls or tls_context(config))

    def close(self) -> None:
        self.blocking.close()

    # -- public ------------------------------------------------------------------------------------
    async def open(
        self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """Send a request (auth, redirects and retries handled); the caller releases the response."""
        return await self._open(method, path, scope, headers, self._send_aiohttp)

    async def open_blocking(
        self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None
    ) -> BlockingResponse:
        """Like open(), for a blob whose body is read from threads (mirror.proxy.download): the same auth,
        redirect policy, retries and rate-limit bookkeeping, over blocking connections."""
        return await self._open(method, path, scope, headers, self._send_blocking)

    async def _open(
        self, method: str, path: str, scope: str, headers: Mapping[str, str] | None, send: _Sender[R]
    ) -> R:
        if self.config.offline:
            raise UpstreamUnavailable(f"upstream {self.name} is configured offline")
        retrying = AsyncRetrying(
            # Retries are for failures that come quickly (refused, reset, 5xx). Once `timeout` has been
            # spent, a client waiting for us is better served by an error now (it moves on to its next
            # endpoint) than by up to RETRY_ATTEMPTS times the timeout.
            stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(self.config.timeout),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._open_once(method, path, scope, dict(headers or {}), send)
        except _Retryable as exc:
            self.metrics.upstream_errors.labels(self.name, "unavailable").inc()
            raise UpstreamUnavailable(f"upstream {self.name} unavailable: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    # -- one attempt -------------------------------------------------------------------------------
    async def _open_once(self, method: str, path: str, scope: str, headers: dict[str, str], send: _Sender[R]) -> R:
        url = f"{self.config.url}{path}"
        sent = await self._known_authorization(scope)
        if sent:
            headers["Authorization"] = sent
        response = await self._follow(method, url, headers, send)
        if response.status == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            try:
                authorization = await self._authorize(challenge, scope, rejected=sent) if challenge else None
            except BaseException:
                response.release()
                raise
            # With nothing new to offer, this 401 is the answer: sending the same request again would only
            # cost another upstream request (and, on Docker Hub, maybe a pull from the rate limit).
            if authorization is not None and authorization != sent:
                response.release()
                headers["Authorization"] = authorization
                response = await self._follow(method, url, headers, send)
        self._record(method, response)
        if response.status == 429:
            retry_after = response.headers.get("Retry-After", "60")
            response.release()
            self.metrics.upstream_errors.labels(self.name, "rate_limited").inc()
            raise TooManyRequests(
                f"upstream {self.name} rate limit reached", headers={"Retry-After": retry_after}
            )
        if response.status in _RETRYABLE_STATUS:
            response.release()
            raise _Retryable(f"HTTP {response.status}")
        return response

    async def _follow(self, method: str, url: str, headers: dict[str, str], send: _Sender[R]) -> R:
        """Send, following redirects ourselves: Authorization never travels to another host."""
        for _ in range(MAX_REDIRECTS + 1):
            response = await send(method, url, headers)
            if response.status not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            target = urljoin(url, response.headers["Location"])
            response.release()
            try:
                self.policy.check_redirect(target)
            except RealmRefused as exc:
                self.metrics.upstream_errors.labels(self.name, "redirect_refused").inc()
                raise UpstreamUnavailable(f"upstream {self.name}: {exc}") from exc
            if urlsplit(target).netloc != urlsplit(url).netloc:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise UpstreamUnavailable(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    async def _send_aiohttp(self, method: str, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.timeout, sock_connect=self.config.timeout, sock_read=self.config.timeout
        )
        try:
            return await self.session.request(method, url, headers=headers, allow_redirects=False, timeout=timeout)
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    async def _send_blocking(self, method: str, url: str, headers: dict[str, str]) -> BlockingResponse:
        try:
            return await self.blocking.request(method, url, headers)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, garbled
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    async def _known_authorization(self, scope: str) -> str | None:
        """What to send before any challenge: a cached token for the scope, or Basic once it was asked for."""
        token = await self.tokens.get(scope)
        if token:
            return str(token)
        credentials = self._basic_credentials()
        return f"Basic {credentials}" if credentials and self._basic_challenged else None

    async def _authorize(self, challenge: Challenge, scope: str, *, rejected: str | None) -> str | None:
        """Turn a 401 challenge into an Authorization header value, caching Bearer tokens per scope.

        `rejected` is what the refused request carried: a cached token that differs from it was fetched
        by another request meanwhile and is used as is, so an expired token is refreshed once.
        """
        credentials = self._basic_credentials()
        if challenge.scheme == "basic":
            if not credentials:
                return None
            self._basic_challenged = True
            return f"Basic {credentials}"
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            current = await self.tokens.get(scope)
            if current and current != rejected:
                return str(current)
            return await self._fetch_token(challenge, scope)

    async def _fetch_token(self, challenge: Challenge, scope: str) -> str | None:
        """Ask the challenge's realm for a token, if the realm policy lets us go there at all."""
        credentials = self._basic_credentials()
        try:
            send_credentials = self.policy.check(challenge.realm)
        except RealmRefused as exc:
            log.warning("upstream %s: %s", self.name, exc)
            self.metrics.upstream_errors.labels(self.name, "realm_refused").inc()
            return None
        query = {"scope": challenge.params.get("scope") or scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        token_headers = {}
        if credentials and send_credentials:
            token_headers["Authorization"] = f"Basic {credentials}"
        separator = "&" if "?" in challenge.realm else "?"
        token_url = f"{challenge.realm}{separator}{urlencode(query)}"
        try:
            async with self.session.get(
                token_url,
                headers=token_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            ) as token_response:
                self.metrics.upstream_requests.labels(self.name, "TOKEN", str(token_response.status)).inc()
                # A token service that is down or rate limiting is the upstream being down: the proxy must
                # see UpstreamUnavailable / TooManyRequests (stale cache, 503, 429), not an unanswered 401
                # that reads as "no such manifest" and turns cached tags into 404s.
                if token_response.status == 429:
                    self.metrics.upstream_errors.labels(self.name, "rate_limited").inc()
                    raise TooManyRequests(
                        f"upstream {self.name} token service rate limit reached",
                        headers={"Retry-After": token_response.headers.get("Retry-After", "60")},
                    )
                if token_response.status in _RETRYABLE_STATUS:
                    raise _Retryable(f"token endpoint: HTTP {token_response.status}")
                if token_response.status != 200:
                    log.warning("upstream %s: token endpoint answered %d", self.name, token_response.status)
                    return None
                data = json.loads(await token_response.read())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise _Retryable(f"token endpoint: {exc}") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            return None
        expires_in = data.get("expires_in")
        lifetime = expires_in if isinstance(expires_in, int) and expires_in > 0 else TOKEN_DEFAULT_SECONDS
        authorization = f"Bearer {token}"
        # Renew a little early so a token never expires between our check and the upstream's.
        await self.tokens.set(scope, authorization, ttl=max(lifetime - 10, 1))
        return authorization

    def _basic_credentials(self) -> str | None:
        if not self.config.username:
            return None
        raw = f"{self.config.username}:{self.config.password or ''}".encode()
        return base64.b64encode(raw).decode()

    def _record(self, method: str, response: _Response) -> None:
        self.metrics.upstream_requests.labels(self.name, method, str(response.status)).inc()
        for header, gauge in (
            ("ratelimit-remaining", self.metrics.ratelimit_remaining),
            ("ratelimit-limit", self.metrics.ratelimit_limit),
        ):
            value = response.headers.get(header)
            if value:
                try:
                    gauge.labels(self.name).set(int(value.split(";", 1)[0].strip()))
                except ValueError:
                    pass

    def scope_for(self, repo: str) -> str:
        return f"repository:{repo}:pull"

