import asyncio
import os

from tests.fake_upstream import FakeUpstream, upstream_config


async def test_pull_through_and_single_fill(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True, blob_delay=0.002)
    layer = os.urandom(3 << 20)
    digest, manifest = fake.add_image("library/alpine", "3.20", [layer])
    server = await aiohttp_server(fake.app())
    client = await make_registry(upstreams=[upstream_config(str(server.make_url("")).rstrip("/"), library_prefix=True)])

    r = await client.get("/v2/alpine/manifests/3.20")
    assert r.status == 200, await r.text()
    assert await r.read() == manifest
    layer_digest = fake.add_blob(layer)

    async def pull() -> bytes:
        resp = await client.get(f"/v2/library/alpine/blobs/{layer_digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(b == layer for b in bodies)
    assert fake.count("GET", layer_digest) == 1
    r = await client.get(f"/v2/library/alpine/blobs/{layer_digest}")
    assert await r.read() == layer
    assert fake.count("GET", layer_digest) == 1
