"""Shared by the access-control tests: a policy with a few users, and clients logged in as each."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import load_config_data

# Cost 4 keeps the suite fast; the timing test makes its own slower hashes.
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "ops": "ops-pw", "carol": "carol-pw"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hashed(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def auth_config(tmp_path: Path, **auth: Any) -> dict[str, Any]:
    """alice and bob are in group ci (push team/**, no overwrite); ops may do anything on team/**;
    carol reads private/**; anonymous may pull public/** and mirrored docker.io/**."""
    section: dict[str, Any] = {
        "users": {
            "alice": {"password_hash": hashed(PASSWORDS["alice"]), "groups": ["ci"]},
            "ops": {"password_hash": hashed(PASSWORDS["ops"])},
            "carol": {"password_hash": hashed(PASSWORDS["carol"])},
        },
        "groups": {"ci": ["bob"], "readers": ["carol"]},
        "htpasswd": str(_htpasswd(tmp_path, {"bob": PASSWORDS["bob"]})),
        "access": [
            {"repository": "team/**", "groups": {"ci": ["pull", "push"]},
             "users": {"ops": ["pull", "push", "delete", "overwrite"]}},
            {"repository": "team/release/**", "groups": {"ci": ["pull", "push"]},
             "users": {"ops": ["*"]}, "immutable_tags": ["v*"]},
            {"repository": "public/**", "anonymous": ["pull"], "groups": {"ci": ["push"]}, "users": {"ops": ["*"]}},
            {"repository": "private/**", "groups": {"readers": ["pull"]}, "users": {"ops": ["*"]}},
            {"repository": "docker.io/**", "anonymous": ["pull"], "users": {"ops": ["*"]}},
        ],
        "login_backoff": {"free_failures": 1000},
    }
    section.update(auth)
    return {
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9", "offline": True}],
        "local": {"repositories": ["team/**", "public/**", "private/**", "other/**"]},
        "auth": section,
    }


def _htpasswd(tmp_path: Path, users: dict[str, str]) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{name}:{hashed(pw)}\n" for name, pw in users.items()))
    return path


class Clients:
    """One in-process server; `as_(user)` is a client that sends that user's Basic credentials."""

    def __init__(self, anonymous: TestClient, factory: Any) -> None:
        self.anonymous = anonymous
        self._factory = factory
        self._clients: dict[str, TestClient] = {}

    @property
    def app(self) -> web.Application:
        return self.anonymous.server.app  # type: ignore[return-value]

    async def as_(self, user: str, password: str | None = None) -> TestClient:
        key = f"{user}:{password}"
        if key not in self._clients:
            self._clients[key] = await self.login(user, PASSWORDS[user] if password is None else password)
        return self._clients[key]

    async def login(self, user: str, password: str) -> TestClient:
        return await self._factory(self.anonymous.server, headers={"Authorization": basic(user, password)})


async def start(aiohttp_client: Any, config: dict[str, Any]) -> Clients:
    anonymous = await aiohttp_client(create_app(load_config_data(config)))
    return Clients(anonymous, aiohttp_client)
