"""Who may read a cached blob (issue 9, items 1 and 2), against in-process fake upstreams.

A fill and the links it leaves belong to one upstream: a client of another upstream reads those bytes
only after its own upstream vouched for them, and the link it earns goes into its own upstream's cache.
A manifest an upstream served through a repository vouches for every blob it names there: those are read
without an upstream HEAD, and with the upstream gone.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from mirror.cache.maintenance import gc
from tests.fake_upstream import OCI_INDEX, OCI_MANIFEST, FakeUpstream, digest_of
from tests.proxy_helpers import base_url, blob_files, data_dir, eventually, fills_settled
from tests.registry_helpers import error_codes

LAYER_BYTES = (1 << 20) + 4321


async def _two_upstreams(aiohttp_server: Any, make_registry: Any, one: FakeUpstream, two: FakeUpstream) -> Any:
    """A mirror with upstreams one.io and two.io (addressed by path prefix), each a fake of its own."""
    one_server, two_server = await aiohttp_server(one.app()), await aiohttp_server(two.app())
    return await make_registry(
        upstreams=[
            {"name": "one.io", "url": base_url(one_server)},
            {"name": "two.io", "url": base_url(two_server)},
        ]
    )


async def _read(client: Any, url: str) -> tuple[int, bytes]:
    async with client.get(url) as response:
        return response.status, await response.read()


def _requests_for(fake: FakeUpstream, digest: str) -> int:
    return sum(n for (_method, path), n in fake.requests.items() if digest in path)


# -- item 1: fills and links are scoped by upstream --------------------------------------------------
async def test_a_fill_from_one_upstream_is_not_readable_through_another(aiohttp_server, make_registry):
    one, two = FakeUpstream(blob_delay=0.02), FakeUpstream()
    layer = os.urandom(LAYER_BYTES)
    digest = one.add_blob(layer)  # two.io has no such blob anywhere
    client = await _two_upstreams(aiohttp_server, make_registry, one, two)

    first = asyncio.create_task(_read(client, f"/v2/one.io/team/app/blobs/{digest}"))
    await eventually(lambda: one.bytes_sent[digest] > 0, what="one.io's download to start")
    async with client.get(f"/v2/two.io/team/app/blobs/{digest}") as response:
        assert response.status == 404
        assert await error_codes(response) == ["BLOB_UNKNOWN"]
    assert _requests_for(two, digest) >= 1  # two.io itself was asked
    assert await first == (200, layer)
    await fills_settled(client)

    # Stored now, and still not readable through two.io: it says it has no such blob.
    async with client.get(f"/v2/two.io/team/app/blobs/{digest}") as response:
        assert response.status == 404
    async with client.head(f"/v2/two.io/team/app/blobs/{digest}") as response:
        assert response.status == 404
    assert one.count("GET", digest) == 1


async def test_a_blob_another_upstream_vouched_for_is_linked_in_that_upstreams_cache(aiohttp_server, make_registry):
    one, two = FakeUpstream(blob_delay=0.02), FakeUpstream()
    layer = os.urandom(LAYER_BYTES)
    digest = one.add_blob(layer)
    two.add_blob(layer)
    one.blob_repos[digest] = {"team/app"}
    two.blob_repos[digest] = {"team/other"}
    client = await _two_upstreams(aiohttp_server, make_registry, one, two)

    first = asyncio.create_task(_read(client, f"/v2/one.io/team/app/blobs/{digest}"))
    await eventually(lambda: one.bytes_sent[digest] > 0, what="one.io's download to start")
    assert await _read(client, f"/v2/two.io/team/other/blobs/{digest}") == (200, layer)
    assert await first == (200, layer)
    await fills_settled(client)

    # two.io vouched for team/other in two.io's cache, not in one.io's: one.io says team/other lacks it.
    async with client.get(f"/v2/one.io/team/other/blobs/{digest}") as response:
        assert response.status == 404
    assert one.count("HEAD", f"/v2/team/other/blobs/{digest}") + one.count("GET", f"/v2/team/other/blobs/{digest}") >= 1
    # ... and two.io's team/other reads it as a plain hit from now on.
    before = _requests_for(two, digest)
    assert await _read(client, f"/v2/two.io/team/other/blobs/{digest}") == (200, layer)
    assert _requests_for(two, digest) == before
    links = data_dir(client) / "cache"
    assert (links / "two.io" / "team/other" / "_layers" / "sha256" / digest.split(":")[1]).is_file()
    assert not (links / "one.io" / "team/other" / "_layers" / "sha256" / digest.split(":")[1]).exists()


async def test_concurrent_clients_of_two_upstreams_cause_one_download_from_each(aiohttp_server, make_registry):
    one, two = FakeUpstream(blob_delay=0.02), FakeUpstream(blob_delay=0.02)
    layer = os.urandom(LAYER_BYTES)
    digest = one.add_blob(layer)
    two.add_blob(layer)
    client = await _two_upstreams(aiohttp_server, make_registry, one, two)

    urls = [f"/v2/{upstream}/team/app/blobs/{digest}" for upstream in ("one.io", "two.io") for _ in range(10)]
    results = await asyncio.gather(*(_read(client, url) for url in urls))
    assert results == [(200, layer)] * len(urls)
    # Single flight per upstream: each was asked once, and nobody needed a HEAD.
    assert one.count("GET", digest) == 1 and two.count("GET", digest) == 1
    assert one.count("HEAD", digest) == 0 and two.count("HEAD", digest) == 0
    await fills_settled(client)
    assert digest in blob_files_by_digest(client)


def blob_files_by_digest(client: Any) -> set[str]:
    return {f"sha256:{name}" for name in blob_files(client)}


# -- item 2: what a served manifest names is readable through its repository ------------------------
def _image(fake: FakeUpstream, repo: str, tag: str, layers: list[bytes], label: str) -> tuple[str, bytes, str]:
    """An image with a config of its own; returns (manifest digest, manifest, config digest)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"l": label}}}).encode()
    config_digest = fake.add_blob(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": fake.add_blob(layer),
                    "size": len(layer)} for layer in layers],
    }).encode()
    digest = digest_of(manifest)
    fake.manifests[(repo, tag)] = fake.manifests[(repo, digest)] = (manifest, OCI_MANIFEST)
    return digest, manifest, config_digest


