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


# The behaviour suites run twice, on the filesystem and on S3 (a bucket of their own on the session's real
# Ceph RGW): every test in these modules that builds a registry gets a [fs] and an [s3] variant. On S3 the
# pull-through faults run with the shared tier in the bucket behind the node's disk cache.
# MIRROR_TEST_STORAGE=s3 puts every other in-process registry on S3 too (a manual run).
STORAGE_ENV = "MIRROR_TEST_STORAGE"
BOTH_STORAGES = {"test_registry_api", "test_bad_input", "test_conformance", "test_proxy_faults"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage_kind" in metafunc.fixturenames and metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_STORAGES:
        # Module scope: the conformance module's one live server per storage, not one per test.
        metafunc.parametrize("storage_kind", ["fs", "s3"], scope="module")


@pytest.fixture(scope="module")
def storage_kind() -> str:
    """Where local repositories live in this test: fs (the default) or s3."""
    return "s3" if os.environ.get(STORAGE_ENV) == "s3" else "fs"


@pytest.fixture
def make_registry(
    aiohttp_client: Any, tmp_path: Path, request: pytest.FixtureRequest, storage_kind: str
) -> ClientFactory:
    """An in-process mirror on a random port; keyword arguments are config keys."""

    async def factory(**config: Any) -> TestClient:
        storage = config.setdefault("storage", {})
        storage.setdefault("path", str(tmp_path / "data"))
        if storage_kind == "s3" and "backend" not in storage:
            from tests.support.rgw import new_bucket

            storage["backend"] = "s3"
            storage["s3"] = await new_bucket(request.getfixturevalue("rgw"))
        return await aiohttp_client(create_app(load_config_data(config)))

    return factory


@pytest.fixture
async def registry(make_registry: ClientFactory) -> TestClient:
    """A private registry (no upstreams): every repository is local."""
    return await make_registry()
