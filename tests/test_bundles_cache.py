"""Import into a mirror whose upstream owns the bundle's names: into that upstream's cache, pinned.

The cache destination (mirror/replication/cache_dest.py) comes from another part of issue 10; until it is
in the build, the same import must be refused with a message naming the upstream, and this test checks
that instead. Once it is, the test checks the images are served from the cache with the upstream gone.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.replication.bundles import BundleError, app_target, export_bundle, import_bundles
from mirror.state import ROUTER
from tests.fake_upstream import FakeUpstream
from tests.proxy_helpers import base_url

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def test_an_import_for_an_unreachable_upstream_is_served_from_its_cache_pinned(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    _, body = fake.add_image("library/alpine", "3.20", [b"alpine layer" * 1000])
    server = await aiohttp_server(fake.app())
    source = await aiohttp_client(create_app(load_config_data({
        "storage": {"path": str(tmp_path / "source")},
        "upstreams": [{"name": "docker.io", "url": base_url(server), "default": True}],
    })))
    bundle = tmp_path / "bundle.tar"
    await export_bundle(source.app[ROUTER], ["alpine:3.20"], bundle)
    await server.close()

    # The far side runs the default-like config: Docker Hub as default upstream, which it cannot reach.
    far = await aiohttp_client(create_app(load_config_data({
        "storage": {"path": str(tmp_path / "far"), "max_size": "1MB"},
        "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True, "timeout": "2s"}],
    })))
    try:
        importlib.import_module("mirror.replication.cache_dest")
    except ImportError:
        with pytest.raises(BundleError, match="routed to the upstream docker.io"):
            await import_bundles(far.app[ROUTER], [bundle], resolve=app_target(far.app))
        return
    results = await import_bundles(far.app[ROUTER], [bundle], resolve=app_target(far.app))
    assert [i.repository for i in results[0].images] == ["docker.io/library/alpine"]
    for path, params in [("library/alpine/manifests/3.20", {}), ("docker.io/library/alpine/manifests/3.20", {}),
                         ("library/alpine/manifests/3.20", {"ns": "docker.io"})]:
        async with far.get(f"/v2/{path}", params=params, headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 200 and await response.read() == body, (path, params)
    layer = json.loads(body)["layers"][0]["digest"]
    async with far.get(f"/v2/library/alpine/blobs/{layer}") as response:
        assert response.status == 200 and await response.read() == b"alpine layer" * 1000
