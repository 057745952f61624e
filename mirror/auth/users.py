"""Users (config and an htpasswd file), groups and robot accounts; checking a password.

Only bcrypt is accepted (the `bcrypt` package directly). Checking costs the same whether the user exists
or not: an unknown name is compared against a dummy hash of the same cost. A password bcrypt cannot take
(over 72 bytes) is a failed login, never an exception. A verified credential is remembered for a short
while under a keyed hash (never the password itself), so Docker, which sends Basic credentials with every
request, does not pay a bcrypt round per blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from mirror.auth.policy import Identity
from mirror.auth.settings import BCRYPT_PREFIXES, ROBOT_PREFIX, AuthConfig

log = logging.getLogger(__name__)

# How often (at most) the htpasswd and robots files are looked at for changes.
RELOAD_CHECK_SECONDS = 1.0
ROBOT_SECRET_BYTES = 48  # 64 URL-safe characters: under bcrypt's 72-byte limit, far beyond guessing
BCRYPT_ROUNDS = 12


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    password_hash: bytes
    kind: str  # user, robot
    groups: frozenset[str] = frozenset()
    expires: float | None = None  # robots: unix time after which the secret is refused

    def fingerprint(self) -> str:
        """Changes when the password does: a refresh token carries it, so a new password revokes old ones."""
        return hashlib.sha256(self.password_hash).hexdigest()[:16]


@dataclass(slots=True)
class _WatchedFile:
    path: Path
    signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns)
    accounts: dict[str, Account] | None = None


def read_htpasswd(path: Path) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not name or not hashed.startswith(BCRYPT_PREFIXES):
            log.warning("%s line %d: not user:bcrypt-hash; ignored (only bcrypt is accepted)", path, number)
            continue
        accounts[name] = Account(name, hashed.encode(), "user")
    return accounts


def read_robots(path: Path) -> dict[str, Account]:
    data = json.loads(path.read_text())
    accounts = {}
    for name, entry in data.get("robots", {}).items():
        full = f"{ROBOT_PREFIX}{name}"
        accounts[full] = Account(
            full, entry["hash"].encode(), "robot", frozenset(entry.get("groups", ())), entry.get("expires")
        )
    return accounts


def create_robot(path: Path, name: str, groups: Iterable[str], expires: float | None) -> str:
    """Add (or replace) robot `name` in the robots file; return its secret, which is shown only once."""
    secret = secrets.token_urlsafe(ROBOT_SECRET_BYTES)
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.loads(path.read_text()) if path.exists() else {"robots": {}}
    data["robots"][name] = {"hash": hashed, "groups": sorted(set(groups)), "expires": expires,
                            "created": time.time()}
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(temp, path)
    return secret


def bcrypt_cost(password_hash: bytes) -> int | None:
    parts = password_hash.split(b"$")
    return int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None


class UserDirectory:
    """Every account the server knows, kept current with its files."""

    def __init__(self, config: AuthConfig, robots_file: Path) -> None:
        self._config_accounts = {u.name: Account(u.name, u.password_hash, "user") for u in config.users}
        self._config_groups = {u.name: frozenset(u.groups) for u in config.users}
        self._members: dict[str, set[str]] = {}
        for group, members in config.groups:
            for member in members:
                self._members.setdefault(member, set()).add(group)
        self._htpasswd = _WatchedFile(config.htpasswd) if config.htpasswd else None
        self._robots = _WatchedFile(robots_file)
        self._lock = threading.Lock()  # reloads happen in worker threads
        self._checked_at = 0.0
        self._dummies: dict[int, bytes] = {}
        self._dummy_cost = BCRYPT_ROUNDS
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[float, Account]] = {}
        self._cache_ttl = config.credential_cache_ttl
        self._reload_sync(force=True)

    # -- accounts --------------------------------------------------------------------------------
    def _reload_sync(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked_at < RELOAD_CHECK_SECONDS:
                return
            self._checked_at = now
            for watched, reader in ((self._htpasswd, read_htpasswd), (self._robots, read_robots)):
                if watched is not None:
                    self._reload_file(watched, reader)
            self._dummy_cost = self._usual_cost()

    def _usual_cost(self) -> int:
        """The bcrypt cost most accounts use: an unknown name is checked at that cost, so it takes as long
        as a known one (htpasswd -B makes cost 5, Python's bcrypt 12: a fixed dummy cost would tell)."""
        counts: dict[int, int] = {}
        for account in self._all_accounts():
            cost = bcrypt_cost(account.password_hash)
            if cost is not None:
                counts[cost] = counts.get(cost, 0) + 1
        return max(counts, key=lambda c: counts[c]) if counts else BCRYPT_ROUNDS

    def _all_accounts(self) -> list[Account]:
        found = list(self._config_accounts.values())
        for watched in (self._robots, self._htpasswd):
            if watched is not None and watched.accounts:
                found.extend(watched.accounts.values())
        return found

    def _dummy(self) -> bytes:
        cost = self._dummy_cost
        if cost not in self._dummies:
            self._dummies[cost] = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        return self._dummies[cost]

    @staticmethod
    def _reload_file(watched: _WatchedFile, reader: object) -> None:
        try:
            st = watched.path.stat()
        except FileNotFoundError:
            if watched.accounts:
                log.warning("%s is gone: its accounts can no longer log in", watched.path)
            watched.signature, watched.accounts = None, {}
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == watched.signature:
            return
        try:
            watched.accounts = reader(watched.path)  # type: ignore[operator]
            watched.signature = signature
            log.info("loaded %d accounts from %s", len(watched.accounts or {}), watched.path)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            # A half-written file: keep the accounts we had, try again at the next check.
            log.warning("cannot read %s (%s); keeping the accounts loaded before", watched.path, exc)

    def account(self, name: str) -> Account | None:
        if name in self._config_accounts:
            return self._config_accounts[name]
        for watched in (self._robots, self._htpasswd):
            if watched is not None and watched.accounts and name in watched.accounts:
                return watched.accounts[name]
        return None

    def identity(self, account: Account) -> Identity:
        groups = set(account.groups) | self._config_groups.get(account.name, frozenset())
        groups |= self._members.get(account.name, set())
        return Identity(account.name, frozenset(groups), account.kind)

    def reload_due(self) -> bool:
        return time.monotonic() - self._checked_at >= RELOAD_CHECK_SECONDS

    async def refresh(self) -> None:
        """Look at the htpasswd and robots files (in a thread: never file I/O on the event loop) if due."""
        if self.reload_due():
            await asyncio.to_thread(self._reload_sync)

    async def current(self, name: str) -> Account | None:
        """The account as it is now (files re-read if due), or None if it is gone or expired."""
        await self.refresh()
        return self.current_loaded(name)

    def current_loaded(self, name: str) -> Account | None:
        account = self.account(name)
        if account is None or (account.expires is not None and account.expires < time.time()):
            return None
        return account

    # -- passwords -------------------------------------------------------------------------------
    async def authenticate(self, name: str, password: str) -> Account | None:
        key = hmac.new(self._cache_key, f"{name}\0{password}".encode(errors="surrogatepass"),
                       hashlib.sha256).digest()
        hit = self._verified.get(key)
        if hit is not None and hit[0] > time.monotonic():
            account = await self.current(name)
            if account is not None and account.password_hash == hit[1].password_hash:
                return account
        account = await asyncio.to_thread(self._check_sync, name, password)
        if account is not None:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = (time.monotonic() + self._cache_ttl, account)
        return account

    def _check_sync(self, name: str, password: str) -> Account | None:
        self._reload_sync()
        account = self.account(name)
        expired = account is not None and account.expires is not None and account.expires < time.time()
        target = account.password_hash if account is not None else self._dummy()
        try:
            secret = password.encode()
            if len(secret) > 72:
                # bcrypt refuses these; spend the same time anyway so length reveals nothing either.
                bcrypt.checkpw(b"", target)
                return None
            matched = bcrypt.checkpw(secret, target)
        except (ValueError, UnicodeError):
            bcrypt.checkpw(b"", self._dummy())
            return None
        if not matched or account is None or expired:
            return None
        return account
