"""One upstream registry: its HTTP session, tokens, redirects, retries and rate-limit bookkeeping.

`open()` returns a response whose body the caller streams; retries happen only while opening (before a
single byte could have reached a client). 5xx, timeouts and refused connections become
UpstreamUnavailable, 429 becomes TooManyRequests with the upstream's Retry-After, so the proxy can decide
between stale content and an error that makes Docker and containerd move on quickly.

`get_json()` reads a JSON answer whole, up to a cap; `get_json_pages()` follows its `Link: rel="next"`
pages (tags lists, referrers), bounded, and only on the upstream's own origin.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.client
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from mirror.config import UpstreamConfig
from mirror.errors import TooManyRequests, UpstreamInvalid, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.retrying import call_with_retries
from mirror.upstream.auth import Challenge, RealmPolicy, RealmRefused, origin_of, parse_challenge
from mirror.upstream.blocking import BlockingPool, BlockingResponse
from mirror.upstream.ratelimit import RateLimitReading

if TYPE_CHECKING:
    from aiocache import SimpleMemoryCache

    from mirror.coordination.interface import Coordinator

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
RETRY_ATTEMPTS = 3
TOKEN_DEFAULT_SECONDS = 60
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
# A token endpoint's answer is a few KiB (Docker Hub ~1-4 KiB, the largest cloud JWTs ~10 KiB).
TOKEN_BODY_LIMIT = 1 << 20
# One JSON answer (a page of a tags list, a referrers index): read whole, never more than this. 20,000
# tags are about 0.4 MiB.
JSON_BODY_LIMIT = 8 << 20
# get_json_pages() follows at most this many pages, and stops once their bodies add up to this much:
# what one listing may cost the upstream and our memory.
LIST_MAX_PAGES = 100
LIST_MAX_BYTES = 32 << 20
# `<url>; param; param, <url>; ...`: one link per match, its parameters in group 2 (RFC 8288).
_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]*)*)")


USER_AGENT = "mirror/0.1"
# How long an idle connection to an upstream or a replication destination is kept for reuse. aiohttp's
# default (15 s) closes them between an image's pull and the next one, or between two replication runs a
# short interval apart, and every request then pays a new TCP (and TLS) handshake. Below the 60 s after
# which many load balancers and CDNs close idle connections themselves (one closed by the server first
# leaves the pool when its FIN arrives; one that races a request is retried like any reset).
KEEPALIVE_SECONDS = 45.0


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


def request_kind(path: str) -> str:
    """What an upstream request is about, for the metrics: Docker Hub bills GETs of `manifest`."""
    route = path.split("?", 1)[0]
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob"), ("/tags/list", "tags"),
                         ("/referrers/", "referrers"), ("/_catalog", "catalog")):
        if marker in route:
            return kind
    return "base" if route.rstrip("/") == "/v2" else "other"


@dataclass(frozen=True, slots=True)
class JsonResponse:
    """An upstream's answer to a GET of JSON, its body read and parsed (see UpstreamClient.get_json)."""

    status: int
    headers: Mapping[str, str]
    data: Any  # the parsed body of a 200 answer; None for any other status (that body is not read)
    size: int  # bytes of the body read (0 unless 200)
    next_url: str | None  # absolute URL of the `Link: <...>; rel="next"` page, on whatever host it names


def next_link(values: Iterable[str]) -> str | None:
    """The target of the first `rel="next"` link in `Link` header values, as written (maybe relative)."""
    for value in values:
        for match in _LINK.finditer(value):
            for param in match.group(2).split(";"):
                name, _, raw = param.partition("=")
                if name.strip().lower() == "rel" and "next" in raw.strip().strip('"').lower().split():
                    return match.group(1).strip()
    return None


