from __future__ import annotations

import os
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


# MIRROR_TEST_STORAGE=s3 runs every in-process registry on S3 (a bucket of its own on the session's real
# Ceph RGW) instead of the filesystem: the behaviour suites then prove the S3 backend too.
STORAGE_ENV = "MIRROR_TEST_STORAGE"


@pytest.fixture
def make_registry(aiohttp_client: Any, tmp_path: Path, request: pytest.FixtureRequest) -> ClientFactory:
    """An in-process mirror on a random port; keyword arguments are config keys."""

    async def factory(**config: Any) -> TestClient:
        storage = config.setdefault("storage", {})
        storage.setdefault("path", str(tmp_path / "data"))
        if os.environ.get(STORAGE_ENV) == "s3" and "backend" not in storage:
            from tests.support.rgw import new_bucket

            storage["backend"] = "s3"
            storage["s3"] = await new_bucket(request.getfixturevalue("rgw"))
        return await aiohttp_client(create_app(load_config_data(config)))

    return factory


@pytest.fixture
async def registry(make_registry: ClientFactory) -> TestClient:
    """A private registry (no upstreams): every repository is local."""
    return await make_registry()