async def _get_manifest(client: Any, repo: str, reference: str) -> bytes:
    async with client.get(f"/v2/{repo}/manifests/{reference}",
                          headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_a_layer_another_image_brought_is_read_through_a_manifest_that_names_it_without_a_head(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    base, own_a, own_b = os.urandom(300_000), os.urandom(200_000), os.urandom(100_000)
    _, _, config_a = _image(fake, "team/a", "1", [base, own_a], "a")
    _, _, config_b = _image(fake, "team/b", "1", [base, own_b], "b")
    server = await aiohttp_server(fake.app())
    client = await make_registry(upstreams=[{"name": "fake.io", "url": base_url(server), "default": True}])

    # Image A whole; then image B as Docker pulls it when it already has A: B's base layer is skipped.
    await _get_manifest(client, "team/a", "1")
    for blob in (config_a, digest_of(base), digest_of(own_a)):
        assert (await _read(client, f"/v2/team/a/blobs/{blob}"))[0] == 200
    await _get_manifest(client, "team/b", "1")
    for blob in (config_b, digest_of(own_b)):
        assert (await _read(client, f"/v2/team/b/blobs/{blob}"))[0] == 200
    await fills_settled(client)

    before = sum(fake.requests.values())
    assert await _read(client, f"/v2/team/b/blobs/{digest_of(base)}") == (200, base)
    async with client.head(f"/v2/team/b/blobs/{digest_of(base)}") as response:
        assert response.status == 200 and response.content_length == len(base)
    assert sum(fake.requests.values()) == before  # B's manifest said so: no HEAD, no GET


async def test_with_the_upstream_gone_a_skipped_shared_layer_pulls_through_a_cached_index(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    base, own_a, own_b = os.urandom(300_000), os.urandom(200_000), os.urandom(100_000)
    _, _, config_a = _image(fake, "team/a", "1", [base, own_a], "a")
    child, child_body, config_b = _image(fake, "team/b", "child", [base, own_b], "b")
    fake.add_index("team/b", "1", [(child, child_body)])
    server = await aiohttp_server(fake.app())
    client = await make_registry(
        upstreams=[{"name": "fake.io", "url": base_url(server), "default": True, "tag_ttl": "1h"}]
    )
    await _get_manifest(client, "team/a", "1")
    for blob in (config_a, digest_of(base), digest_of(own_a)):
        assert (await _read(client, f"/v2/team/a/blobs/{blob}"))[0] == 200
    await _get_manifest(client, "team/b", "1")  # the index
    await _get_manifest(client, "team/b", child)
    for blob in (config_b, digest_of(own_b)):
        assert (await _read(client, f"/v2/team/b/blobs/{blob}"))[0] == 200
    await fills_settled(client)

    await server.close()  # the upstream is gone for good
    await _get_manifest(client, "team/b", "1")
    assert await _get_manifest(client, "team/b", child) == child_body
    for blob, data in ((digest_of(base), base), (digest_of(own_b), own_b)):
        assert await _read(client, f"/v2/team/b/blobs/{blob}") == (200, data)


async def test_a_child_manifest_cached_for_another_repository_is_served_through_the_index_naming_it(
    aiohttp_server, make_registry
):
    """The index vouches for its children, and a child first served through it vouches for its layers."""
    fake = FakeUpstream()
    base = os.urandom(300_000)
    child, child_body, config = _image(fake, "team/a", "1", [base], "a")
    fake.manifests[("team/b", child)] = (child_body, OCI_MANIFEST)
    fake.add_index("team/b", "1", [(child, child_body)])
    server = await aiohttp_server(fake.app())
    client = await make_registry(
        upstreams=[{"name": "fake.io", "url": base_url(server), "default": True, "tag_ttl": "1h"}]
    )
    await _get_manifest(client, "team/a", "1")
    for blob in (config, digest_of(base)):
        assert (await _read(client, f"/v2/team/a/blobs/{blob}"))[0] == 200
    await _get_manifest(client, "team/b", "1")
    await fills_settled(client)

    await server.close()
    assert await _get_manifest(client, "team/b", child) == child_body
    assert await _read(client, f"/v2/team/b/blobs/{digest_of(base)}") == (200, base)


async def test_a_linked_blob_not_yet_on_disk_joins_the_running_fill_without_a_head(aiohttp_server, make_registry):
    fake = FakeUpstream(blob_delay=0.02)
    base = os.urandom(LAYER_BYTES)
    _image(fake, "team/a", "1", [base], "a")
    _image(fake, "team/b", "1", [base], "b")
    server = await aiohttp_server(fake.app())
    client = await make_registry(upstreams=[{"name": "fake.io", "url": base_url(server), "default": True}])
    await _get_manifest(client, "team/a", "1")
    await _get_manifest(client, "team/b", "1")

    digest = digest_of(base)
    first = asyncio.create_task(_read(client, f"/v2/team/a/blobs/{digest}"))
    await eventually(lambda: fake.bytes_sent[digest] > 0, what="the download to start")
    assert await _read(client, f"/v2/team/b/blobs/{digest}") == (200, base)
    assert await first == (200, base)
    assert fake.count("GET", digest) == 1
    assert fake.count("HEAD", digest) == 0


async def test_a_manifest_vouches_for_its_layers_but_not_for_non_distributable_ones(aiohttp_server, make_registry):
    fake = FakeUpstream()
    secret, public = os.urandom(50_000), os.urandom(60_000)
    secret_digest = fake.add_blob(secret)
    fake.blob_repos[secret_digest] = {"team/private"}
    _image(fake, "team/private", "1", [secret], "private")
    # A manifest naming the private layer as a foreign one: a registry accepts that without the blob.
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": fake.add_blob(config),
                   "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
             "digest": secret_digest, "size": len(secret), "urls": ["https://example.invalid/layer"]},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": secret_digest,
             "size": len(secret), "urls": ["https://example.invalid/layer"]},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": fake.add_blob(public),
             "size": len(public)},
        ],
    }).encode()
    fake.manifests[("team/evil", "1")] = (manifest, OCI_MANIFEST)
    _image(fake, "team/pub", "1", [public], "pub")
    server = await aiohttp_server(fake.app())
    client = await make_registry(upstreams=[{"name": "fake.io", "url": base_url(server), "default": True}])
    for repo, blob in (("team/private", secret_digest), ("team/pub", digest_of(public))):
        assert (await _read(client, f"/v2/{repo}/blobs/{blob}"))[0] == 200
    await _get_manifest(client, "team/evil", "1")
    await fills_settled(client)

    async with client.get(f"/v2/team/evil/blobs/{secret_digest}") as response:
        assert response.status == 404  # the upstream was asked, and said no
    assert fake.count("HEAD", f"/v2/team/evil/blobs/{secret_digest}") == 1
    # The ordinary layer it names is vouched for: served from the copy team/pub brought, no HEAD.
    assert await _read(client, f"/v2/team/evil/blobs/{digest_of(public)}") == (200, public)
    assert fake.count("HEAD", digest_of(public)) == 0
    assert fake.count("GET", digest_of(public)) == 1


