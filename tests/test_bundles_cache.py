"""Import into a mirror whose upstream owns the bundle's names: into that upstream's cache, pinned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.replication.bundles import app_target, export_bundle, import_bundles
from mirror.state import CACHE, ROUTER
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
    results = await import_bundles(far.app[ROUTER], [bundle], resolve=app_target(far.app))
    assert [i.repository for i in results[0].images] == ["docker.io/library/alpine"]
    await far.app[CACHE].wait_reconciled()
    await far.app[CACHE].evict_to(0)  # an eviction storm: everything unpinned goes
    for path, params in [("library/alpine/manifests/3.20", {}), ("docker.io/library/alpine/manifests/3.20", {}),
                         ("library/alpine/manifests/3.20", {"ns": "docker.io"})]:
        async with far.get(f"/v2/{path}", params=params, headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 200 and await response.read() == body, (path, params)
    layer = json.loads(body)["layers"][0]["digest"]
    async with far.get(f"/v2/library/alpine/blobs/{layer}") as response:
        assert response.status == 200 and await response.read() == b"alpine layer" * 1000
