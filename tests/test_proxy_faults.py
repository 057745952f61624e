"""When the upstream misbehaves: bad bytes never reach the cache or a client as a whole body, and a
down, failing or rate-limiting upstream still leaves the cache usable (stale-if-error), with errors that
make Docker and containerd move on quickly when nothing is cached.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream, Fault, digest_of, upstream_config
from tests.proxy_helpers import (
    blob_files,
    fills_settled,
    metric_value,
    metrics_text,
    start_mirror,
    temp_files,
)
from tests.registry_helpers import error_codes

LAYER_BYTES = (2 << 20) + 4321


async def _pull_expecting_a_cut(client: aiohttp.ClientSession, url: str, size: int) -> int:
    """GET a blob whose fill fails mid-way: headers arrive, the body is cut. Returns the bytes received."""
    received = 0
    async with client.get(url) as response:
        assert response.status == 200
        assert response.content_length == size
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_chunked(64 * 1024):
                received += len(chunk)
    assert received < size  # never the complete body
    return received


@pytest.mark.parametrize("kind", ["wrong", "truncate"])
async def test_bad_upstream_bytes_cut_every_client_and_leave_nothing_behind(aiohttp_server, make_registry, kind):
    fake = FakeUpstream(blob_delay=0.01)
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    fake.faults[digest] = Fault(kind, times=1)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    url = f"/v2/library/alpine/blobs/{digest}"

    received = await asyncio.gather(*(_pull_expecting_a_cut(client, url, len(layer)) for _ in range(8)))
    assert fake.count("GET", digest) == 1
    if kind == "wrong":
        # Wrong bytes of the right length: everything but the held-back last byte may have been streamed.
        assert max(received) <= len(layer) - 1
    assert digest.split(":")[1] not in blob_files(client)
    assert temp_files(client) == []
    text = await metrics_text(client)
    assert metric_value(text, "mirror_fills_total", result="invalid" if kind == "wrong" else "failed") == 1

    # The failure was not cached: the next request downloads again, and this time gets it right.
    async with client.get(url) as response:
        assert response.status == 200
        assert await response.read() == layer
    assert fake.count("GET", digest) == 2
    await fills_settled(client)
    assert digest.split(":")[1] in blob_files(client)
    assert temp_files(client) == []


async def _mirror_with_a_faulty_layer(aiohttp_server, make_registry, fault: Fault, **upstream):
    """A mirror in front of a fake upstream holding one layer that misbehaves as `fault`:
    (client, fake, layer, its blob URL on the mirror)."""
    fake = FakeUpstream()
    layer = os.urandom(LAYER_BYTES)
    digest = fake.add_blob(layer)
    fake.faults[digest] = fault
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, **upstream)
    return client, fake, layer, f"/v2/library/alpine/blobs/{digest}"


async def test_slow_stream_completes(aiohttp_server, make_registry):
    fake = FakeUpstream()
    layer = os.urandom(600_000)
    digest = fake.add_blob(layer)
    fake.faults[digest] = Fault("slow", delay=0.03)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, timeout=1)
    async with client.get(f"/v2/library/alpine/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == layer


async def test_stalled_stream_is_cut_after_the_timeout(aiohttp_server, make_registry):
    client, _fake, layer, url = await _mirror_with_a_faulty_layer(
        aiohttp_server, make_registry, Fault("stall", times=1, delay=30), timeout=0.5
    )

    started = time.monotonic()
    await _pull_expecting_a_cut(client, url, len(layer))
    assert time.monotonic() - started < 5
    assert temp_files(client) == []
    async with client.get(url) as response:
        assert await response.read() == layer


async def test_manifest_upstream_that_never_answers_gives_503_after_the_timeout(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/manifests/"] = Fault("stall-headers", delay=30)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, timeout=0.3)
    started = time.monotonic()
    async with client.get("/v2/alpine/manifests/3.20") as response:
        assert response.status == 503
    assert time.monotonic() - started < 5


async def _populate(client, fake: FakeUpstream, repo: str = "library/alpine", tag: str = "3.20"):
    """Pull a tag and its layer through the mirror; returns (manifest, layer digest, layer)."""
    async with client.get(f"/v2/{repo}/manifests/{tag}") as response:
        assert response.status == 200
        manifest = await response.read()
    layer_digest = [d for d in fake.blobs if fake.blobs[d].startswith(b"layer-")][0]
    async with client.get(f"/v2/{repo}/blobs/{layer_digest}") as response:
        assert response.status == 200
        layer = await response.read()
    return manifest, layer_digest, layer


def _image(fake: FakeUpstream) -> None:
    fake.add_image("library/alpine", "3.20", [b"layer-" + os.urandom(3000)])


async def _assert_cache_still_serves(client, manifest: bytes, layer_digest: str, layer: bytes) -> None:
    async with client.get("/v2/alpine/manifests/3.20") as response:
        assert response.status == 200
        assert await response.read() == manifest
    async with client.head("/v2/alpine/manifests/3.20") as response:
        assert response.status == 200
    async with client.get(f"/v2/library/alpine/blobs/{layer_digest}") as response:
        assert response.status == 200
        assert await response.read() == layer
    text = await metrics_text(client)
    assert 'result="stale"' in text
    assert metric_value(text, "mirror_cache_lookups_total", kind="tag", result="stale") >= 1


async def test_stopped_upstream_serves_cache_as_stale_and_misses_fail_fast(aiohttp_server, make_registry):
    fake = FakeUpstream()
    _image(fake)
    client, server = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1, timeout=10)
    manifest, layer_digest, layer = await _populate(client, fake)
    await server.close()
    await asyncio.sleep(0.15)

    await _assert_cache_still_serves(client, manifest, layer_digest, layer)
    started = time.monotonic()
    async with client.get("/v2/alpine/manifests/3.21") as response:
        assert response.status == 503
    async with client.get(f"/v2/library/alpine/blobs/sha256:{'1' * 64}") as response:
        assert response.status == 503
    assert time.monotonic() - started < 3  # well under the 10 s timeout: refused connections fail at once


async def test_refused_connection_on_a_closed_port_is_a_quick_503(make_registry):
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await make_registry(upstreams=[upstream_config(f"http://127.0.0.1:{port}", timeout=20)])
    started = time.monotonic()
    async with client.get("/v2/library/alpine/manifests/latest") as response:
        assert response.status == 503
        assert await error_codes(response) == ["UNAVAILABLE"]
    async with client.get(f"/v2/library/alpine/blobs/sha256:{'2' * 64}") as response:
        assert response.status == 503
    assert time.monotonic() - started < 3
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_errors_total", reason="unavailable") >= 2


async def test_upstream_503_serves_cache_as_stale(aiohttp_server, make_registry):
    fake = FakeUpstream()
    _image(fake)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)
    manifest, layer_digest, layer = await _populate(client, fake)
    fake.faults["/v2/"] = Fault("503")
    await asyncio.sleep(0.15)
    await _assert_cache_still_serves(client, manifest, layer_digest, layer)
    async with client.get("/v2/library/alpine/manifests/other") as response:
        assert response.status == 503


async def test_upstream_429_serves_cache_as_stale_and_passes_retry_after_on_a_miss(aiohttp_server, make_registry):
    fake = FakeUpstream(ratelimit_remaining=0)
    _image(fake)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)
    manifest, layer_digest, layer = await _populate(client, fake)
    fake.faults["/v2/"] = Fault("429", retry_after="37")
    await asyncio.sleep(0.15)
    await _assert_cache_still_serves(client, manifest, layer_digest, layer)

    async with client.get("/v2/library/busybox/manifests/latest") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "37"
        assert await error_codes(response) == ["TOOMANYREQUESTS"]
    async with client.get(f"/v2/library/alpine/blobs/sha256:{'3' * 64}") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "37"
    assert fake.count("GET", "/manifests/latest") == 1  # 429 is an answer, not something to retry
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_errors_total", reason="rate_limited") >= 1


async def test_ratelimit_remaining_is_recorded_as_a_gauge(aiohttp_server, make_registry):
    fake = FakeUpstream(ratelimit_remaining=76)
    _image(fake)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    await _populate(client, fake)
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_ratelimit_remaining", upstream="fake.io") == 76
    assert metric_value(text, "mirror_upstream_ratelimit_limit", upstream="fake.io") == 100
    fake.ratelimit_remaining = 75
    async with client.get("/v2/library/alpine/manifests/other-tag") as response:
        assert response.status == 404
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_ratelimit_remaining", upstream="fake.io") == 75


async def test_offline_upstream_serves_the_cache_without_any_upstream_request(
    aiohttp_server, make_registry
):
    fake = FakeUpstream()
    _image(fake)
    online, server = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)
    manifest, layer_digest, layer = await _populate(online, fake)
    await online.close()

    url = str(server.make_url("")).rstrip("/")
    offline = await make_registry(upstreams=[upstream_config(url, offline=True, tag_ttl=0.1, library_prefix=True)])
    await asyncio.sleep(0.15)  # the tag is past its TTL: offline still answers it, as a hit
    before = sum(fake.requests.values())
    async with offline.get("/v2/alpine/manifests/3.20") as response:
        assert response.status == 200
        assert await response.read() == manifest
    async with offline.get(f"/v2/library/alpine/blobs/{layer_digest}") as response:
        assert await response.read() == layer
    async with offline.get("/v2/alpine/tags/list") as response:
        assert (await response.json())["tags"] == ["3.20"]
    async with offline.get("/v2/alpine/manifests/3.21") as response:
        assert response.status == 503
    assert sum(fake.requests.values()) == before
    assert fake.token_requests == []


async def test_black_holed_upstream_answers_within_about_one_timeout(aiohttp_server, make_registry):
    """Retries are for quick failures; an upstream that never answers must not cost clients 3x `timeout`
    (Docker and containerd would rather move on to their next endpoint)."""
    fake = FakeUpstream()
    fake.faults["/manifests/"] = Fault("stall-headers", delay=30)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, timeout=1)
    started = time.monotonic()
    async with client.get("/v2/alpine/manifests/3.20") as response:
        assert response.status == 503
    elapsed = time.monotonic() - started
    assert elapsed < 1.9, f"took {elapsed:.1f}s with timeout: 1s"


async def test_garbled_manifest_on_revalidation_serves_the_cached_copy(aiohttp_server, make_registry):
    fake = FakeUpstream()
    _image(fake)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)
    manifest, _layer_digest, _layer = await _populate(client, fake)
    # The tag moves upstream, but what comes back does not match its own Docker-Content-Digest.
    fake.add_image("library/alpine", "3.20", [b"layer-" + os.urandom(3000)])
    fake.faults["/manifests/3.20"] = Fault("wrong")
    await asyncio.sleep(0.15)
    async with client.get("/v2/alpine/manifests/3.20") as response:
        assert response.status == 200
        assert await response.read() == manifest  # the verified old copy, not the garbage
    text = await metrics_text(client)
    assert metric_value(text, "mirror_cache_lookups_total", kind="tag", result="stale") >= 1


async def test_a_blob_without_content_length_is_served_whole_once_verified(aiohttp_server, make_registry):
    fault = Fault("chunked", times=1)
    client, fake, layer, url = await _mirror_with_a_faulty_layer(aiohttp_server, make_registry, fault)
    async with client.get(url) as response:
        assert response.status == 200
        assert response.content_length == len(layer)  # known by the time the client is answered
        assert await response.read() == layer
    async with client.get(url) as response:  # cached: no second download
        assert await response.read() == layer
    assert fake.count("GET", digest_of(layer)) == 1


async def test_a_blob_without_content_length_cut_short_is_an_error_and_not_cached(aiohttp_server, make_registry):
    client, fake, layer, url = await _mirror_with_a_faulty_layer(
        aiohttp_server, make_registry, Fault("chunked-truncate", times=1)
    )
    async with client.get(url) as response:
        assert response.status == 503
        assert "UNAVAILABLE" in await response.text()
    assert temp_files(client) == []
    async with client.get(url) as response:  # the next pull downloads again, whole
        assert response.status == 200
        assert await response.read() == layer
    assert fake.count("GET", digest_of(layer)) == 2


# -- bodies whose length cannot be the blob's (issue 9, item 5) ------------------------------------
async def test_an_empty_body_for_a_non_empty_blob_is_never_a_complete_answer(aiohttp_server, make_registry):
    client, fake, layer, url = await _mirror_with_a_faulty_layer(aiohttp_server, make_registry, Fault("empty", times=1))

    # Content-Length: 0 leaves no last byte to hold back: refused before any header went out.
    async with client.get(url) as response:
        assert response.status == 502
        assert await error_codes(response) == ["UPSTREAM_INVALID"]
    await fills_settled(client)
    assert digest_of(layer).split(":")[1] not in blob_files(client)
    assert temp_files(client) == []
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_errors_total", reason="size_mismatch") == 1
    async with client.get(url) as response:  # nothing was cached: the next pull fetches it whole
        assert response.status == 200
        assert await response.read() == layer

    # The empty blob itself is real and has size 0: that one is served, and cached.
    empty = fake.add_blob(b"")
    for _ in range(2):
        async with client.get(f"/v2/library/alpine/blobs/{empty}") as response:
            assert response.status == 200
            assert response.content_length == 0
            assert await response.read() == b""
    assert fake.count("GET", empty) == 1


async def _mirror_that_served_the_manifest(aiohttp_server, make_registry, fault: Fault):
    """Like _mirror_with_a_faulty_layer, with the layer's size known: its image's manifest was pulled."""
    fake = FakeUpstream()
    layer = os.urandom(LAYER_BYTES)
    fake.add_image("library/alpine", "3.20", [layer])
    digest = digest_of(layer)
    fake.faults[digest] = fault
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 200
    return client, fake, layer, f"/v2/library/alpine/blobs/{digest}"


@pytest.mark.parametrize("kind", ["short", "padded", "empty"])
async def test_a_length_that_disagrees_with_the_manifest_is_refused_before_any_byte(
    aiohttp_server, make_registry, kind
):
    client, fake, layer, url = await _mirror_that_served_the_manifest(
        aiohttp_server, make_registry, Fault(kind, times=1)
    )
    async with client.get(url) as response:
        assert response.status == 502
        assert await error_codes(response) == ["UPSTREAM_INVALID"]
    await fills_settled(client)
    assert digest_of(layer).split(":")[1] not in blob_files(client)
    assert temp_files(client) == []
    async with client.get(url) as response:
        assert response.status == 200
        assert await response.read() == layer
    assert fake.count("GET", digest_of(layer)) == 2


async def test_a_length_that_disagrees_with_an_upstream_head_is_refused_before_any_byte(aiohttp_server, make_registry):
    client, fake, layer, url = await _mirror_with_a_faulty_layer(aiohttp_server, make_registry, Fault("short", times=0))
    async with client.head(url) as response:  # answered by an upstream HEAD, which gives the size
        assert response.status == 200 and response.content_length == len(layer)
    fake.faults[digest_of(layer)] = Fault("short", times=1)
    async with client.get(url) as response:
        assert response.status == 502
        assert await error_codes(response) == ["UPSTREAM_INVALID"]
    await fills_settled(client)
    assert temp_files(client) == []
    async with client.get(url) as response:
        assert response.status == 200
        assert await response.read() == layer


async def test_a_body_without_length_streams_at_the_manifests_size_and_never_past_it(aiohttp_server, make_registry):
    client, fake, layer, url = await _mirror_that_served_the_manifest(
        aiohttp_server, make_registry, Fault("chunked", times=1)
    )
    fake.blob_delay = 0.01
    # The descriptor's size lets the client be answered, and streamed to, before the body has all arrived.
    async with client.get(url) as response:
        assert response.status == 200
        assert response.content_length == len(layer)
        first = await response.content.readany()
        assert fake.bytes_sent[digest_of(layer)] < len(layer)
        assert first + await response.read() == layer
    await fills_settled(client)

    # Ten bytes more than the manifest said: cut before the last byte, never a complete body.
    other = os.urandom(LAYER_BYTES)
    fake.add_image("library/busybox", "1", [other])
    fake.faults[digest_of(other)] = Fault("chunked-padded", times=1)
    async with client.get("/v2/library/busybox/manifests/1") as response:
        assert response.status == 200
    await _pull_expecting_a_cut(client, f"/v2/library/busybox/blobs/{digest_of(other)}", len(other))
    await fills_settled(client)
    assert digest_of(other).split(":")[1] not in blob_files(client)
    assert temp_files(client) == []
