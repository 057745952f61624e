"""Layer prefetch: an image manifest fetched from the upstream starts the fills of its config and layers
before the client asks, and the client's blob GETs join them (still one upstream GET per blob).

The fake upstream counts every request, so each test can say exactly which blob GETs the mirror made.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mirror.state import ROUTER
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, Fault, digest_of
from tests.proxy_helpers import eventually, fills_settled, metric_value, metrics_text, start_mirror, temp_files
from tests.test_disk_full import small_fs  # noqa: F401 - the fixture, used by name below

MiB = 1 << 20
ACCEPT = {"Accept": OCI_MANIFEST}


def layer_digests(manifest: bytes) -> list[str]:
    document = json.loads(manifest)
    return [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]


def blob_gets(fake: FakeUpstream, digest: str) -> int:
    return fake.count("GET", f"/blobs/{digest}")


async def prefetch_results(client: Any) -> dict[str, float]:
    text = await metrics_text(client)
    return {result: metric_value(text, "mirror_prefetch_fills_total", result=result)
            for result in ("ok", "failed", "cached", "running", "no_room", "cancelled")}


async def test_a_manifest_get_fills_its_config_and_layers_before_the_client_asks(aiohttp_server, make_registry):
    fake = FakeUpstream()
    _, manifest = fake.add_image("library/app", "1", [os.urandom(300_000), os.urandom(700_000), b"small"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    digests = layer_digests(manifest)
    await eventually(lambda: all(blob_gets(fake, d) == 1 for d in digests), what="every blob fetched ahead")
    await fills_settled(client)
    assert (await prefetch_results(client))["ok"] == len(digests)

    for digest in digests:  # the pull itself: all hits, no upstream request
        async with client.get(f"/v2/app/blobs/{digest}") as response:
            assert response.status == 200
            assert digest_of(await response.read()) == digest
    assert all(blob_gets(fake, d) == 1 for d in digests)
    assert fake.count("GET", "/manifests/") == 1  # prefetch costs no manifest GET (Docker Hub's pull budget)


async def test_the_clients_blob_gets_join_the_running_prefetches(aiohttp_server, make_registry):
    fake = FakeUpstream()
    layers = [os.urandom(MiB), os.urandom(MiB)]
    _, manifest = fake.add_image("library/app", "1", layers)
    for layer in layers:  # 16 pieces of 64 KiB, 50 ms apart: still arriving when the client asks
        fake.faults[digest_of(layer)] = Fault("slow", delay=0.05)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    await eventually(lambda: all(fake.bytes_sent[digest_of(layer)] > 0 for layer in layers),
                     what="both prefetches under way")

    async def pull(data: bytes) -> bytes:
        async with client.get(f"/v2/app/blobs/{digest_of(data)}") as response:
            assert response.status == 200
            return await response.read()

    bodies = await asyncio.gather(*(pull(layer) for layer in layers))
    assert bodies == layers
    for digest in layer_digests(manifest):
        assert blob_gets(fake, digest) == 1
    text = await metrics_text(client)
    assert metric_value(text, "mirror_prefetch_claims_total", upstream="fake.io") == 2
    await fills_settled(client)
    assert (await prefetch_results(client))["ok"] == 3


async def test_layers_are_on_their_way_while_the_manifest_is_still_being_stored(
    aiohttp_server, make_registry, monkeypatch
):
    """Storing the manifest (a write, an fsync, index rows) does not hold the layer GETs back: at a
    distance their round trips overlap it, and Docker's GET of the config, right after the manifest,
    finds its fill running."""
    fake = FakeUpstream()
    _, manifest = fake.add_image("library/app", "1", [os.urandom(200_000), os.urandom(100_000)])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True)
    blobs = client.server.app[ROUTER].upstreams["fake.io"].registry.blobs
    store_manifest = blobs.put_bytes
    digests = layer_digests(manifest)

    async def store_once_the_layers_are_asked_for(body: bytes, digest: Any) -> Any:
        await eventually(lambda: all(blob_gets(fake, d) == 1 for d in digests), timeout=3.0,
                         what="the layer GETs, while the manifest is being stored")
        return await store_manifest(body, digest)

    monkeypatch.setattr(blobs, "put_bytes", store_once_the_layers_are_asked_for)
    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
        assert await response.read() == manifest
    await fills_settled(client)
    assert (await prefetch_results(client))["ok"] == len(digests)
    assert all(blob_gets(fake, d) == 1 for d in digests)


async def test_with_prefetch_off_a_manifest_get_fetches_no_blob(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/app", "1", [os.urandom(100_000)])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=False)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    await asyncio.sleep(0.3)  # a prefetch would have sent its GETs by now (one loop turn is enough)
    assert fake.count("GET", "/blobs/") == 0
    assert sum((await prefetch_results(client)).values()) == 0


async def test_prefetch_is_on_by_default(aiohttp_server, make_registry):
    fake = FakeUpstream()
    _, manifest = fake.add_image("library/app", "1", [os.urandom(100_000)])
    server = await aiohttp_server(fake.app())
    client = await make_registry(upstreams=[{"name": "fake.io", "url": f"http://{server.host}:{server.port}",
                                             "default": True, "library_prefix": True}])
    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    await eventually(lambda: all(blob_gets(fake, d) == 1 for d in layer_digests(manifest)), what="prefetch")


async def test_an_index_prefetches_nothing_until_the_client_picks_a_platform(aiohttp_server, make_registry):
    fake = FakeUpstream()
    amd64 = fake.add_image("library/app", "amd64", [os.urandom(200_000)])
    arm64 = fake.add_image("library/app", "arm64", [os.urandom(200_000)])
    fake.add_index("library/app", "1", [amd64, arm64])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True)

    async with client.get("/v2/app/manifests/1", headers={"Accept": "application/vnd.oci.image.index.v1+json"}) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)
    assert fake.count("GET", "/blobs/") == 0  # neither platform's layers: the client has not chosen

    async with client.get(f"/v2/app/manifests/{amd64[0]}", headers=ACCEPT) as response:
        assert response.status == 200
    await eventually(lambda: all(blob_gets(fake, d) == 1 for d in layer_digests(amd64[1])), what="amd64 fetched")
    await fills_settled(client)
    # (Both images share one config blob, the fake's; the arm64 layer is what must stay untouched.)
    assert all(blob_gets(fake, d) == 0 for d in layer_digests(arm64[1])[1:])


async def test_non_distributable_layers_are_not_prefetched(aiohttp_server, make_registry):
    fake = FakeUpstream()
    config = fake.add_blob(b'{"architecture": "amd64", "os": "linux"}')
    normal = os.urandom(50_000)
    foreign = fake.add_blob(os.urandom(50_000))  # present upstream, but the manifest says: fetch from urls
    restricted = fake.add_blob(os.urandom(50_000))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 40},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": fake.add_blob(normal),
             "size": len(normal)},
            {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": foreign,
             "size": 50_000, "urls": ["https://example.invalid/layer"]},
            {"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar", "digest": restricted,
             "size": 50_000},
        ],
    }).encode()
    fake.manifests[("library/app", "1")] = (manifest, OCI_MANIFEST)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    await eventually(lambda: blob_gets(fake, digest_of(normal)) == 1 and blob_gets(fake, config) == 1,
                     what="the distributable blobs fetched ahead")
    await fills_settled(client)
    assert blob_gets(fake, foreign) == 0
    assert blob_gets(fake, restricted) == 0
    assert (await prefetch_results(client))["ok"] == 2


async def test_a_layer_beyond_the_cache_bound_is_not_prefetched(aiohttp_server, make_registry):
    fake = FakeUpstream()
    big = os.urandom(3 * MiB)
    _, manifest = fake.add_image("library/app", "1", [big])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True,
                                   config={"storage": {"max_size": 2 * MiB}})

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
        assert await response.read() == manifest
    results = await _settled_prefetch_results(client, expected=2)
    assert results["no_room"] == 1 and results["ok"] == 1  # the config fits; the layer would evict
    assert blob_gets(fake, digest_of(big)) == 0
    async with client.get(f"/v2/app/blobs/{digest_of(big)}") as response:  # the client still gets it
        assert response.status == 200
        assert await response.read() == big


async def _settled_prefetch_results(client: Any, *, expected: int) -> dict[str, float]:
    for _ in range(500):
        results = await prefetch_results(client)
        if sum(results.values()) >= expected:
            return results
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {expected} prefetches finished: {results}")


# -- a real, small filesystem ----------------------------------------------------------------------
async def start_on(small: Path, aiohttp_server: Any, make_registry: Any, fake: FakeUpstream) -> Any:
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, prefetch=True,
                                   config={"storage": {"path": str(small / "data")}})
    return client


async def test_a_prefetch_with_no_disk_room_is_skipped_and_the_manifest_still_served(
    small_fs: Path, aiohttp_server, make_registry  # noqa: F811 - the fixture imported above
):
    fake = FakeUpstream()
    big = os.urandom(24 * MiB)  # with the 16 MiB kept free, more than the 32 MiB filesystem has room for
    _, manifest = fake.add_image("library/app", "1", [big])
    client = await start_on(small_fs, aiohttp_server, make_registry, fake)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
        assert await response.read() == manifest
    results = await _settled_prefetch_results(client, expected=2)
    assert results["no_room"] == 1 and results["ok"] == 1
    assert blob_gets(fake, digest_of(big)) == 0
    assert temp_files(client) == []


async def test_a_clients_fill_that_finds_no_room_cancels_an_unclaimed_prefetch(
    small_fs: Path, aiohttp_server, make_registry  # noqa: F811 - the fixture imported above
):
    fake = FakeUpstream()
    prefetched = os.urandom(10 * MiB)
    fake.add_image("library/app", "1", [prefetched])
    fake.faults[digest_of(prefetched)] = Fault("stall", delay=30)  # half of it, then nothing
    wanted = fake.add_blob(os.urandom(10 * MiB))
    client = await start_on(small_fs, aiohttp_server, make_registry, fake)

    async with client.get("/v2/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 200
    await eventually(lambda: fake.bytes_sent[digest_of(prefetched)] >= 5 * MiB, what="the prefetch half done")
    # 10 MiB of it counted against the disk, 10 MiB more for this, 16 MiB kept free: 36 > 32. The prefetch
    # nobody asked for gives way.
    async with client.get(f"/v2/other/blobs/{wanted}") as response:
        assert response.status == 200
        assert digest_of(await response.read()) == wanted
    await fills_settled(client)
    assert (await prefetch_results(client))["cancelled"] == 1
    # The cancelled layer is fetched again when a client does ask for it (and the stall is over by then).
    fake.faults.clear()
    async with client.get(f"/v2/app/blobs/{digest_of(prefetched)}") as response:
        assert response.status == 200
        assert await response.read() == prefetched


@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_prefetch_concurrency_must_be_a_positive_whole_number(value: object):
    from mirror.config import ConfigError, load_config_data

    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.prefetch_concurrency"):
        load_config_data({"upstreams": [{"name": "a.io", "url": "https://a.io", "prefetch_concurrency": value}]})


def test_prefetch_defaults_to_on_with_eight_at_a_time_and_must_be_a_boolean():
    from mirror.config import ConfigError, load_config_data

    upstream = load_config_data({"upstreams": [{"name": "a.io", "url": "https://a.io"}]}).upstreams[0]
    assert (upstream.prefetch, upstream.prefetch_concurrency) == (True, 8)
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.prefetch: expected true or false"):
        load_config_data({"upstreams": [{"name": "a.io", "url": "https://a.io", "prefetch": "yes"}]})
