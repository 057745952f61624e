"""Bearer tokens of the distribution token spec, signed and checked by the mirror itself.

The signing key is generated on first start (ES256: P-256, or EdDSA: Ed25519) and kept in the data
directory with mode 0600. Checking a token never lets the token choose how it is checked: the algorithm
comes from an allow-list of one, the key is ours, and a header that names or embeds a key (`jwk`, `jku`,
`x5c`, `x5u`, a `kid` other than ours) is refused outright (CVE-2025-24976 was a registry trusting those).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mirror.auth.settings import AuthConfig

_KEY_CHOOSING_HEADERS = ("jwk", "jku", "x5c", "x5u", "x5t", "x5t#S256")
REFRESH_AUDIENCE_SUFFIX = "#refresh"
VERIFIED_CACHE_ENTRIES = 10_000
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class TokenInvalid(Exception):
    """A bearer token we did not issue, or no longer honour."""


@dataclass(frozen=True, slots=True)
class Scope:
    type: str  # repository, registry
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """`repository:host:5000/team/app:pull,push` -> type before the first colon, actions after the last,
    the name (which may hold a host:port) in between. A resource class (`repository(plugin)`) is dropped.
    Malformed entries are ignored, as the spec's token servers do."""
    scopes = []
    for value in values:
        for item in value.split():
            kind, sep, rest = item.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not sep or not sep2 or not kind or not name:
                continue
            kind = kind.split("(", 1)[0]
            scopes.append(Scope(kind, name, tuple(a for a in actions.split(",") if a)))
    return scopes


def load_or_create_key(path: Path, algorithm: str) -> PrivateKey:
    """The signing key in `path`; made (0600, directory 0700) on first start."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        expected = ec.EllipticCurvePrivateKey if algorithm == "ES256" else ed25519.Ed25519PrivateKey
        if not isinstance(key, expected):
            raise ValueError(f"{path} does not hold a key for {algorithm}; move it away to make a new one")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    new_key: PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    )
    pem = new_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    try:
        os.link(temp, path)  # fails if another process made one meanwhile: then use theirs
    except FileExistsError:
        os.unlink(temp)
        return load_or_create_key(path, algorithm)
    os.unlink(temp)
    return new_key


def key_id(key: PrivateKey) -> str:
    """libtrust-style short id of the public key (what distribution puts in `kid`)."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")


class TokenService:
    def __init__(self, config: AuthConfig, key: PrivateKey) -> None:
        self.service = config.service
        self.issuer = config.issuer
        self.settings = config.token
        self.algorithm = config.token.algorithm
        self._key = key
        self._public = key.public_key()
        self.kid = key_id(key)
        # Tokens already verified, until their exp: an ES256 check costs ~1-2 ms here, and a client sends the
        # same token with every request of a pull. Only expiry can change a verified token's verdict.
        self._verified: dict[str, dict[str, Any]] = {}

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid, "typ": "JWT"})

    def issue_access(self, subject: str | None, access: list[dict[str, Any]]) -> tuple[str, int, int]:
        now = int(time.time())
        ttl = max(1, int(self.settings.ttl))
        claims = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "access": access,
        }
        return self._sign(claims), ttl, now

    def issue_refresh(self, subject: str, fingerprint: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service + REFRESH_AUDIENCE_SUFFIX,
            "exp": now + int(self.settings.refresh_ttl),
            "nbf": now,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "pwh": fingerprint,
        }
        return self._sign(claims)

    def verify_access(self, token: str) -> dict[str, Any]:
        hit = self._verified.get(token)
        if hit is not None:
            if hit["exp"] + self.settings.leeway >= time.time():
                return hit
            del self._verified[token]
            raise TokenInvalid("token expired")
        claims = self._verify(token, self.service)
        if isinstance(claims.get("exp"), (int, float)):
            if len(self._verified) >= VERIFIED_CACHE_ENTRIES:
                now = time.time()
                self._verified = {t: c for t, c in self._verified.items() if c["exp"] + self.settings.leeway >= now}
                if len(self._verified) >= VERIFIED_CACHE_ENTRIES:
                    self._verified.clear()
            self._verified[token] = claims
        return claims

    def verify_refresh(self, token: str) -> dict[str, Any]:
        return self._verify(token, self.service + REFRESH_AUDIENCE_SUFFIX)

    def _verify(self, token: str, audience: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenInvalid("malformed token") from exc
        if any(name in header for name in _KEY_CHOOSING_HEADERS):
            raise TokenInvalid("a token may not name or embed its own key")
        if "kid" in header and header["kid"] != self.kid:
            raise TokenInvalid("token signed by an unknown key")
        if header.get("alg") != self.algorithm:
            raise TokenInvalid("token algorithm not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public,
                algorithms=[self.algorithm],
                audience=audience,
                issuer=self.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenInvalid("token expired") from exc
        except jwt.PyJWTError as exc:
            raise TokenInvalid("token not valid here") from exc
        if not isinstance(claims.get("sub"), str):
            raise TokenInvalid("token has no subject")
        return claims


def granted_actions(claims: dict[str, Any], kind: str, name: str) -> frozenset[str]:
    """What an access token's `access` claim grants on one resource."""
    actions: set[str] = set()
    access = claims.get("access")
    if not isinstance(access, list):
        return frozenset()
    for entry in access:
        if isinstance(entry, dict) and entry.get("type") == kind and entry.get("name") == name:
            listed = entry.get("actions")
            if isinstance(listed, list):
                actions.update(a for a in listed if isinstance(a, str))
    return frozenset(actions)
