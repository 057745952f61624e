"""Access control in front of the dispatcher: who is calling, which action the request is, may they.

The middleware matches the request to its endpoint with the dispatcher's own table, routes the repository
with the router (so `?ns=`, a path prefix and the default upstream all meet the same policy under one
name: `team/app` for a local repository, `docker.io/library/alpine` for a mirrored one), maps
(endpoint, method) to an action and asks the policy. Handlers never check users; listings get a filter
to apply, a manifest PUT that may not move a tag hands the registry a check to run while it holds the tag.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from mirror.api.common import LISTING_FILTER, TAG_MOVE_CHECK
from mirror.api.dispatch import Dispatcher
from mirror.auth.policy import ANONYMOUS, DELETE, OVERWRITE, PULL, PUSH, Identity, Policy
from mirror.auth.settings import AuthConfig, LoginBackoff
from mirror.auth.tokens import TokenInvalid, TokenService, granted_actions, load_or_create_key
from mirror.auth.users import UserDirectory
from mirror.errors import (
    Denied,
    NameInvalid,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
)
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.names import validate_name
from mirror.proxy.peers import PEER_FILL_PREFIX
from mirror.routing import Target
from mirror.state import ROUTER

log = logging.getLogger(__name__)
audit_log = logging.getLogger("mirror.audit")

# Answered before auth: health for load balancers, metrics for Prometheus, the status page.
EXEMPT_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/"})
TOKEN_PATH = "/auth/token"
# Docker's and containers/image's token clients raise a shorter expires_in to this and reuse the token.
MIN_CLIENT_TOKEN_SECONDS = 60
_SAFE_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,300}")

# (endpoint, method) -> action; HEAD is GET's.
_ACTIONS = {
    ("tags", "GET"): PULL,
    ("manifest", "GET"): PULL,
    ("manifest", "PUT"): PUSH,
    ("manifest", "DELETE"): DELETE,
    ("upload_start", "POST"): PUSH,
    ("upload", "GET"): PUSH,
    ("upload", "PATCH"): PUSH,
    ("upload", "PUT"): PUSH,
    ("upload", "DELETE"): PUSH,
    ("blob", "GET"): PULL,
    ("blob", "DELETE"): DELETE,
    ("referrers", "GET"): PULL,
}
DENIAL_AUDITED = "denial_audited"
_AUDITED = {("manifest", "PUT"), ("manifest", "DELETE"), ("upload", "PUT"), ("blob", "DELETE"),
            ("upload_start", "POST")}


class LoginFailures:
    """Failed logins per client address: after a few, each further attempt must wait, doubling."""

    def __init__(self, settings: LoginBackoff) -> None:
        self.settings = settings
        self._state: dict[str, tuple[int, float]] = {}  # address -> (failures, not before)

    def retry_after(self, address: str) -> float:
        failures, not_before = self._state.get(address, (0, 0.0))
        return max(0.0, not_before - time.monotonic())

    def failed(self, address: str) -> None:
        if len(self._state) > 50_000:
            now = time.monotonic()
            self._state = {a: s for a, s in self._state.items() if s[1] > now}
        failures = self._state.get(address, (0, 0.0))[0] + 1
        extra = failures - self.settings.free_failures
        wait = 0.0 if extra < 0 else min(self.settings.maximum, self.settings.initial * 2 ** min(extra, 30))
        self._state[address] = (failures, time.monotonic() + wait)

    def succeeded(self, address: str) -> None:
        self._state.pop(address, None)


@dataclass(slots=True)
class Caller:
    identity: Identity
    via: str  # none, basic, bearer
    claims: dict[str, Any] = field(default_factory=dict)

    def token_allows(self, kind: str, name: str) -> frozenset[str] | None:
        """What the bearer token grants on a resource; None when no token limits the caller."""
        if self.via != "bearer":
            return None
        actions = set(granted_actions(self.claims, kind, name))
        if "*" in actions:
            actions |= {PULL, PUSH, DELETE}
        if PUSH in actions:
            actions.add(OVERWRITE)  # not a token-spec action: within a push token, the policy decides
        return frozenset(actions)


class AccessControl:
    def __init__(self, config: AuthConfig, dispatcher: Dispatcher) -> None:
        self.config = config
        self.policy = Policy(config.rules)
        self.dispatcher = dispatcher
        self.failures = LoginFailures(config.backoff)
        self.users: UserDirectory | None = None
        self.tokens: TokenService | None = None

    async def open(self, data_dir: Path) -> None:
        auth_dir = data_dir / "auth"
        key_file = self.config.token.key_file or auth_dir / "token-signing.pem"
        robots_file = self.config.robots_file or auth_dir / "robots.json"
        if self.config.token.ttl < MIN_CLIENT_TOKEN_SECONDS:
            log.warning(
                "auth.token.ttl is %gs: Docker, skopeo and containerd treat any token as valid for at least %ds "
                "and do not ask again after a 401, so pulls and pushes longer than the ttl will fail",
                self.config.token.ttl,
                MIN_CLIENT_TOKEN_SECONDS,
            )
        key = await asyncio.to_thread(load_or_create_key, key_file, self.config.token.algorithm)
        self.tokens = TokenService(self.config, key)
        self.users = await asyncio.to_thread(UserDirectory, self.config, robots_file)

    # -- who is calling ---------------------------------------------------------------------------
    def challenge(self, request: web.Request, scope: str | None = None, error: str | None = None) -> str:
        if self.config.challenge == "basic":
            return f'Basic realm="{self.config.service}"'
        realm = self.config.realm
        if realm is None:
            host = request.host if _SAFE_HOST.fullmatch(request.host or "") else "localhost"
            realm = f"{'https' if request.secure else 'http'}://{host}{TOKEN_PATH}"
        value = f'Bearer realm="{realm}",service="{self.config.service}"'
        if scope:
            value += f',scope="{scope}"'
        if error:
            value += f',error="{error}"'
        return value

    def unauthorized(
        self, request: web.Request, message: str, scope: str | None = None, error: str | None = None
    ) -> Unauthorized:
        return Unauthorized(message, headers={"WWW-Authenticate": self.challenge(request, scope, error)})

    async def check_password(self, request: web.Request, name: str, password: str) -> Identity:
        """A Basic login (here or at the token endpoint); back-off per address after repeated failures."""
        assert self.users is not None
        address = request.remote or "unknown"
        wait = self.failures.retry_after(address)
        if wait > 0:
            audit(request, name, "login", None, None, "throttled")
            raise TooManyRequests(
                "too many failed logins from this address; try again later",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        account = await self.users.authenticate(name, password)
        if account is None:
            self.failures.failed(address)
            audit(request, name, "login", None, None, "denied")
            raise self.unauthorized(request, "incorrect username or password")
        self.failures.succeeded(address)
        return self.users.identity(account)

    async def identify(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization")
        if not header:
            return Caller(ANONYMOUS, "none")
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            name, password = decode_basic(value)
            if name is None or password is None:
                raise self.unauthorized(request, "malformed Basic credentials")
            return Caller(await self.check_password(request, name, password), "basic")
        if scheme == "bearer":
            assert self.tokens is not None and self.users is not None
            try:
                claims = self.tokens.verify_access(value.strip())
            except TokenInvalid as exc:
                audit(request, None, "token", None, None, f"denied: {exc}")
                raise self.unauthorized(request, str(exc), error="invalid_token") from None
            subject = claims["sub"]
            if not subject:
                return Caller(ANONYMOUS, "bearer", claims)
            account = await self.users.current(subject)
            if account is None:
                raise self.unauthorized(request, "the token's account no longer exists", error="invalid_token")
            return Caller(self.users.identity(account), "bearer", claims)
        raise self.unauthorized(request, f"unsupported authorization scheme {scheme[:20]!r}")

    # -- what may they do -------------------------------------------------------------------------
    def is_admin(self, identity: Identity) -> bool:
        return identity.name in self.config.admin_users or bool(identity.groups & set(self.config.admin_groups))

    def effective(self, caller: Caller, client_name: str, target: Target) -> frozenset[str]:
        allowed = self.policy.allowed(caller.identity, canonical_name(target), mirrored=target.upstream is not None)
        token = caller.token_allows("repository", client_name)
        return allowed if token is None else allowed & token

    def deny(
        self, request: web.Request, caller: Caller, client_name: str, target: Target, action: str, why: str = ""
    ) -> RegistryError:
        repository = canonical_name(target)
        audit(request, caller.identity.label, action, repository, request.get("reference"), "denied")
        scope = f"repository:{client_name}:{'pull,push' if action in (PUSH, OVERWRITE) else action}"
        policy_allows = action in self.policy.allowed(
            caller.identity, repository, mirrored=target.upstream is not None
        )
        if caller.via == "bearer" and policy_allows:
            return self.unauthorized(request, f"the token does not grant {action} on {client_name}", scope,
                                     "insufficient_scope")
        if caller.identity.anonymous:
            return self.unauthorized(request, f"authentication required to {action} {client_name}", scope)
        if target.upstream is not None and action != PULL:
            return Denied(
                f"{repository} is a mirrored repository: it is read-only for everyone",
                detail={"repository": repository, "action": action},
            )
        message = why or f"{caller.identity.label} may not {action} {repository}"
        return Denied(message, detail={"repository": repository, "action": action})

    # -- the middleware ---------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/":
            # The status page is open to all, so it names only what anyone may pull.
            policy = self.policy
            request[LISTING_FILTER] = lambda name: PULL in policy.allowed(ANONYMOUS, name, mirrored=True)
        if path in EXEMPT_PATHS or path == TOKEN_PATH or path.startswith(PEER_FILL_PREFIX):
            # The peer endpoint checks the cluster secret itself; a client's credentials are no business of it.
            return await handler(request)
        caller = await self.identify(request)
        request["identity"] = caller.identity
        if not path.startswith("/v2"):
            # Anything else this server answers (its own API: /api/replication...) is for admins only.
            if caller.identity.anonymous:
                raise self.unauthorized(request, "authentication required")
            if not self.is_admin(caller.identity):
                audit(request, caller.identity.label, "admin", None, None, "denied")
                raise Denied(f"{caller.identity.label} is not an administrator of this server")
            return await handler(request)
        matched = self.dispatcher.match(request.raw_path)
        if matched is None:
            return await handler(request)  # 404 NOT_FOUND, the same for everyone
        endpoint, params = matched
        # Exactly as the dispatcher will see them: a tag spelled %76%31 is v1 to the handler, so to us too.
        params = {k: unquote(v) if k in ("reference", "digest", "upload_id") else v for k, v in params.items()}
        request["endpoint"] = endpoint.name
        request["reference"] = params.get("reference") or params.get("digest")
        method = "GET" if request.method == "HEAD" else request.method
        if endpoint.name == "base":
            if caller.via == "none":
                # Docker sends credentials only after a 401 here (docker login included), so /v2/ asks for
                # them even when anonymous pulls are allowed; anonymous pulls still work on every other URL.
                raise self.unauthorized(request, "authentication required")
            return await handler(request)
        if endpoint.name == "catalog":
            return await self.catalog(request, handler, caller)
        action = _ACTIONS.get((endpoint.name, method))
        if action is None or "name" not in params:
            return await handler(request)  # the dispatcher answers 405 for a method it has no handler for
        client_name = validate_name(params["name"])
        target = request.app[ROUTER].route(client_name, request.query.get("ns"))
        allowed = self.effective(caller, client_name, target)
        if action not in allowed:
            raise self.deny(request, caller, client_name, target, action)
        if endpoint.name == "manifest" and method == "PUT":
            self.guard_tag_move(request, caller, client_name, target, params["reference"], allowed)
        elif endpoint.name == "manifest" and method == "DELETE":
            self.check_tag_delete(request, caller, client_name, target, params["reference"])
        elif endpoint.name == "upload_start" and "mount" in request.query:
            request = self.mount_source_checked(request, caller, params["name"])
        if (endpoint.name, method) not in _AUDITED:
            return await handler(request)
        return await self.audited(request, handler, caller, action, canonical_name(target))

    async def catalog(self, request: web.Request, handler: Handler, caller: Caller) -> web.StreamResponse:
        token = caller.token_allows("registry", "catalog")
        if token is not None and "*" not in granted_actions(caller.claims, "registry", "catalog"):
            raise self.unauthorized(request, "the token does not grant the catalog", "registry:catalog:*",
                                    "insufficient_scope")
        identity = caller.identity
        policy = self.policy
        # Mirrored or not changes only writes; a listing asks about pull.
        request[LISTING_FILTER] = lambda name: PULL in policy.allowed(identity, name, mirrored=True)
        return await handler(request)

    def guard_tag_move(
        self, request: web.Request, caller: Caller, client_name: str, target: Target, reference: str,
        allowed: frozenset[str],
    ) -> None:
        """A tag that exists may be pointed elsewhere only with `overwrite` (and never if it is immutable).
        Pushing the same manifest to it again is no move and is allowed.

        Whether the tag exists, and where it points, is the registry's to read while it holds the tag: the
        check goes to the handler as a callback the registry runs between reading the tag and writing it.
        Checked here, before the write, two concurrent PUTs to a new immutable tag both passed."""
        if looks_like_digest(reference):
            return
        repository = canonical_name(target)
        immutable = self.policy.immutable(repository, reference)
        if OVERWRITE in allowed and not immutable:
            return
        why = (
            f"tag {reference} of {repository} is immutable"
            if immutable
            else f"{caller.identity.label} may not overwrite the existing tag {reference} of {repository}"
        )

        def refuse_move(current: Digest, new: Digest) -> None:
            request[DENIAL_AUDITED] = True
            raise self.deny(request, caller, client_name, target, OVERWRITE, why)

        request[TAG_MOVE_CHECK] = refuse_move

    def check_tag_delete(
        self, request: web.Request, caller: Caller, client_name: str, target: Target, reference: str
    ) -> None:
        if not looks_like_digest(reference) and self.policy.immutable(canonical_name(target), reference):
            why = f"tag {reference} of {canonical_name(target)} is immutable"
            raise self.deny(request, caller, client_name, target, DELETE, why)

    def mount_source_checked(self, request: web.Request, caller: Caller, name: str) -> web.Request:
        """A mount from a repository the caller may not pull becomes a plain upload (202), as the spec says
        an unmountable blob does: the answer tells nothing about the other repository."""
        source = request.query.get("from") or ""
        try:
            source_target = request.app[ROUTER].route(validate_name(source))
            if PULL in self.effective(caller, source, source_target):
                return request
        except (NameInvalid, NameUnknown):
            pass
        kept = [(k, v) for k, v in request.query.items() if k not in ("mount", "from")]
        raw = request.raw_path.split("?", 1)[0] + (f"?{urlencode(kept)}" if kept else "")
        return request.clone(rel_url=URL(raw, encoded=True))

    async def audited(
        self, request: web.Request, handler: Handler, caller: Caller, action: str, repository: str
    ) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            request["audit_response"] = response
            return response
        except RegistryError as error:
            status = error.status
            raise
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            digest = request.query.get("digest") or request.query.get("mount") or request.get("reference")
            if request["endpoint"] == "manifest" and response_digest(request) is not None:
                digest = response_digest(request)
            result = "ok" if status < 400 else f"failed {status}"
            opened = request["endpoint"] == "upload_start" and status == 202  # a session opened, nothing pushed
            if not opened and not request.get(DENIAL_AUDITED):  # a refused tag move has its denial line
                audit(request, caller.identity.label, action, repository, digest, result)


def response_digest(request: web.Request) -> str | None:
    response = request.get("audit_response")
    return response.headers.get("Docker-Content-Digest") if response is not None else None


def canonical_name(target: Target) -> str:
    return f"{target.upstream}/{target.repo}" if target.upstream else target.repo


def decode_basic(value: str) -> tuple[str | None, str | None]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    name, sep, password = decoded.partition(":")
    if not sep or not name:
        return None, None
    return name, password


def audit(
    request: web.Request, user: str | None, action: str, repository: str | None, digest: str | None, result: str
) -> None:
    """One JSON line per push, delete, denial and failed login, on the `mirror.audit` logger."""
    audit_log.info(
        "%s",
        json.dumps(
            {
                "user": user or "anonymous",
                "action": action,
                "repository": repository,
                "digest": digest[:200] if digest else None,
                "result": result,
                "client": request.remote,
                "method": request.method,
                "path": request.path[:300],
            },
            sort_keys=False,
        ),
    )


ListingFilter = Callable[[str], bool]
