from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import load_config_data

# Real-client fixtures (distribution registry with token auth, dockerd, skopeo, a mirror process).
pytest_plugins = ["tests.support.fixtures"]

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_registry(aiohttp_client: Any, tmp_path: Path) -> ClientFactory:
    """An in-process mirror on a random port; keyword arguments are config keys."""

    async def factory(**config: Any) -> TestClient:
        config.setdefault("storage", {}).setdefault("path", str(tmp_path / "data"))
        return await aiohttp_client(create_app(load_config_data(config)))

    return factory


@pytest.fixture
async def registry(make_registry: ClientFactory) -> TestClient:
    """A private registry (no upstreams): every repository is local."""
    return await make_registry()