def _size_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit} bytes"


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """What to trust for this upstream's certificates: a context of its `ca_file`, which serves both
    transports (aiohttp for requests, BlockingPool for blob bodies) so they agree; or None: the system's
    CAs, which aiohttp's default context (made when aiohttp is imported) and BlockingPool's (made at its
    first https connection) trust alike. Loading the system's bundle costs ~60 ms (OpenSSL 3 parses every
    certificate): a server does not load it once more per upstream before it can listen."""
    return ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file else None


class UpstreamClient:
    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        tls: ssl.SSLContext | None = None,
        shared: Coordinator | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.session = session
        self.metrics = metrics
        self.policy = RealmPolicy(config.url, config.auth_hosts)
        # Tokens live for their `expires_in`; nothing about them needs to survive a restart. The cache is made
        # with the first token: importing aiocache loads redis-py (0.1-0.4 s), which `serve` should not pay at
        # start-up, nor ever for an upstream without a token server.
        self._tokens: SimpleMemoryCache | None = None
        # A cluster node (`cluster.redis`): tokens and the rate-limit budget are shared with the other nodes
        # through the coordinator, behind the local cache (a token in it costs no Redis round trip).
        self.shared = shared
        self._publishing: set[asyncio.Task[None]] = set()
        # The token last taken from the coordinator per scope (one entry per scope, like the locks below).
        self._shared_tokens_used: dict[str, str] = {}
        self._base = urlsplit(config.url)
        # One token request per scope at a time: concurrent requests that hit the same 401 (parallel layer
        # pulls, a token expiring under many clients) wait for the first one's token. One lock per scope
        # ever used: bounded by the repositories pulled, a few hundred bytes each.
        self._token_locks: dict[str, asyncio.Lock] = {}
        # The upstream answered a Basic challenge: send the credentials up front from then on, instead of
        # paying a 401 round trip on every request.
        self._basic_challenged = False
        # It answered a Bearer challenge: a cluster node looks for another node's token before sending.
        self._bearer_challenged = False
        # The budget this upstream last announced; replication reads it to leave the rest to clients.
        self.ratelimit = RateLimitReading()
        # Whether it has the OCI referrers API, and when that was learned (replication asks once an hour,
        # not once per image: without the API the referrers tag, visible in the tag list, says it all).
        self.referrers_api: tuple[bool, float] | None = None
        self._warned_downgrade = False
        # Blob bodies are read from threads (see mirror.upstream.blocking): their own connections.
        self.blocking = BlockingPool(user_agent=USER_AGENT, timeout=config.timeout, tls=tls or tls_context(config))

    def close(self) -> None:
        for task in self._publishing:
            task.cancel()
        self.blocking.close()

    async def refresh_shared_budget(self) -> None:
        """Take the cluster's newest rate-limit reading for this upstream (another node may have seen a
        later one than ours) into `ratelimit` and the gauge: what /metrics and the status page show."""
        if self.shared is None:
            return
        try:
            budget = await self.shared.budget(self.name)
        except Exception:  # noqa: BLE001 - the local reading is still a reading
            log.warning("upstream %s: could not read the shared rate-limit budget", self.name, exc_info=True)
            return
        reading = self.ratelimit
        if budget is None or budget.remaining is None or budget.observed_at <= reading.observed_at:
            return
        reading.remaining, reading.observed_at = budget.remaining, budget.observed_at
        reading.window = budget.window or reading.window
        self.metrics.ratelimit_remaining.labels(self.name).set(budget.remaining)

    # -- public ------------------------------------------------------------------------------------
    async def open(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request (auth, redirects and retries handled); the caller releases the response.

        `data` is a body held in memory (a manifest, one chunk of an upload): bytes, so it can be sent
        again after a 401 challenge, a redirect or a retry."""
        send = self._send_aiohttp if data is None else functools.partial(self._send_aiohttp, data=data)
        return await self._open(method, path, scope, headers, send)

    async def open_blocking(
        self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None
    ) -> BlockingResponse:
        """Like open(), for a blob whose body is read from threads (mirror.proxy.download): the same auth,
        redirect policy, retries and rate-limit bookkeeping, over blocking connections."""
        return await self._open(method, path, scope, headers, self._send_blocking)

    def warm_blob_connections(self, count: int) -> int:
        """Blob GETs are about to follow (a manifest is on its way, and its layers will be prefetched):
        open up to `count` of their connections now, in the background. Returns how many were started."""
        if self.config.offline:
            return 0
        return self.blocking.warm(self.config.url, count)

    async def get_json(
        self, path: str, *, scope: str, headers: Mapping[str, str] | None = None, limit: int = JSON_BODY_LIMIT
    ) -> JsonResponse:
        """GET `path` (on the upstream, like open()) and read a 200 answer's JSON body whole.

        Any other status comes back with `data` None, for the caller to judge. Raises what open() raises
        (UpstreamUnavailable, TooManyRequests), UpstreamUnavailable for a body cut short or stalled, and
        UpstreamInvalid for a body over `limit` bytes or one that is not JSON."""
        response = await self.open("GET", path, scope=scope, headers=headers)
        try:
            if response.status != 200:
                return JsonResponse(response.status, response.headers, None, 0, None)
            try:
                body = await self._read_capped(response, limit, f"answer to GET {path[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.metrics.upstream_errors.labels(self.name, "unavailable").inc()
                raise UpstreamUnavailable(f"upstream {self.name}: answer to GET {path[:200]} broke off: {exc}") from exc
        finally:
            response.release()
        try:
            data = json.loads(body)
        except ValueError as exc:
            self.metrics.upstream_errors.labels(self.name, "invalid_json").inc()
            raise UpstreamInvalid(f"upstream {self.name} answered GET {path[:200]} with invalid JSON") from exc
        link = next_link(response.headers.getall("Link", []))
        # A relative Link is relative to the URL asked for (RFC 8288 §3.2).
        next_url = urljoin(f"{self.config.url}{path}", link) if link else None
        return JsonResponse(200, response.headers, data, len(body), next_url)

    async def get_json_pages(
        self,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        limit: int = JSON_BODY_LIMIT,
        max_pages: int = LIST_MAX_PAGES,
        max_bytes: int = LIST_MAX_BYTES,
    ) -> AsyncGenerator[JsonResponse, None]:
        """get_json() of `path`, then of each page its `Link: <...>; rel="next"` names, in order.

        Ends after a page that is not a 200 (yielded, for the caller to judge) or has no next link, and
        stops early (logged) after `max_pages` pages or `max_bytes` of bodies, at a link back to a page
        already read (a loop), or at a link off the upstream's own origin: that is never followed, so
        neither our credentials nor our requests go where the operator did not point the mirror. A
        caller with enough items simply stops iterating. Each page raises what get_json() raises."""
        seen: set[str] = set()
        read = 0
        current = path
        for _ in range(max_pages):
            seen.add(current)
            page = await self.get_json(current, scope=scope, headers=headers, limit=limit)
            yield page
            read += page.size
            if page.status != 200 or page.next_url is None:
                return
            if not self.policy.on_upstream(page.next_url):
                self.metrics.upstream_errors.labels(self.name, "link_refused").inc()
                log.warning("upstream %s: not following a next-page link to another origin: %s",
                            self.name, page.next_url[:200])
                return
            parts = urlsplit(page.next_url)
            current = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if current in seen:
                self.metrics.upstream_errors.labels(self.name, "link_loop").inc()
                log.warning("upstream %s: next-page link goes back to a page already read: %s",
                            self.name, current[:200])
                return
            if read >= max_bytes:
                log.warning("upstream %s: listing %s stopped after %s of pages", self.name, path[:200],
                            _size_text(max_bytes))
                return
        log.warning("upstream %s: listing %s stopped after %d pages", self.name, path[:200], max_pages)

    async def _read_capped(self, response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """The whole body, however it arrives in pieces; UpstreamInvalid once it passes `limit` bytes
        (decided from Content-Length before reading, when there is one)."""
        body = bytearray()
        too_large = response.content_length is not None and response.content_length > limit
        if not too_large:
            async for piece in response.content.iter_any():
                body += piece
                if len(body) > limit:
                    too_large = True
                    break
        if too_large:
            self.metrics.upstream_errors.labels(self.name, "too_large").inc()
            raise UpstreamInvalid(f"upstream {self.name}: {what} is larger than {_size_text(limit)}")
        return bytes(body)

    async def _open(
        self, method: str, path: str, scope: str, headers: Mapping[str, str] | None, send: _Sender[R]
    ) -> R:
        if self.config.offline:
            raise UpstreamUnavailable(f"upstream {self.name} is configured offline")
        try:
            return await call_with_retries(
                lambda: self._open_once(method, path, scope, dict(headers or {}), send),
                attempts=RETRY_ATTEMPTS,
                retry_on=lambda error: isinstance(error, _Retryable),
                multiplier=0.1,
                wait_max=1.0,
                # Retries are for failures that come quickly (refused, reset, 5xx). Once `timeout` has been
                # spent, a client waiting for us is better served by an error now (it moves on to its next
                # endpoint) than by up to RETRY_ATTEMPTS times the timeout.
                deadline=self.config.timeout,
            )
        except _Retryable as exc:
            self.metrics.upstream_errors.labels(self.name, "unavailable").inc()
            self.metrics.upstream_up.labels(self.name).set(0)
            raise UpstreamUnavailable(f"upstream {self.name} unavailable: {exc}") from exc

    # -- one attempt -------------------------------------------------------------------------------
    async def _open_once(self, method: str, path: str, scope: str, headers: dict[str, str], send: _Sender[R]) -> R:
        url = f"{self.config.url}{path}"
        sent = await self._known_authorization(scope)
        if sent:
            headers["Authorization"] = sent
        response = await self._follow(method, url, headers, send)
        # One answer to a 401; a second only when the token refused was another node's (revoked, or expired
        # early): then this node fetches a fresh one, once.
        for _round in range(2):
            if response.status != 401 or (_round and self._shared_tokens_used.get(scope) != sent):
                break
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            try:
                authorization = await self._authorize(challenge, scope, rejected=sent) if challenge else None
            except BaseException:
                response.release()
                raise
            # With nothing new to offer, this 401 is the answer: sending the same request again would only
            # cost another upstream request (and, on Docker Hub, maybe a pull from the rate limit).
            if authorization is None or authorization == sent:
                break
            response.release()
            headers["Authorization"] = sent = authorization
            response = await self._follow(method, url, headers, send)
        self._record(method, path, response)
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
        """Send, following redirects ourselves: Authorization never travels to another origin."""
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
            # Credentials stay with the origin they were sent to: another host or port, and a same-host
            # https -> http downgrade (where anyone on the path could read them), get the request without.
            if origin_of(target) != origin_of(url):
                downgrade = urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http"
                if downgrade and not self._warned_downgrade and any(k.lower() == "authorization" for k in headers):
                    self._warned_downgrade = True  # once: a misconfigured upstream would say it on every request
                    log.warning("upstream %s redirects from https to http (%s): following without credentials",
                                self.name, target[:200])
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise UpstreamUnavailable(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    async def _send_aiohttp(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None = None
    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.timeout, sock_connect=self.config.timeout, sock_read=self.config.timeout
        )
        try:
            return await self.session.request(
                method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout
            )
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    async def _send_blocking(self, method: str, url: str, headers: dict[str, str]) -> BlockingResponse:
        try:
            return await self.blocking.request(method, url, headers)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, garbled
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    async def _known_authorization(self, scope: str) -> str | None:
        """What to send before any challenge: a cached token for the scope, or Basic once it was asked for."""
        token = await self._tokens.get(scope) if self._tokens is not None else None
        if token:
            return str(token)
        # Only once this upstream asked for a token at all: an anonymous upstream costs no Redis round trip.
        shared = await self._shared_token(scope) if self._bearer_challenged else None
        if shared:
            return shared
        credentials = self._basic_credentials()
        return f"Basic {credentials}" if credentials and self._basic_challenged else None

    async def _local_tokens(self) -> SimpleMemoryCache:
        if self._tokens is None:
            from aiocache import SimpleMemoryCache

            self._tokens = SimpleMemoryCache()
        return self._tokens

    async def _shared_token(self, scope: str) -> str | None:
        """A token another node fetched for `scope` (kept locally from then on, until it expires)."""
        if self.shared is None:
            return None
        try:
            value = await self.shared.get_token(self.name, scope)
        except Exception:  # noqa: BLE001 - without the shared copy this node fetches its own token
            log.warning("upstream %s: could not read the shared token", self.name, exc_info=True)
            return None
        # Stored as "<expiry, unix time> <Authorization value>": kept here only as long as it lives.
        expires_text, _, authorization = (value or "").partition(" ")
        try:
            left = float(expires_text) - time.time()
        except ValueError:
            return None
        if not authorization or left < 1:
            return None
        await (await self._local_tokens()).set(scope, authorization, ttl=left)
        self._shared_tokens_used[scope] = authorization
        return authorization

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
        self._bearer_challenged = True
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            current = await self._tokens.get(scope) if self._tokens is not None else None
            if current and current != rejected:
                return str(current)
            # Another node's token, unless it is the one just refused (revoked or expired early): then
            # this node fetches a fresh one, once, and shares that instead.
            shared = await self._shared_token(scope)
            if shared and shared != rejected:
                return shared
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
                self.metrics.upstream_requests.labels(self.name, "GET", "token", str(token_response.status)).inc()
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
                data = json.loads(await self._read_capped(token_response, TOKEN_BODY_LIMIT, "token endpoint's answer"))
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise _Retryable(f"token endpoint: {exc}") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            return None
        expires_in = data.get("expires_in")
        lifetime = expires_in if isinstance(expires_in, int) and expires_in > 0 else TOKEN_DEFAULT_SECONDS
        authorization = f"Bearer {token}"
        # Renew a little early so a token never expires between our check and the upstream's.
        ttl = max(lifetime - 10, 1)
        await (await self._local_tokens()).set(scope, authorization, ttl=ttl)
        if self.shared is not None:
            try:
                await self.shared.set_token(self.name, scope, f"{time.time() + ttl!r} {authorization}", ttl)
            except Exception:  # noqa: BLE001 - the other nodes fetch their own then
                log.warning("upstream %s: could not share a token", self.name, exc_info=True)
        return authorization

    def _basic_credentials(self) -> str | None:
        if not self.config.username:
            return None
        raw = f"{self.config.username}:{self.config.password or ''}".encode()
        return base64.b64encode(raw).decode()

    def _record(self, method: str, path: str, response: _Response) -> None:
        self.metrics.upstream_requests.labels(self.name, method, request_kind(path), str(response.status)).inc()
        self.metrics.upstream_up.labels(self.name).set(1 if response.status < 500 else 0)
        seen_at = self.ratelimit.observed_at
        self.ratelimit.observe(response.status, response.headers)
        if self.shared is not None and self.ratelimit.observed_at != seen_at:
            self._publish_budget()
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

    def _publish_budget(self) -> None:
        """Tell the other nodes what the upstream just said is left (in the background: never a Redis round
        trip in the request's way; the coordinator keeps the newest reading whatever order these land in)."""
        assert self.shared is not None
        reading = self.ratelimit
        remaining, window, observed_at = reading.remaining, reading.window, reading.observed_at

        async def publish(shared: Coordinator) -> None:
            try:
                await shared.observe_budget(self.name, remaining, window, observed_at)
            except Exception:  # noqa: BLE001 - the next reading is published again
                log.warning("upstream %s: could not publish the rate-limit budget", self.name, exc_info=True)

        task = asyncio.get_running_loop().create_task(publish(self.shared))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def scope_for(self, repo: str) -> str:
        return f"repository:{repo}:pull"

