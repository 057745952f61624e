"""The `cache` destination in-process: replicated content is pinned through eviction, served with the
upstream gone, and unpinned (back to ordinary LRU cache) when no rule selects it any more."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.cache.index import CACHED, PINNED
from mirror.config import load_config_data
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.proxy.registry import ProxyRegistry
from mirror.replication.cache_dest import CacheDestination, PinStore
from mirror.replication.copier import Copier
from mirror.replication.remote import RemoteRegistry, RemoteSpec, open_remote
from mirror.state import CACHE, ROUTER
from tests.registry_helpers import OCI_MANIFEST, push_image


async def _setup(aiohttp_client: Any, tmp_path: Path) -> tuple[TestClient, TestClient, ProxyRegistry]:
    upstream = await aiohttp_client(create_app(load_config_data({"storage": {"path": str(tmp_path / "up")}})))
    mirror = await aiohttp_client(create_app(load_config_data({
        "storage": {"path": str(tmp_path / "mirror"), "max_size": "10MB"},
        "upstreams": [{"name": "hub", "url": str(upstream.make_url("")).rstrip("/"), "default": True,
                       "tag_ttl": 0}],
    })))
    proxy = mirror.app[ROUTER].upstreams["hub"].registry
    assert isinstance(proxy, ProxyRegistry)
    return upstream, mirror, proxy


def _holders(mirror: TestClient, digest: str) -> frozenset[str]:
    record = mirror.app[CACHE].index.get(digest)
    return record.holders if record else frozenset()


async def test_replicated_images_survive_eviction_and_pull_with_the_upstream_gone(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    upstream, mirror, proxy = await _setup(aiohttp_client, tmp_path)
    pinned_digest, pinned_body = await push_image(upstream, "team/base", "1", layers=(b"p" * 200_000,))
    pulled_digest, _ = await push_image(upstream, "team/other", "1", layers=(b"o" * 200_000,))
    pins = PinStore(tmp_path / "pins")
    source = RemoteRegistry(proxy.client)
    outcome = await Copier().copy(source, "team/base", "1", CacheDestination(proxy, pins, "base"), "team/base",
                                  dest_tag="1")
    assert str(outcome.dest_digest) == pinned_digest and outcome.stats.blobs_written == 2
    async with mirror.get("/v2/team/other/manifests/1") as response:  # an ordinary pull-through
        assert response.status == 200
    assert PINNED in _holders(mirror, pinned_digest) and CACHED in _holders(mirror, pinned_digest)

    await mirror.app[CACHE].evict_to(0)  # the storm: everything evictable goes
    assert _holders(mirror, pulled_digest) == frozenset()
    await upstream.close()

    async with mirror.get("/v2/team/base/manifests/1", headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200 and await response.read() == pinned_body
    async with mirror.get(f"/v2/team/base/blobs/{Digest.of(b'p' * 200_000)}") as response:
        assert response.status == 200 and len(await response.read()) == 200_000
    async with mirror.get("/v2/team/other/manifests/1") as response:
        assert response.status >= 400  # not pinned: evicted, and nowhere to get it from


async def test_a_digest_stays_pinned_while_any_rule_selects_it(aiohttp_client: Any, tmp_path: Path) -> None:
    upstream, mirror, proxy = await _setup(aiohttp_client, tmp_path)
    digest, _ = await push_image(upstream, "team/base", "1")
    pins = PinStore(tmp_path / "pins")
    source = RemoteRegistry(proxy.client)
    await Copier().copy(source, "team/base", "1", CacheDestination(proxy, pins, "first"), "team/base", dest_tag="1")
    second = CacheDestination(proxy, pins, "second", repository="team/base")
    unchanged = await Copier().copy(source, "team/base", "1", second, "team/base", dest_tag="1")
    assert unchanged.unchanged  # nothing written: the second rule pins it when its run is complete
    assert await second.unpin_except("second", [Digest.parse(digest)]) == 0
    layer = str(Digest.of(b"layer one"))

    # Next runs (a destination per run, as the engine opens them) in which neither rule selects it any more.
    assert await CacheDestination(proxy, pins, "first").settle() == 0  # the second rule still pins it all
    assert PINNED in _holders(mirror, digest) and PINNED in _holders(mirror, layer)
    assert await CacheDestination(proxy, pins, "second").settle() == 4  # manifest, config, two layers
    assert _holders(mirror, digest) == frozenset({CACHED}) and _holders(mirror, layer) == frozenset({CACHED})
    result = await mirror.app[CACHE].evict_to(0)
    assert result.evicted == 4  # ordinary cache content once unpinned


async def test_an_image_pulled_through_before_the_rule_existed_is_pinned_by_its_run(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    upstream, mirror, proxy = await _setup(aiohttp_client, tmp_path)
    digest, _ = await push_image(upstream, "team/base", "1")
    async with mirror.get("/v2/team/base/manifests/1") as response:  # a client pulls it first
        assert response.status == 200
    async with mirror.get(f"/v2/team/base/blobs/{Digest.of(b'layer one')}") as response:
        assert response.status == 200 and await response.read() == b"layer one"
    for _ in range(100):  # the fill links and holds the blob just after its last byte went out
        if _holders(mirror, str(Digest.of(b"layer one"))):
            break
        await asyncio.sleep(0.02)
    dest = CacheDestination(proxy, PinStore(tmp_path / "pins"), "base", repository="team/base")
    outcome = await Copier().copy(RemoteRegistry(proxy.client), "team/base", "1", dest, "team/base", dest_tag="1")
    assert outcome.unchanged  # the tag was there already: nothing written...
    await dest.unpin_except("base", [Digest.parse(digest)])  # ...and the complete run pins it
    assert PINNED in _holders(mirror, digest) and PINNED in _holders(mirror, str(Digest.of(b"layer one")))


async def test_a_settled_rule_keeps_what_it_selects(aiohttp_client: Any, tmp_path: Path) -> None:
    upstream, mirror, proxy = await _setup(aiohttp_client, tmp_path)
    old, _ = await push_image(upstream, "team/base", "1", layers=(b"old",))
    pins = PinStore(tmp_path / "pins")
    source = RemoteRegistry(proxy.client)
    await Copier().copy(source, "team/base", "1", CacheDestination(proxy, pins, "base"), "team/base", dest_tag="1")
    # Next run: tag 1 moved upstream. The copier sees the old target, then writes the new one.
    new, _ = await push_image(upstream, "team/base", "1", layers=(b"new",))
    dest = CacheDestination(proxy, pins, "base", repository="team/base")
    await Copier().copy(source, "team/base", "1", dest, "team/base", dest_tag="1")
    await dest.unpin_except("base", [Digest.parse(new)])
    assert PINNED not in _holders(mirror, old) and PINNED not in _holders(mirror, str(Digest.of(b"old")))
    assert PINNED in _holders(mirror, new) and PINNED in _holders(mirror, str(Digest.of(b"new")))
    assert PINNED in _holders(mirror, str(Digest.of(b'{"architecture":"amd64","os":"linux"}')))  # shared config
    async with open_remote(RemoteSpec(url=str(mirror.make_url("")).rstrip("/")), Metrics(), push=False) as served:
        assert (await served.stat_manifest("team/base", "1")).digest == Digest.parse(new)
