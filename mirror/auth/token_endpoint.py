"""`/auth/token`: the token server of the distribution token spec, built in.

GET (Docker's and skopeo's way): Basic credentials or none (anonymous), `scope` as often as needed,
`offline_token=true` for a refresh token (what `docker login` asks for and keeps as its identity token).
POST (OAuth2 form, what Docker uses once it holds a refresh token): `grant_type` password or
refresh_token. Every scope is granted only as far as the policy allows; what is not allowed is left out
of the token (the spec's way), not refused.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from mirror.auth.middleware import AccessControl, audit, canonical_name, decode_basic
from mirror.auth.policy import ACTIONS, ANONYMOUS, DELETE, PULL, PUSH, Identity
from mirror.auth.tokens import Scope, TokenInvalid, parse_scopes
from mirror.errors import NameInvalid, NameUnknown, RegistryError, Unauthorized
from mirror.oci.names import validate_name
from mirror.state import ROUTER

MAX_SCOPES = 32


class TokenRequestInvalid(RegistryError):
    code, status, default_message = "UNSUPPORTED", 400, "invalid token request"


class TokenEndpoint:
    def __init__(self, control: AccessControl) -> None:
        self.control = control

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request["endpoint"] = "token"
        if request.method == "POST":
            return await self._post(request)
        query = request.query
        self._check_service(query.get("service"))
        identity = ANONYMOUS
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                raise Unauthorized("the token endpoint takes Basic credentials")
            name, password = decode_basic(value)
            if name is None or password is None:
                raise Unauthorized("malformed Basic credentials")
            identity = await self.control.check_password(request, name, password)
        offline = query.get("offline_token", "").lower() == "true"
        users = self.control.users
        assert users is not None
        await users.refresh()  # the refresh-token fingerprint below reads the account as it is now
        body = self._answer(request, identity, query.getall("scope", []), offline)
        return web.json_response(body)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        fields = await _form_fields(request)
        self._check_service(fields.get("service"))
        grant = fields.get("grant_type")
        users = self.control.users
        tokens = self.control.tokens
        assert users is not None and tokens is not None
        if grant == "password":
            identity = await self.control.check_password(
                request, fields.get("username", ""), fields.get("password", "")
            )
        elif grant == "refresh_token":
            try:
                claims = tokens.verify_refresh(fields.get("refresh_token", ""))
            except TokenInvalid as exc:
                audit(request, None, "refresh", None, None, f"denied: {exc}")
                raise Unauthorized(f"refresh token refused: {exc}") from None
            account = await users.current(claims["sub"])
            if account is None or account.fingerprint() != claims.get("pwh"):
                audit(request, claims["sub"], "refresh", None, None, "denied: account changed")
                raise Unauthorized("refresh token refused: the account changed or is gone; log in again")
            identity = users.identity(account)
        else:
            raise TokenRequestInvalid("grant_type must be password or refresh_token")
        offline = fields.get("access_type") == "offline" or grant == "refresh_token"
        body = self._answer(request, identity, [fields.get("scope", "")], offline)
        body["scope"] = " ".join(body.pop("_scopes"))
        return web.json_response(body)

    def _check_service(self, service: str | None) -> None:
        if service and service != self.control.config.service:
            served = self.control.config.service
            raise TokenRequestInvalid(f"this token endpoint serves {served!r}, not {service[:100]!r}")

    def _answer(
        self, request: web.Request, identity: Identity, scope_values: list[str], offline: bool
    ) -> dict[str, Any]:
        tokens = self.control.tokens
        users = self.control.users
        assert tokens is not None and users is not None
        access = []
        granted_scopes = []
        for scope in parse_scopes(scope_values)[:MAX_SCOPES]:
            actions = self._grant(request, identity, scope)
            if actions:
                access.append({"type": scope.type, "name": scope.name, "actions": actions})
                granted_scopes.append(str(Scope(scope.type, scope.name, tuple(actions))))
        token, expires_in, issued = tokens.issue_access(identity.name, access)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": _rfc3339(issued),
            "_scopes": granted_scopes,
        }
        if offline and identity.name is not None and self.control.config.token.refresh_ttl > 0:
            account = users.current_loaded(identity.name)
            if account is not None:
                body["refresh_token"] = tokens.issue_refresh(identity.name, account.fingerprint())
        if request.method == "GET":
            body.pop("_scopes")
        return body

    def _grant(self, request: web.Request, identity: Identity, scope: Scope) -> list[str]:
        if scope.type == "registry" and scope.name == "catalog":
            return ["*"] if "*" in scope.actions else []  # the listing itself shows only what may be pulled
        if scope.type != "repository":
            return []
        try:
            target = request.app[ROUTER].route(validate_name(scope.name))
        except (NameInvalid, NameUnknown):
            return []
        allowed = self.control.policy.allowed(identity, canonical_name(target), mirrored=target.upstream is not None)
        requested = set(scope.actions)
        if "*" in requested:
            requested |= {PULL, PUSH, DELETE}
        return [action for action in ACTIONS if action in requested and action in allowed]


MAX_FORM_BYTES = 64 * 1024


async def _form_fields(request: web.Request) -> dict[str, str]:
    """An OAuth2 form body (application/x-www-form-urlencoded), read within a small cap. Bytes that are
    not UTF-8 are a 400, not the decode error aiohttp's request.post() would raise."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise TokenRequestInvalid("POST a form (application/x-www-form-urlencoded)")
    if (request.content_length or 0) > MAX_FORM_BYTES:
        raise TokenRequestInvalid("form too large")
    body = await request.content.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise TokenRequestInvalid("form too large")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, errors="strict", max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenRequestInvalid("the form is not valid UTF-8 form encoding") from exc
    return dict(pairs)


def _rfc3339(unix: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
