"""Registry token auth (Docker's Bearer flow and Basic), and the rules for where credentials may go.

Credentials go only to the upstream's own host or to realms listed in `auth_hosts`; a realm that would
downgrade https to http, or that points at a loopback/link-local address nobody configured, is never
contacted at all (distribution CVE-2026-33540, oras-go realm SSRF). An `Authorization` header travels
only to the origin (scheme, host and port) it was sent to: a redirect elsewhere, a same-host https → http
downgrade included, goes without it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse one `WWW-Authenticate` value: `Bearer realm="...",service="...",scope="..."`."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


Origin = tuple[str, str, int]  # scheme, host, port (the default port filled in)


def origin_of(url: str) -> Origin:
    """The origin of an absolute URL (RFC 6454): what decides whether credentials may travel with it.
    An unparsable port gives port -1, which matches no real origin."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return scheme, (parts.hostname or ""), -1
    return scheme, (parts.hostname or ""), port or {"https": 443, "http": 80}.get(scheme, -1)


def same_origin(first: str, second: str) -> bool:
    return origin_of(first) == origin_of(second)


class RealmRefused(Exception):
    """The upstream asked us to fetch a token somewhere we will not go."""


def _is_internal_host(host: str) -> bool:
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local


@dataclass(frozen=True, slots=True)
class RealmPolicy:
    upstream_url: str
    auth_hosts: tuple[str, ...]

    def _configured(self, netloc: str, hostname: str) -> bool:
        upstream = urlsplit(self.upstream_url)
        return hostname == upstream.hostname or netloc in self.auth_hosts or hostname in self.auth_hosts

    def on_upstream(self, url: str) -> bool:
        """Whether an absolute URL is on the upstream's own origin: the only place its registry requests
        (and their tokens) go without a redirect. A pagination Link elsewhere is not followed."""
        return same_origin(url, self.upstream_url)

    def check_redirect(self, target: str) -> None:
        """Raise RealmRefused for a redirect we will not follow: not http(s), or from an upstream on the
        outside to an internal address (metadata services, the mirror's own host) nobody configured.
        No credentials travel with it anyway; this keeps a public upstream from aiming our requests
        inside. An upstream the operator put on an internal address may redirect internally."""
        parts = urlsplit(target)
        hostname = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not hostname:
            raise RealmRefused(f"redirect to {target[:200]!r} is not an http(s) URL")
        upstream_internal = _is_internal_host(urlsplit(self.upstream_url).hostname or "")
        if _is_internal_host(hostname) and not upstream_internal and not self._configured(parts.netloc, hostname):
            raise RealmRefused(f"redirect to {target[:200]!r} points at an internal address nobody configured")

    def check(self, realm: str) -> bool:
        """Return whether credentials may be sent to `realm`; raise RealmRefused if it must not be contacted."""
        parts = urlsplit(realm)
        hostname = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not hostname:
            raise RealmRefused(f"token realm {realm[:200]!r} is not an http(s) URL")
        configured = self._configured(parts.netloc, hostname)
        explicitly_listed = parts.netloc in self.auth_hosts or hostname in self.auth_hosts
        if urlsplit(self.upstream_url).scheme == "https" and parts.scheme == "http" and not explicitly_listed:
            raise RealmRefused(f"token realm {realm[:200]!r} would downgrade https to http")
        if _is_internal_host(hostname) and not configured:
            raise RealmRefused(f"token realm {realm[:200]!r} points at an internal address nobody configured")
        return configured
