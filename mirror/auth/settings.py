"""The `auth:`, `tls:` and `http:` sections of the config file, parsed and validated here.

`mirror.config` calls `parse_security(root)` once; every error names the key that is wrong. Passwords and
hashes are never repeated in an error message or in `check-config`'s output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.auth.policy import ACTIONS, Rule, compile_rule

if TYPE_CHECKING:
    from mirror.config import _Section

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# A user or robot name: what `docker login -u` accepts and an htpasswd line can hold.
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@$-]{0,127}")
ROBOT_PREFIX = "robot$"


@dataclass(frozen=True, slots=True)
class ConfigUser:
    name: str
    password_hash: bytes = field(repr=False)  # bcrypt; a plain `password:` is hashed when the config is read
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenSettings:
    ttl: float = 300.0  # seconds an access token is valid
    refresh_ttl: float = 30 * 86400.0  # seconds a refresh (offline) token is valid; 0 = no refresh tokens
    algorithm: str = "ES256"  # or EdDSA
    leeway: float = 10.0  # clock skew accepted on exp/nbf/iat
    key_file: Path | None = None  # default: <storage.path>/auth/token-signing.pem


@dataclass(frozen=True, slots=True)
class LoginBackoff:
    free_failures: int = 5  # failed logins from one address before it has to wait
    initial: float = 1.0  # first wait; doubles with every further failure
    maximum: float = 300.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool = False
    service: str = "mirror"  # the token audience and the `service` of the Bearer challenge
    issuer: str = "mirror"
    realm: str | None = None  # token endpoint URL for the challenge; default: this server's /auth/token
    challenge: str = "bearer"  # what /v2/ answers anonymous callers with: bearer (token flow) or basic
    htpasswd: Path | None = None
    users: tuple[ConfigUser, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # group -> members
    robots_file: Path | None = None  # default: <storage.path>/auth/robots.json
    rules: tuple[Rule, ...] = ()
    token: TokenSettings = field(default_factory=TokenSettings)
    backoff: LoginBackoff = field(default_factory=LoginBackoff)
    credential_cache_ttl: float = 60.0  # a verified Basic credential is not bcrypt-checked again for this long
    # Who may use the server's own API (/api/..., e.g. running a replication rule): users and groups.
    admin_users: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        return {
            "enabled": True,
            "service": self.service,
            "issuer": self.issuer,
            "realm": self.realm,
            "challenge": self.challenge,
            "htpasswd": str(self.htpasswd) if self.htpasswd else None,
            "users": {u.name: {"password_hash": "***", "groups": list(u.groups)} for u in self.users},
            "groups": {name: list(members) for name, members in self.groups},
            "robots_file": str(self.robots_file) if self.robots_file else None,
            "access": [rule.to_dict() for rule in self.rules],
            "token": {
                "ttl": self.token.ttl,
                "refresh_ttl": self.token.refresh_ttl,
                "algorithm": self.token.algorithm,
                "leeway": self.token.leeway,
                "key_file": str(self.token.key_file) if self.token.key_file else None,
            },
            "login_backoff": {
                "free_failures": self.backoff.free_failures,
                "initial": self.backoff.initial,
                "maximum": self.backoff.maximum,
            },
            "credential_cache_ttl": self.credential_cache_ttl,
            "admins": {"users": list(self.admin_users), "groups": list(self.admin_groups)},
        }


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate this CA signed (mTLS)

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if v else None for k, v in (("cert", self.cert), ("key", self.key),
                                                     ("client_ca", self.client_ca))}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_url_bytes: int = 8190  # request line (method, target, version)
    max_header_bytes: int = 8190  # one header field
    max_headers: int = 128
    max_body_bytes: int | None = None  # declared Content-Length of one request; None = unbounded (blobs)
    body_idle_timeout: float = 60.0  # a request body that sends nothing for this long is cut off
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this long
    header_timeout: float = 30.0  # a request line and headers not complete after this long: 408, closed

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_url_bytes": self.max_url_bytes,
            "max_header_bytes": self.max_header_bytes,
            "max_headers": self.max_headers,
            "max_body_bytes": self.max_body_bytes,
            "body_idle_timeout": self.body_idle_timeout,
            "keepalive_timeout": self.keepalive_timeout,
            "header_timeout": self.header_timeout,
        }


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    http: HttpLimits = field(default_factory=HttpLimits)

    def to_dict(self) -> dict[str, Any]:
        return {"auth": self.auth.to_dict(), "tls": self.tls.to_dict(), "http": self.http.to_dict()}


def parse_security(root: _Section) -> SecurityConfig:
    """Read `auth:`, `tls:` and `http:` from the root section (marking them used)."""
    auth = root.section("auth", _parse_auth, AuthConfig()) if root.has("auth") else _absent(root, "auth")
    return SecurityConfig(
        auth=auth,
        tls=root.section("tls", _parse_tls, TLSConfig()),
        http=root.section("http", _parse_http, HttpLimits()),
    )


def _absent(root: _Section, name: str) -> AuthConfig:
    root.get(name)
    return AuthConfig()


def _sub(section: _Section, name: str) -> _Section:
    """The mapping at `name` as a section of its own (an unusable one is recorded and read as empty)."""
    return _section_of(section.get(name), section.path(name), section)


def _positive_int(section: _Section, name: str, default: int) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(f"{section.path(name)}: expected a positive integer, got {value!r}")
    return value


def _error(message: str) -> Exception:
    from mirror.config import ConfigError

    return ConfigError(message)


def _duration(section: _Section, name: str, default: float) -> float:
    from mirror.config import parse_duration

    return parse_duration(section.get(name, default), section.path(name))


def _existing_file(section: _Section, name: str, *, required: bool = False) -> Path | None:
    text = section.string(name)
    if not text:
        if required:
            raise _error(f"{section.path(name)}: required")
        return None
    path = Path(text)
    if not path.is_file():
        raise _error(f"{section.path(name)}: no such file: {text}")
    return path


def _name_list(section: _Section, name: str) -> tuple[str, ...]:
    value = section.get(name, [])
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _error(f"{section.path(name)}: expected a list of names")
    return tuple(value)


def _parse_auth(section: _Section) -> AuthConfig:
    enabled = section.boolean("enabled", True)
    challenge = section.string("challenge", "bearer") or "bearer"
    if challenge not in ("bearer", "basic"):
        raise _error(f"{section.path('challenge')}: expected bearer or basic, got {challenge!r}")
    realm = section.string("realm")
    if realm is not None and not re.fullmatch(r"https?://[^\s\"]+", realm):
        raise _error(f"{section.path('realm')}: expected an http(s) URL of the token endpoint, got {realm!r}")
    service = section.string("service", "mirror") or "mirror"
    issuer = section.string("issuer", "mirror") or "mirror"
    for key, value in (("service", service), ("issuer", issuer)):
        if '"' in value or "\\" in value:
            raise _error(f"{section.path(key)}: must not contain quotes or backslashes")
    htpasswd = _existing_file(section, "htpasswd")
    users = _parse_users(_sub(section, "users"))
    groups = _parse_groups(_sub(section, "groups"))
    robots_text = section.string("robots_file")
    rules = _parse_rules(section)
    token = _parse_token(_sub(section, "token"))
    backoff = _parse_backoff(_sub(section, "login_backoff"))
    cache_ttl = _duration(section, "credential_cache_ttl", 60.0)
    admins = _sub(section, "admins")
    admin_users, admin_groups = _name_list(admins, "users"), _name_list(admins, "groups")
    admins.finish()
    section.finish()
    return AuthConfig(
        enabled=enabled,
        service=service,
        issuer=issuer,
        realm=realm.rstrip("/") if realm else None,
        challenge=challenge,
        htpasswd=htpasswd,
        users=users,
        groups=groups,
        robots_file=Path(robots_text) if robots_text else None,
        rules=rules,
        token=token,
        backoff=backoff,
        credential_cache_ttl=cache_ttl,
        admin_users=admin_users,
        admin_groups=admin_groups,
    )


def _parse_users(section: _Section) -> tuple[ConfigUser, ...]:
    import bcrypt

    users = []
    for name in list(section.data):
        key = section.path(name)
        if not isinstance(name, str) or not _USER_NAME.fullmatch(name) or name.startswith(ROBOT_PREFIX):
            raise _error(f"{key}: not a valid user name (letters, digits, . _ @ - ; not starting with robot$)")
        entry = _sub(section, name)
        hashed = entry.get("password_hash")
        plain = entry.get("password")
        if (hashed is None) == (plain is None):
            raise _error(f"{key}: give exactly one of password_hash (bcrypt) or password (e.g. ${{ENV}})")
        if hashed is not None:
            if not isinstance(hashed, str) or not hashed.startswith(BCRYPT_PREFIXES):
                raise _error(f"{entry.path('password_hash')}: expected a bcrypt hash ($2b$...) (value not shown)")
            password_hash = hashed.encode()
        else:
            if not isinstance(plain, str) or not plain:
                raise _error(f"{entry.path('password')}: expected a non-empty string (is its ${{ENV}} set?)")
            if plain.startswith(BCRYPT_PREFIXES):
                password_hash = plain.encode()  # an ${ENV} holding a hash
            elif len(plain.encode()) > 72:
                raise _error(f"{entry.path('password')}: bcrypt takes at most 72 bytes (value not shown)")
            else:
                password_hash = bcrypt.hashpw(plain.encode(), bcrypt.gensalt())
        groups = _name_list(entry, "groups")
        entry.finish()
        users.append(ConfigUser(name, password_hash, groups))
    section.used.update(section.data)
    return tuple(users)


def _parse_groups(section: _Section) -> tuple[tuple[str, tuple[str, ...]], ...]:
    groups = []
    for name, members in section.data.items():
        if not isinstance(name, str) or not name:
            raise _error(f"{section.path(str(name))}: expected a group name")
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise _error(f"{section.path(name)}: expected a list of user names")
        groups.append((name, tuple(members)))
    section.used.update(section.data)
    return tuple(groups)


def _parse_rules(section: _Section) -> tuple[Rule, ...]:
    raw = section.get("access", [])
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _error(f"{section.path('access')}: expected a list of rules")
    rules = []
    for index, entry_raw in enumerate(raw):
        entry = _section_of(entry_raw, f"{section.path('access')}[{index}]", section)
        pattern = entry.string("repository")
        if not pattern:
            raise _error(f"{entry.path('repository')}: required (a glob like team/** or docker.io/**)")
        grants: dict[str, frozenset[str]] = {}
        for who in ("anonymous", "authenticated"):
            grants[who] = _actions(entry, who)
        users = _subject_grants(entry, "users")
        groups = _subject_grants(entry, "groups")
        immutable = _name_list(entry, "immutable_tags")
        entry.finish()
        rules.append(compile_rule(pattern, grants["anonymous"], grants["authenticated"], users, groups, immutable))
    return tuple(rules)


def _section_of(data: Any, key: str, parent: _Section) -> _Section:
    from mirror.config import _Section

    return _Section.of(data, key, parent.errors) or _Section({}, key, parent.errors)


def _actions(section: _Section, name: str) -> frozenset[str]:
    value = section.get(name, [])
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _error(f"{section.path(name)}: expected a list of actions ({', '.join(ACTIONS)})")
    unknown = [v for v in value if v not in ACTIONS and v != "*"]
    if unknown:
        raise _error(f"{section.path(name)}: unknown action {unknown[0]!r} (expected {', '.join(ACTIONS)} or *)")
    return frozenset(ACTIONS) if "*" in value else frozenset(value)


def _subject_grants(section: _Section, name: str) -> dict[str, frozenset[str]]:
    sub = _sub(section, name)
    grants = {}
    for subject in list(sub.data):
        if not isinstance(subject, str) or not subject:
            raise _error(f"{sub.path(str(subject))}: expected a name")
        grants[subject] = _actions(sub, subject)
    return grants


def _parse_token(section: _Section) -> TokenSettings:
    algorithm = section.string("algorithm", "ES256") or "ES256"
    if algorithm not in ("ES256", "EdDSA"):
        raise _error(f"{section.path('algorithm')}: expected ES256 or EdDSA, got {algorithm!r}")
    ttl = _duration(section, "ttl", 300)
    if ttl <= 0:
        raise _error(f"{section.path('ttl')}: must be more than 0")
    key_text = section.string("key_file")
    settings = TokenSettings(
        ttl=ttl,
        refresh_ttl=_duration(section, "refresh_ttl", 30 * 86400),
        algorithm=algorithm,
        leeway=_duration(section, "leeway", 10),
        key_file=Path(key_text) if key_text else None,
    )
    section.finish()
    return settings


def _parse_backoff(section: _Section) -> LoginBackoff:
    backoff = LoginBackoff(
        free_failures=_positive_int(section, "free_failures", 5),
        initial=_duration(section, "initial", 1),
        maximum=_duration(section, "maximum", 300),
    )
    section.finish()
    return backoff


def _parse_tls(section: _Section) -> TLSConfig:
    cert = _existing_file(section, "cert")
    key = _existing_file(section, "key", required=cert is not None)
    client_ca = _existing_file(section, "client_ca")
    if cert is None and (key is not None or client_ca is not None):
        raise _error(f"{section.path('cert')}: required when tls.key or tls.client_ca is set")
    section.finish()
    return TLSConfig(cert=cert, key=key, client_ca=client_ca)


def _parse_http(section: _Section) -> HttpLimits:
    from mirror.config import parse_size

    body_raw = section.get("max_body_bytes")
    limits = HttpLimits(
        max_url_bytes=_positive_int(section, "max_url_bytes", 8190),
        max_header_bytes=_positive_int(section, "max_header_bytes", 8190),
        max_headers=_positive_int(section, "max_headers", 128),
        max_body_bytes=None if body_raw is None else parse_size(body_raw, section.path("max_body_bytes")),
        body_idle_timeout=_duration(section, "body_idle_timeout", 60),
        keepalive_timeout=_duration(section, "keepalive_timeout", 75),
        header_timeout=_duration(section, "header_timeout", 30),
    )
    if limits.header_timeout <= 0:
        raise _error(f"{section.path('header_timeout')}: must be more than 0 (a slow client would hold its "
                     "connection for ever)")
    section.finish()
    return limits