async def test_links_to_blobs_not_on_disk_survive_a_restart_and_gc(aiohttp_server, make_registry):
    fake = FakeUpstream()
    base, own_b = os.urandom(300_000), os.urandom(70_000)
    _, _, config_a = _image(fake, "team/a", "1", [base], "a")
    _image(fake, "team/b", "1", [base, own_b], "b")
    server = await aiohttp_server(fake.app())
    upstreams = [{"name": "fake.io", "url": base_url(server), "default": True}]
    client = await make_registry(upstreams=upstreams)
    await _get_manifest(client, "team/a", "1")
    for blob in (config_a, digest_of(base)):
        assert (await _read(client, f"/v2/team/a/blobs/{blob}"))[0] == 200
    await _get_manifest(client, "team/b", "1")  # links B's config and layers; only the base is on disk
    await fills_settled(client)
    root = data_dir(client)
    await client.close()

    report = await asyncio.to_thread(gc, root, grace_seconds=0)
    assert report.blobs_removed == []
    client = await make_registry(upstreams=upstreams)  # start-up reconciliation runs again
    before = sum(fake.requests.values())
    assert await _read(client, f"/v2/team/b/blobs/{digest_of(base)}") == (200, base)
    assert sum(fake.requests.values()) == before
    # Linked but never stored: a miss like any other, one GET and no HEAD.
    assert await _read(client, f"/v2/team/b/blobs/{digest_of(own_b)}") == (200, own_b)
    assert fake.count("GET", digest_of(own_b)) == 1 and fake.count("HEAD", digest_of(own_b)) == 0
