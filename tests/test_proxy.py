"""Pull-through behaviour a user notices, against the in-process fake upstream (issue #3).

Blobs: one download shared by every client and streamed while it runs, Range on in-flight and cached
blobs, cross-repository reads. Manifests: verification by digest, tag TTL and HEAD revalidation, indexes.
Routing: ?ns=, path prefix and default route share one cache; pushes to mirrored names are refused.
Failure modes live in test_proxy_faults.py, upstream authentication in test_proxy_auth.py.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from tests.fake_upstream import FakeUpstream, Fault
from tests.proxy_helpers import (
    blob_files,
    eventually,
    fills_settled,
    metric_value,
    metrics_text,
    start_mirror,
    temp_files,
)
from tests.registry_helpers import digest_of, error_codes, push_image

LAYER_BYTES = (2 << 20) + 12345  # a bit over two write buffers, not a multiple of the fake's 64 KiB pieces


# -- blobs -----------------------------------------------------------------------------------------
async def test_concurrent_misses_share_one_download_streamed_as_it_arrives(aiohttp_server, make_registry):
    fake = FakeUpstream(blob_delay=0.02)  # ~34 pieces of 64 KiB: the download takes ~0.7 s
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/blobs/{digest}"

    async def pull() -> tuple[int | None, int, bytes]:
        async with client.get(url) as response:
            assert response.status == 200
            length = response.content_length
            first = await response.content.readany()
            sent_when_first_bytes_arrived = fake.bytes_sent[digest]
            rest = await response.read()
            return length, sent_when_first_bytes_arrived, first + rest

    early = [asyncio.create_task(pull()) for _ in range(25)]
    await eventually(lambda: fake.bytes_sent[digest] > 0, what="the download to start")
    late = [asyncio.create_task(pull()) for _ in range(25)]  # these join a download already running
    results = await asyncio.gather(*early, *late)

    assert fake.count("GET", digest) == 1
    for length, sent_at_first_bytes, body in results:
        assert length == len(layer)  # Content-Length was in the headers, before any byte
        assert body == layer
        # Every client, early or late, got bytes while the upstream was still sending.
        assert sent_at_first_bytes < len(layer)
    await fills_settled(client)  # the commit follows the last byte
    text = await metrics_text(client)
    assert metric_value(text, "mirror_fill_joins_total") >= 49
    assert metric_value(text, "mirror_fills_total", result="ok") == 1

    # Later pulls are plain cache hits.
    async with client.get(url) as response:
        assert await response.read() == layer
    assert fake.count("GET", digest) == 1
    assert temp_files(client) == []


async def test_client_that_disconnects_halfway_does_not_stop_the_fill(aiohttp_server, make_registry):
    fake = FakeUpstream(blob_delay=0.01)
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/blobs/{digest}"

    response = await client.get(url)
    assert response.status == 200
    assert await response.content.readany()
    response.close()  # the client goes away with most of the blob unread

    await eventually(lambda: digest.split(":")[1] in blob_files(client), what="the fill to commit")
    async with client.get(url) as again:
        assert again.status == 200
        assert await again.read() == layer
    assert fake.count("GET", digest) == 1
    assert temp_files(client) == []


async def test_range_on_in_flight_fill_and_on_cached_blob(aiohttp_server, make_registry):
    fake = FakeUpstream(blob_delay=0.02)
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/blobs/{digest}"

    full = asyncio.create_task(client.get(url))
    await eventually(lambda: fake.bytes_sent[digest] > 0, what="the download to start")
    async with client.get(url, headers={"Range": "bytes=100-1099"}) as partial:
        assert partial.status == 206
        assert partial.headers["Content-Range"] == f"bytes 100-1099/{len(layer)}"
        assert partial.content_length == 1000
        assert await partial.read() == layer[100:1100]
    assert fake.bytes_sent[digest] < len(layer), "the range should have been served before the download ended"
    async with client.get(url, headers={"Range": f"bytes={len(layer)}-"}) as unsatisfiable:
        assert unsatisfiable.status == 416
        assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(layer)}"
    async with client.get(url, headers={"Range": "bytes=-10"}) as suffix:  # waits for the verified end
        assert suffix.status == 206
        assert await suffix.read() == layer[-10:]
    async with await full as response:
        assert await response.read() == layer

    # The same requests against the committed file.
    async with client.get(url, headers={"Range": "bytes=100-1099"}) as partial:
        assert partial.status == 206
        assert partial.headers["Content-Range"] == f"bytes 100-1099/{len(layer)}"
        assert await partial.read() == layer[100:1100]
    async with client.get(url, headers={"Range": f"bytes={len(layer) + 5}-"}) as unsatisfiable:
        assert unsatisfiable.status == 416
        assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(layer)}"
    assert fake.count("GET", digest) == 1


async def test_head_on_cached_blob_answers_headers(aiohttp_server, make_registry):
    fake = FakeUpstream()
    layer = os.urandom(4096)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/blobs/{digest}"
    async with client.get(url) as response:
        assert await response.read() == layer
    async with client.head(url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.content_length == len(layer)
    assert fake.count("GET", digest) == 1


async def test_head_on_uncached_blob_does_not_download_it(aiohttp_server, make_registry):
    fake = FakeUpstream()
    layer = os.urandom(300_000)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.head(f"/v2/library/alpine/blobs/{digest}") as response:
        assert response.status == 200
        assert response.content_length == len(layer)
        assert response.headers["Docker-Content-Digest"] == digest
    await asyncio.sleep(0.1)  # a download started in the background would have sent its GET by now
    assert fake.count("HEAD", digest) == 1
    assert fake.count("GET", digest) == 0


async def test_blob_cached_for_one_repository_needs_upstream_confirmation_for_another(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    layer = os.urandom(10_000)
    digest = fake.add_blob(layer)
    fake.blob_repos[digest] = {"team/public"}
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async with client.get(f"/v2/team/public/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == layer

    # The bytes are on disk, but knowing the digest is not permission to read them through team/secret.
    async with client.get(f"/v2/team/secret/blobs/{digest}") as response:
        assert response.status == 404
        assert await error_codes(response) == ["BLOB_UNKNOWN"]
    async with client.head(f"/v2/team/secret/blobs/{digest}") as response:
        assert response.status == 404
    assert fake.count("HEAD", f"/v2/team/secret/blobs/{digest}") >= 1
    assert fake.count("GET", digest) == 1

    # Once the upstream says team/secret has the blob too, the cached bytes serve it: no second download.
    fake.blob_repos[digest].add("team/secret")
    async with client.get(f"/v2/team/secret/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == layer
    assert fake.count("GET", digest) == 1
    heads = fake.count("HEAD", f"/v2/team/secret/blobs/{digest}")
    async with client.get(f"/v2/team/secret/blobs/{digest}") as response:  # now linked: a plain hit
        assert await response.read() == layer
    assert fake.count("HEAD", f"/v2/team/secret/blobs/{digest}") == heads


async def test_blob_joined_through_another_repository_is_linked_to_it(aiohttp_server, make_registry):
    fake = FakeUpstream(blob_delay=0.02)
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    first = asyncio.create_task(client.get(f"/v2/team/a/blobs/{digest}"))
    await eventually(lambda: fake.bytes_sent[digest] > 0, what="the download to start")
    async with client.get(f"/v2/team/b/blobs/{digest}") as response:  # upstream confirms with a HEAD
        assert response.status == 200
        assert await response.read() == layer
    async with await first as response:
        assert await response.read() == layer
    assert fake.count("GET", digest) == 1
    heads = fake.count("HEAD", digest)
    for repo in ("team/a", "team/b"):
        async with client.get(f"/v2/{repo}/blobs/{digest}") as response:
            assert await response.read() == layer
    assert fake.count("HEAD", digest) == heads  # both repositories read it as a cache hit now
    assert fake.count("GET", digest) == 1


# -- manifests -------------------------------------------------------------------------------------
async def test_manifest_by_digest_is_verified_and_never_cached_when_wrong(aiohttp_server, make_registry):
    fake = FakeUpstream()
    manifest_digest, manifest = fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults[f"/manifests/{manifest_digest}"] = Fault("wrong", times=1)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/manifests/{manifest_digest}"

    async with client.get(url) as response:
        assert response.status == 502
        assert await response.read() != manifest
    async with client.get(url) as response:  # nothing was cached: fetched again, now right
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == manifest_digest
        assert await response.read() == manifest
    assert fake.count("GET", f"/manifests/{manifest_digest}") == 2
    async with client.get(url) as response:  # immutable: served from the cache from now on
        assert await response.read() == manifest
    async with client.head(url) as response:
        assert response.status == 200
        assert response.content_length == len(manifest)
    assert fake.count("GET", f"/manifests/{manifest_digest}") == 2
    assert fake.count("HEAD", "/manifests/") == 0


async def test_manifest_by_tag_that_does_not_match_its_digest_header_is_refused(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/manifests/3.20"] = Fault("wrong", times=1)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 502
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 200
    assert fake.count("GET", "/manifests/3.20") == 2


async def test_tag_ttl_then_head_revalidation(aiohttp_server, make_registry):
    fake = FakeUpstream()
    old_digest, old = fake.add_image("library/alpine", "latest", [b"old layer"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.2)
    url = "/v2/library/alpine/manifests/latest"

    async with client.get(url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == old_digest
        assert await response.read() == old
    assert fake.count("GET", "/manifests/latest") == 1

    # Within tag_ttl: no upstream request of any kind.
    before = sum(fake.requests.values())
    for _ in range(3):
        async with client.get(url) as response:
            assert await response.read() == old
        async with client.head(url) as response:
            assert response.headers["Docker-Content-Digest"] == old_digest
    assert sum(fake.requests.values()) == before

    # After it: one HEAD, no GET while the tag has not moved.
    await asyncio.sleep(0.25)
    async with client.get(url) as response:
        assert await response.read() == old
    assert fake.count("HEAD", "/manifests/latest") == 1
    assert fake.count("GET", "/manifests/latest") == 1
    async with client.get(url) as response:  # revalidation restarted the TTL
        assert await response.read() == old
    assert fake.count("HEAD", "/manifests/latest") == 1

    # The tag moves upstream: after the TTL the HEAD sees it and the new manifest is fetched.
    new_digest, new = fake.add_image("library/alpine", "latest", [b"new layer"])
    await asyncio.sleep(0.25)
    async with client.get(url) as response:
        assert response.headers["Docker-Content-Digest"] == new_digest
        assert await response.read() == new
    assert fake.count("HEAD", "/manifests/latest") == 2
    assert fake.count("GET", "/manifests/latest") == 2
    # The old manifest stays readable by digest, from the cache.
    async with client.get(f"/v2/library/alpine/manifests/{old_digest}") as response:
        assert await response.read() == old
    assert fake.count("GET", f"/manifests/{old_digest}") == 0
    text = await metrics_text(client)
    assert metric_value(text, "mirror_cache_lookups_total", kind="tag", result="revalidated") == 1


async def test_image_index_and_children_are_cached_alike(aiohttp_server, make_registry):
    fake = FakeUpstream()
    amd = fake.add_image("library/alpine", "amd64-only", [b"amd64 layer"])
    arm = fake.add_image("library/alpine", "arm64-only", [b"arm64 layer"])
    index_digest, index = fake.add_index("library/alpine", "multi", [amd, arm])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=60)

    async def pull_all() -> None:
        async with client.get("/v2/library/alpine/manifests/multi") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
            assert response.headers["Docker-Content-Digest"] == index_digest
            assert await response.read() == index
        for child_digest, body in (amd, arm):
            async with client.get(f"/v2/library/alpine/manifests/{child_digest}") as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
                assert await response.read() == body
        async with client.get(f"/v2/library/alpine/manifests/{index_digest}") as response:
            assert await response.read() == index

    await pull_all()
    before = sum(fake.requests.values())
    await pull_all()
    assert sum(fake.requests.values()) == before
    assert fake.count("GET", f"/manifests/{amd[0]}") == 1
    assert fake.count("GET", f"/manifests/{arm[0]}") == 1


async def test_unknown_manifest_and_blob_are_404(aiohttp_server, make_registry):
    fake = FakeUpstream()
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/nope") as response:
        assert response.status == 404
        assert await error_codes(response) == ["MANIFEST_UNKNOWN"]
    missing = "sha256:" + "0" * 64
    async with client.get(f"/v2/library/alpine/blobs/{missing}") as response:
        assert response.status == 404
        assert await error_codes(response) == ["BLOB_UNKNOWN"]


# -- routing ---------------------------------------------------------------------------------------
async def test_ns_path_prefix_and_default_route_share_one_cache(aiohttp_server, make_registry):
    fake = FakeUpstream()
    layer = os.urandom(5000)
    manifest_digest, manifest = fake.add_image("library/alpine", "3.20", [layer])
    layer_digest = fake.add_blob(layer)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=60)

    async with client.get("/v2/alpine/manifests/3.20", params={"ns": "fake.io"}) as response:
        assert response.status == 200
        assert await response.read() == manifest
    async with client.get(f"/v2/library/alpine/blobs/{layer_digest}", params={"ns": "fake.io"}) as response:
        assert await response.read() == layer
    before = sum(fake.requests.values())

    for prefix in ("/v2/fake.io/library/alpine", "/v2/fake.io/alpine", "/v2/library/alpine", "/v2/alpine"):
        async with client.get(f"{prefix}/manifests/3.20") as response:
            assert response.status == 200, prefix
            assert response.headers["Docker-Content-Digest"] == manifest_digest
            assert await response.read() == manifest
        async with client.get(f"{prefix}/blobs/{layer_digest}") as response:
            assert response.status == 200, prefix
            assert await response.read() == layer
    assert sum(fake.requests.values()) == before


async def test_unknown_ns_is_never_the_default_upstream(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"layer"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    # An ns naming no upstream is looked up locally under the full name (imported bundles live there);
    # nothing was imported, so it is a 404 and the default upstream is never asked.
    async with client.get("/v2/library/alpine/manifests/3.20", params={"ns": "elsewhere.example"}) as response:
        assert response.status == 404
        assert await error_codes(response) == ["MANIFEST_UNKNOWN"]
    # A host with a port (or junk) cannot be part of a local name: 404 too, not a 500 from building a path.
    for ns in ("registry.local:5000", ":", "-1"):
        for path in ("/v2/team/app/tags/list", "/v2/team/app/manifests/1", f"/v2/team/app/blobs/{digest_of(b'x')}"):
            async with client.get(path, params={"ns": ns}) as response:
                assert response.status == 404, (ns, path)
                assert await error_codes(response) == ["NAME_UNKNOWN"]
    assert sum(fake.requests.values()) == 0


async def test_push_to_a_mirrored_repository_is_unsupported_and_names_local_namespaces(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    client, _ = await start_mirror(
        aiohttp_server, make_registry, fake, config={"local": {"repositories": ["team/**", "private"]}}
    )
    for response in (
        await client.post("/v2/library/alpine/blobs/uploads/"),
        await client.post("/v2/fake.io/library/alpine/blobs/uploads/", params={"digest": "sha256:" + "a" * 64}),
        await client.put(
            "/v2/library/alpine/manifests/latest",
            data=b"{}",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        ),
    ):
        async with response:
            assert response.status == 405
            body = await response.json()
            assert body["errors"][0]["code"] == "UNSUPPORTED"
            assert "team/**" in body["errors"][0]["message"]
            assert "private" in body["errors"][0]["message"]
    assert sum(fake.requests.values()) == 0


async def test_local_namespace_stays_local_next_to_a_default_upstream(aiohttp_server, make_registry):
    fake = FakeUpstream()
    client, _ = await start_mirror(
        aiohttp_server, make_registry, fake, config={"local": {"repositories": ["team/**"]}}
    )
    digest, body = await push_image(client, "team/app", "v1")
    async with client.get("/v2/team/app/manifests/v1") as response:
        assert response.status == 200
        assert await response.read() == body
    async with client.get("/v2/team/other/manifests/v1") as response:  # local and absent: no upstream asked
        assert response.status == 404
    assert sum(fake.requests.values()) == 0


async def test_without_upstreams_every_repository_is_local(make_registry):
    client = await make_registry()
    digest, body = await push_image(client, "alpine", "3.20")
    async with client.get(f"/v2/alpine/manifests/{digest}") as response:
        assert response.status == 200
        assert await response.read() == body
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 404  # no library/ rewriting for local names


# -- discovery -------------------------------------------------------------------------------------
async def test_tags_list_is_proxied_and_falls_back_to_cached_tags(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.19", [b"a"])
    fake.add_image("library/alpine", "3.20", [b"b"])
    fake.add_image("library/alpine", "latest", [b"c"])
    client, server = await start_mirror(aiohttp_server, make_registry, fake, timeout=2)

    async with client.get("/v2/alpine/tags/list") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["3.19", "3.20", "latest"]
    assert fake.count("GET", "/tags/list") == 1
    async with client.get("/v2/alpine/manifests/3.20") as response:  # caches one tag
        assert response.status == 200

    await server.close()
    async with client.get("/v2/alpine/tags/list") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["3.20"]
    text = await metrics_text(client)
    assert metric_value(text, "mirror_cache_lookups_total", kind="tags", result="stale") == 1
    async with client.get("/v2/library/never-pulled/tags/list") as response:
        assert response.status == 503  # nothing cached and nobody to ask: retry later, not "no such repo"


async def test_tags_list_of_unknown_repository_is_name_unknown(aiohttp_server, make_registry):
    fake = FakeUpstream()
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/nothing/tags/list") as response:
        assert response.status == 404
        assert await error_codes(response) == ["NAME_UNKNOWN"]


async def test_connection_pool_is_not_exhausted_by_many_cached_pulls(aiohttp_server, make_registry):
    """A response the proxy forgets to release would hold an upstream connection forever."""
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"a"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0)
    timeout = aiohttp.ClientTimeout(total=10)
    for _ in range(80):  # more than the connector's limit of 64
        async with client.get("/v2/alpine/manifests/3.20", timeout=timeout) as response:
            assert response.status == 200
    assert fake.count("HEAD", "/manifests/3.20") == 79


async def test_concurrent_tag_misses_make_one_upstream_request(aiohttp_server, make_registry):
    fake = FakeUpstream()
    digest, manifest = fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/manifests/3.20"] = Fault("slow-headers", delay=0.2)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async def pull() -> bytes:
        async with client.get("/v2/alpine/manifests/3.20") as response:
            assert response.status == 200
            return await response.read()

    assert await asyncio.gather(*(pull() for _ in range(20))) == [manifest] * 20
    assert fake.count("GET", "/manifests/3.20") == 1


async def test_reader_that_starts_after_the_fill_finished_still_gets_every_byte(tmp_path):
    """A client joins a fill, and the fill commits and closes its descriptor before the client's first
    read (a small blob can finish while response headers are being sent): the bytes come from the
    committed file, the client's download is not cut."""
    from mirror.metrics import Metrics
    from mirror.oci.digest import Digest
    from mirror.proxy.fills import Fill, FillManager

    data = os.urandom(5000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = Digest.of(data)

    async def download(fill: Fill) -> None:
        fill.begin(len(data), os.open(path, os.O_RDONLY))
        await fill.commit(path)

    manager = FillManager(Metrics())
    fill = manager.join("fake.io", digest, "library/alpine", download)
    await fill.wait_ready()  # what open_blob returns after
    await eventually(lambda: manager.running("fake.io", digest) is None, what="the fill to finish")
    assert b"".join([chunk async for chunk in fill.iter_range(0, len(data))]) == data
    assert b"".join([chunk async for chunk in fill.iter_range(10, 20)]) == data[10:20]
