"""Non-distributable ("foreign") layers beyond the manifest PUT: gc and the pull-through side (issue 9 item 7).

A registry is not given these layers; when a client pushes one anyway it is content like any other. Pushing
and serving their manifests is covered in test_registry_api.py and test_conformance.py.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient

from tests.cache_helpers import backdate, run_cli, write_config
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of
from tests.proxy_helpers import data_dir, start_mirror
from tests.registry_helpers import ClientFactory, descriptor, push_blob, put_manifest

ND_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"windows","rootfs":{"type":"layers","diff_ids":[]}}'


def manifest(layers: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", CONFIG),
            "layers": layers,
        }
    ).encode()


def foreign(data: bytes) -> dict[str, Any]:
    return descriptor(ND_LAYER_GZIP, data, urls=[f"https://store.example.com/{digest_of(data)}"])


async def test_gc_keeps_a_foreign_layer_that_a_client_pushed_anyway(make_registry: ClientFactory, tmp_path) -> None:
    """`docker push` with allow-nondistributable-artifacts uploads such a layer: while a tagged manifest
    names it, gc must keep it like any referenced blob."""
    client: TestClient = await make_registry()
    layer = b"a windows base layer, pushed anyway"
    for blob in (CONFIG, layer):
        await push_blob(client, "team/win", blob)
    body = manifest([foreign(layer)])
    assert (await put_manifest(client, "team/win", "1", body, OCI_MANIFEST)).status == 201
    root = data_dir(client)
    backdate(root, 7200)
    result = run_cli("gc", "--config", str(write_config(tmp_path / "gc.yml", root)), "--grace", "1h")
    assert result.returncode == 0, result.stderr
    assert digest_of(layer) not in json.loads(result.stdout)["blobs_removed"]
    async with client.get(f"/v2/team/win/blobs/{digest_of(layer)}") as response:
        assert response.status == 200
        assert await response.read() == layer


async def test_a_pulled_manifest_with_foreign_layers_is_served_as_is_and_they_are_not_cached(
    aiohttp_server: Any, make_registry: ClientFactory
) -> None:
    """Through the mirror: the manifest byte for byte, the foreign layer neither fetched with it nor
    pretended to be stored; a client that asks for it anyway gets the upstream's answer."""
    fake = FakeUpstream()
    fake.add_blob(CONFIG)
    ordinary = b"an ordinary layer"
    fake.add_blob(ordinary)
    elsewhere = foreign(b"never on any registry")
    body = manifest([elsewhere, descriptor("application/vnd.oci.image.layer.v1.tar", ordinary)])
    fake.manifests[("library/win", "1")] = (body, OCI_MANIFEST)
    fake.tags["library/win"] = ["1"]
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async with client.get("/v2/library/win/manifests/1", headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200
        assert await response.read() == body
        assert response.headers["Docker-Content-Digest"] == digest_of(body)
    assert fake.count("GET", elsewhere["digest"]) == 0 and fake.count("HEAD", elsewhere["digest"]) == 0
    async with client.get(f"/v2/library/win/blobs/{elsewhere['digest']}") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    async with client.get(f"/v2/library/win/blobs/{digest_of(ordinary)}") as response:
        assert await response.read() == ordinary
    stored = {path.name for path in data_dir(client).rglob("*")}
    assert elsewhere["digest"][len("sha256:"):] not in stored, "a layer it never had is linked or stored"
