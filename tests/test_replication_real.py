"""Replication with real registries and real clients.

A distribution registry with token auth plays Docker Hub; a second distribution registry with htpasswd
plays the other data centre. skopeo reads both sides; both access logs count what the copier asked for.
Most tests drive the copier directly with the pieces a rule uses (RemoteRegistry source and destination,
the upload journal, the cache destination), to see the wire protocol and the pinning up close; the last
one runs `mirror sync --config` with a rule, the whole path a user runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.proxy.registry import ProxyRegistry
from mirror.replication.cache_dest import cache_destination
from mirror.replication.copier import Copier, CopyOptions
from mirror.replication.hosting import REPLICATION
from mirror.replication.remote import RemoteRegistry, RemoteSpec, open_remote
from mirror.replication.standalone import open_app
from mirror.state import ROUTER
from mirror.storage.backend import one_piece
from tests.registry_helpers import OCI_MANIFEST, digest_of, image_manifest, push_blob, push_image, put_manifest
from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.fixtures import ImageFactory, MirrorFactory, RegistryFactory
from tests.support.images import BuiltImage
from tests.support.mirror_proc import REPO_ROOT
from tests.support.procs import ManagedProcess
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real, pytest.mark.needs_tools("docker-registry", "skopeo")]

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def _reads(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Manifest and blob GETs: what Docker Hub's rate limit counts (and what costs bytes)."""
    return [r for r in requests if r[0] == "GET" and ("/manifests/" in r[1] or "/blobs/" in r[1])]


def _writes(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [r for r in requests if r[0] in ("POST", "PATCH", "PUT", "DELETE")]


def _uploaded_digests(requests: list[tuple[str, str, int]]) -> list[str]:
    """Digests of blob uploads the registry completed (PUT ...?digest=X answered 201)."""
    found = []
    for method, path, status in requests:
        if method == "PUT" and "/blobs/uploads/" in path and status == 201:
            found.extend(parse_qs(urlsplit(path).query).get("digest", []))
    return found


async def _push(registry: DistributionRegistry, image: BuiltImage, repo_tag: str) -> None:
    await registry.apush(image, repo_tag)


async def test_registry_to_registry_keeps_digests_and_a_rerun_costs_nothing(
    upstream_registry: DistributionRegistry,
    registry_factory: RegistryFactory,
    multiarch_image: BuiltImage,
    image_factory: ImageFactory,
    unique_repo: Any,
) -> None:
    repo = unique_repo("library/repl")
    docker_image = await asyncio.to_thread(image_factory.busybox, seed=3, media="docker", extra_layers=[200_000])
    signature = await asyncio.to_thread(image_factory.busybox, seed=9)
    sig_tag = f"sha256-{multiarch_image.digest.split(':')[1]}.sig"
    await _push(upstream_registry, multiarch_image, f"{repo}:1")
    await _push(upstream_registry, docker_image, f"{repo}:2")
    await _push(upstream_registry, signature, f"{repo}:{sig_tag}")
    await _push(upstream_registry, docker_image, f"{repo}:not-selected")
    dc2 = await asyncio.to_thread(registry_factory.htpasswd)
    creds = dc2.default_creds
    assert creds is not None

    async def run() -> list[Any]:
        async with open_remote(RemoteSpec(upstream_registry.url), Metrics(), push=False) as source, \
                open_remote(RemoteSpec(dc2.url, *creds), Metrics()) as dest:
            tags = await source.list_tags(repo)
            copier = Copier(CopyOptions(referrers=True))
            return [await copier.copy(source, repo, tag, dest, "mirror/repl", dest_tag=tag, source_tags=tags)
                    for tag in ("1", "2")]

    source_mark, dest_mark = upstream_registry.log_mark(), dc2.log_mark()
    first = await run()
    assert [str(o.dest_digest) for o in first] == [multiarch_image.digest, docker_image.digest]
    first_source = await asyncio.to_thread(upstream_registry.requests, source_mark)
    assert _reads(first_source)  # the counting sees reads when there are some

    for tag in ("1", "2", sig_tag):
        at_source = await skopeo.ainspect_raw(upstream_registry.ref(f"{repo}:{tag}"))
        at_dest = await skopeo.ainspect_raw(dc2.ref(f"mirror/repl:{tag}"), creds)
        assert at_dest == at_source, tag
    for child in multiarch_image.manifests:  # every platform, by digest
        raw = await skopeo.ainspect_raw(dc2.ref(f"mirror/repl@{child.digest}"), creds)
        assert skopeo.sha256_of(raw) == child.digest
    assert json.loads(await skopeo.ainspect_raw(dc2.ref("mirror/repl:2"), creds))["mediaType"] == DOCKER_V2
    assert sorted(await asyncio.to_thread(skopeo.list_tags, f"docker://{dc2.host}/mirror/repl", creds)) == sorted(
        ["1", "2", sig_tag]
    )

    source_mark, dest_mark = upstream_registry.log_mark(), dc2.log_mark()
    second = await run()
    assert all(o.unchanged for o in second)
    source_requests = await asyncio.to_thread(upstream_registry.requests, source_mark)
    dest_requests = await asyncio.to_thread(dc2.requests, dest_mark)
    assert source_requests and dest_requests  # the logs were read
    assert _reads(source_requests) == [], _reads(source_requests)
    assert _writes(dest_requests) == [], _writes(dest_requests)
    assert _reads(dest_requests) == []


async def test_a_sync_killed_halfway_does_not_send_completed_blobs_again(
    fresh_token_server: TokenServer,
    registry_factory: RegistryFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    source = await asyncio.to_thread(registry_factory.token_auth, fresh_token_server)
    image = await asyncio.to_thread(image_factory.busybox, seed=21, extra_layers=[1_500_000] * 8)
    await _push(source, image, "library/big:1")
    dest = await asyncio.to_thread(registry_factory.htpasswd)
    user, password = dest.default_creds or ("", "")
    chunk = 512 << 10  # each 1.5 MB layer: two PATCHes and a PUT
    argv = [sys.executable, "-m", "tests.support.sync_once", "--source", source.url, "--dest", dest.url,
            "--dest-creds", f"{user}:{password}", "--journal", str(tmp_path / "journal"),
            "--chunk-bytes", str(chunk)]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}

    mark = dest.log_mark()
    first = ManagedProcess([*argv, "--pace", "0.1", "library/big:1=dc2/big"], name="sync-first",
                           log_dir=tmp_path, env=env, cwd=REPO_ROOT).start()
    journal = tmp_path / "journal"
    try:
        for _ in range(600):  # until three blobs are complete at the destination
            if len(_uploaded_digests(await asyncio.to_thread(dest.requests, mark, settle=0.02))) >= 3:
                break
            first.check_alive()
        else:
            raise AssertionError("the first sync never completed three blobs")
        # Then the moment a chunk of the next blob was acknowledged and journaled: the process is reading
        # the next chunk from the (paced) source, between two PATCHes. A kill in the middle of a PATCH
        # would leave distribution 2.8 an upload it refuses to resume (the copier then starts it afresh).
        def first_chunks() -> set[tuple[str, int]]:
            # *.json only: a journal entry is written to a temp file first, then renamed into place.
            found = set()
            for entry in journal.glob("*.json") if journal.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):  # a completed blob's entry goes meanwhile
                    found.add((entry.name, json.loads(entry.read_text()).get("offset", 0)))
            return {(name, offset) for name, offset in found if offset == chunk}

        already = first_chunks()  # seen late, maybe with the next chunk already on its way: not this one
        for _ in range(3000):
            if first_chunks() - already:
                break
            first.check_alive()
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("no chunk of a fourth blob was ever acknowledged")
        first.kill()
    finally:
        first.stop()
    before_kill = await asyncio.to_thread(dest.requests, mark)
    completed = set(_uploaded_digests(before_kill))
    assert 3 <= len(completed) < len(image.all_digests) - 1, completed  # halfway, really

    mark = dest.log_mark()
    second = ManagedProcess([*argv, "library/big:1=dc2/big"], name="sync-second", log_dir=tmp_path, env=env,
                            cwd=REPO_ROOT).start()
    for _ in range(600):
        if not second.running:
            break
        await asyncio.sleep(0.1)
    assert second.returncode == 0, second.log_text()
    resumed = re.search(r"resuming upload of (\S+) into dc2/big at byte (\d+)", second.log_text(None))
    assert resumed and int(resumed.group(2)) > 0, second.log_text()  # the cut-off blob went on where it stopped
    summary = json.loads(second.log_text(None).strip().splitlines()[-1])["summary"]
    sizes = {d.digest: d.size for m in image.manifests for d in m.layers}
    remaining = sum(size for digest, size in sizes.items() if digest not in completed)
    assert summary["bytes_written"] <= remaining - int(resumed.group(2)) + 10_000  # + config: read once only
    resent = set(_uploaded_digests(await asyncio.to_thread(dest.requests, mark))) & completed
    assert resent == set(), f"completed before the kill and sent again: {resent}"
    raw = await skopeo.ainspect_raw(dest.ref("dc2/big:1"), dest.default_creds)
    assert skopeo.sha256_of(raw) == image.digest
    await skopeo.acopy(dest.ref("dc2/big:1"), f"oci:{tmp_path / 'out'}:1", src_creds=dest.default_creds)


async def test_referrers_travel_between_registries_that_have_the_api(
    mirror_factory: MirrorFactory, image_factory: ImageFactory, tmp_path: Path
) -> None:
    """distribution 2.8 has no referrers API, so both ends are the mirror's own local registry here."""
    source = await asyncio.to_thread(mirror_factory, {"storage": {"path": str(tmp_path / "a")}})
    dest = await asyncio.to_thread(mirror_factory, {"storage": {"path": str(tmp_path / "b")}})
    image = await asyncio.to_thread(image_factory.busybox, seed=4)
    await skopeo.acopy(image.ref, f"docker://{source.host}/team/app:1")
    async with aiohttp.ClientSession(base_url=source.url) as session:
        await push_blob(session, "team/app", b"{}")
        await push_blob(session, "team/app", b"an sbom")
        subject = {"mediaType": image.media_type, "digest": image.digest, "size": image.size}
        sbom = image_manifest(b"{}", [b"an sbom"], artifactType="application/spdx+json", subject=subject)
        assert (await put_manifest(session, "team/app", digest_of(sbom), sbom, OCI_MANIFEST)).status == 201

    async with open_remote(RemoteSpec(source.url), Metrics(), push=False) as src, \
            open_remote(RemoteSpec(dest.url), Metrics()) as dst:
        await Copier(CopyOptions(referrers=True)).copy(src, "team/app", "1", dst, "team/app", dest_tag="1")
    raw = await skopeo.ainspect_raw(f"docker://{dest.host}/team/app@{digest_of(sbom)}")
    assert raw == sbom
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{dest.url}/v2/team/app/referrers/{image.digest}") as response:
            listed = (await response.json(content_type=None))["manifests"]
    assert [(e["digest"], e.get("artifactType")) for e in listed] == [(digest_of(sbom), "application/spdx+json")]


async def test_a_referrer_copied_to_distribution_is_found_under_the_referrers_tag_and_read_back(
    mirror_factory: MirrorFactory, registry_factory: RegistryFactory, image_factory: ImageFactory, tmp_path: Path
) -> None:
    """distribution 2.8 has no referrers API: the copier's writes keep OCI 1.1's fallback, the tag
    `sha256-<hex>` holding an index of the image's referrers, and a copy out of it finds them there."""
    source = await asyncio.to_thread(mirror_factory, {"storage": {"path": str(tmp_path / "a")}})
    back = await asyncio.to_thread(mirror_factory, {"storage": {"path": str(tmp_path / "b")}})
    dc2 = await asyncio.to_thread(registry_factory.htpasswd)
    image = await asyncio.to_thread(image_factory.busybox, seed=5)
    await skopeo.acopy(image.ref, f"docker://{source.host}/team/app:1")
    subject = {"mediaType": image.media_type, "digest": image.digest, "size": image.size}
    referrers = []
    async with aiohttp.ClientSession(base_url=source.url) as session:
        await push_blob(session, "team/app", b"{}")
        for kind, content in (("application/spdx+json", b"an sbom"), ("application/vnd.dev.sigstore+json", b"sig")):
            await push_blob(session, "team/app", content)
            manifest = image_manifest(b"{}", [content], artifactType=kind, subject=subject)
            assert (await put_manifest(session, "team/app", digest_of(manifest), manifest, OCI_MANIFEST)).status == 201
            referrers.append((digest_of(manifest), kind))

    creds = dc2.default_creds or ("", "")
    async with open_remote(RemoteSpec(source.url), Metrics(), push=False) as src, \
            open_remote(RemoteSpec(dc2.url, *creds), Metrics()) as dst:
        await Copier(CopyOptions(referrers=True)).copy(src, "team/app", "1", dst, "dc2/app", dest_tag="1")
    fallback_tag = "sha256-" + image.digest.split(":")[1]
    assert sorted(await asyncio.to_thread(skopeo.list_tags, f"docker://{dc2.host}/dc2/app", dc2.default_creds)) \
        == sorted(["1", fallback_tag])
    index = json.loads(await skopeo.ainspect_raw(dc2.ref(f"dc2/app:{fallback_tag}"), dc2.default_creds))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert sorted((e["digest"], e["artifactType"]) for e in index["manifests"]) == sorted(referrers)

    # Read back from distribution: the copier finds the referrers under the tag and the mirror (which
    # has the API) lists them; the fallback tag is not copied as an image of its own.
    async with open_remote(RemoteSpec(dc2.url, *creds), Metrics(), push=False) as src, \
            open_remote(RemoteSpec(back.url), Metrics()) as dst:
        assert sorted(await src.list_tags("dc2/app")) == sorted(["1", fallback_tag])
        assert sorted(str(d.digest) for d in await src.referrers("dc2/app", Digest.parse(image.digest))) \
            == sorted(d for d, _ in referrers)
        await Copier(CopyOptions(referrers=True)).copy(src, "dc2/app", "1", dst, "team/app", dest_tag="1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{back.url}/v2/team/app/referrers/{image.digest}") as response:
            listed = (await response.json(content_type=None))["manifests"]
        async with session.get(f"{back.url}/v2/team/app/tags/list") as response:
            assert (await response.json())["tags"] == ["1"]  # the mirror has the API: no fallback tag
    assert sorted((e["digest"], e.get("artifactType")) for e in listed) == sorted(referrers)


async def test_the_cache_destination_survives_an_eviction_storm_and_pulls_with_the_upstream_stopped(
    fresh_token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    upstream = await asyncio.to_thread(registry_factory.token_auth, fresh_token_server)
    base = await asyncio.to_thread(image_factory.busybox, seed=31, extra_layers=[600_000])
    await _push(upstream, base, "library/base:1")
    storm = []
    for number in range(5):
        image = await asyncio.to_thread(image_factory.busybox, seed=40 + number, extra_layers=[900_000])
        await _push(upstream, image, f"library/storm{number}:1")
        storm.append(image)
    data = tmp_path / "data"
    config: dict[str, Any] = {
        "storage": {"path": str(data), "max_size": "3MB"},
        "upstreams": [{"name": "docker.io", "url": upstream.url, "default": True, "library_prefix": True,
                       "tag_ttl": 1}],
    }

    # The replication run: what a rule with `destinations: [cache]` does, into the mirror's data dir.
    async with open_app(load_config_data(config)) as app:
        proxy = app[ROUTER].upstreams["docker.io"].registry
        assert isinstance(proxy, ProxyRegistry)
        dest = cache_destination(app, "docker.io", "base-images")
        outcome = await Copier().copy(RemoteRegistry(proxy.client), "library/base", "1", dest, "library/base",
                                      dest_tag="1")
        assert str(outcome.dest_digest) == base.digest and outcome.stats.blobs_written == 3

    mirror = await asyncio.to_thread(mirror_factory, config)
    for number in range(len(storm)):  # the storm: ~5 MB of pulls through a 3 MB cache
        await skopeo.acopy(f"docker://{mirror.host}/library/storm{number}:1", f"oci:{tmp_path / 'storm'}:{number}")
    await asyncio.sleep(2.5)  # one background maintenance pass
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mirror.url}/metrics") as response:
            metrics = await response.text()
    evicted = re.search(r"^mirror_evictions_total (\S+)$", metrics, re.MULTILINE)
    assert evicted and float(evicted.group(1)) >= 3, metrics[-2000:]

    await asyncio.to_thread(upstream.stop)
    await asyncio.sleep(1.5)  # past tag_ttl: the mirror has to try the (stopped) upstream first
    raw = await skopeo.ainspect_raw(f"docker://{mirror.host}/library/base:1")
    assert skopeo.sha256_of(raw) == base.digest
    await skopeo.acopy(f"docker://{mirror.host}/library/base:1", f"oci:{tmp_path / 'pulled'}:1")
    with pytest.raises(skopeo.SkopeoError):  # an image that was not pinned is gone with the upstream
        await skopeo.acopy(f"docker://{mirror.host}/library/storm0:1", f"oci:{tmp_path / 'gone'}:1")


async def test_mirror_sync_replicates_a_rule_registry_to_registry_and_a_rerun_costs_nothing(
    upstream_registry: DistributionRegistry,
    registry_factory: RegistryFactory,
    multiarch_image: BuiltImage,
    image_factory: ImageFactory,
    unique_repo: Any,
    tmp_path: Path,
) -> None:
    """The whole path a user runs: `mirror sync --config` with a rule (tag filters, referrers) whose source
    is an upstream with token auth and whose destination is an htpasswd registry."""
    repo = unique_repo("library/sync")
    old = await asyncio.to_thread(image_factory.busybox, seed=51, media="docker")
    for tag, image in (("3.17", old), ("3.18", old), ("3.19", multiarch_image), ("edge", old)):
        await _push(upstream_registry, image, f"{repo}:{tag}")
    signature = await asyncio.to_thread(image_factory.busybox, seed=52)
    sig_tag = f"sha256-{multiarch_image.digest.split(':')[1]}.sig"
    await _push(upstream_registry, signature, f"{repo}:{sig_tag}")
    dc2 = await asyncio.to_thread(registry_factory.htpasswd)
    user, password = dc2.default_creds or ("", "")
    config = {
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "docker.io", "url": upstream_registry.url, "library_prefix": True}],
        "replication": [{
            "name": "base", "source": f"docker.io/{repo}",
            "tags": {"include": r"^3\.\d+$", "semver": ">=3.18"},
            "destinations": [{"registry": dc2.url, "repository": "mirror/base", "username": user,
                              "password": password}],
        }],
    }
    config_path = tmp_path / "mirror.yml"
    config_path.write_text(yaml.safe_dump(config))

    async def sync() -> None:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mirror", "sync", "--config", str(config_path)],
            capture_output=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300,
        )
        assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]

    await sync()
    assert sorted(await asyncio.to_thread(skopeo.list_tags, f"docker://{dc2.host}/mirror/base", dc2.default_creds)) \
        == sorted(["3.18", "3.19", sig_tag])  # the regex and the range chose; the signature came along
    for tag in ("3.18", "3.19", sig_tag):
        at_source = await skopeo.ainspect_raw(upstream_registry.ref(f"{repo}:{tag}"))
        assert await skopeo.ainspect_raw(dc2.ref(f"mirror/base:{tag}"), dc2.default_creds) == at_source, tag

    source_mark, dest_mark = upstream_registry.log_mark(), dc2.log_mark()
    await sync()
    source_requests = await asyncio.to_thread(upstream_registry.requests, source_mark)
    dest_requests = await asyncio.to_thread(dc2.requests, dest_mark)
    assert source_requests and dest_requests
    assert _reads(source_requests) == [], _reads(source_requests)
    assert _writes(dest_requests) == [] and _reads(dest_requests) == [], dest_requests


async def test_prune_mirrors_latest_n_at_a_distribution_registry_that_deletes_only_by_digest(
    mirror_factory: MirrorFactory, registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    """`latest: 2` with prune, towards distribution 2.8 (a tag can only go with its manifest, by digest):
    the tag that fell out of the selection is deleted, unless another tag there names the same manifest."""
    dc2 = await asyncio.to_thread(registry_factory.htpasswd)
    user, password = dc2.default_creds or ("", "")
    rule = {"name": "two", "source": "team/app", "prune": True, "tags": {"latest": 2},
            "destinations": [{"registry": dc2.url, "repository": "dc2/app", "username": user, "password": password}]}
    mirror = await asyncio.to_thread(mirror_factory, {"storage": {"path": str(tmp_path / "data")},
                                                      "replication": [rule]})

    async def run() -> dict[str, Any]:
        async with session.post(f"{mirror.url}/api/replication/two/run?wait=1") as response:
            assert response.status == 200, await response.text()
            report: dict[str, Any] = await response.json()
            return report

    async def tags() -> list[str]:
        return sorted(await asyncio.to_thread(skopeo.list_tags, f"docker://{dc2.host}/dc2/app", dc2.default_creds))

    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await push_image(session, "team/app", "1.1", layers=(b"one",))
        shared, _ = await push_image(session, "team/app", "1.2", layers=(b"two",))
        assert (await run())["copied"] == 2 and await tags() == ["1.1", "1.2"]
        await push_image(session, "team/app", "1.3", layers=(b"three",))
        report = await run()
        assert report["pruned"] == 1 and await tags() == ["1.2", "1.3"]
        # 1.4 is 1.2's manifest: deleting 1.2 by digest would take 1.4 along, so 1.2 stays.
        again, _ = await push_image(session, "team/app", "1.4", layers=(b"two",))
        assert again == shared
        report = await run()
        assert report["pruned"] == 0 and report["result"] == "ok"
    assert await tags() == ["1.2", "1.3", "1.4"]
    assert "the tag was left" in mirror.log_text()


def _manifest_requests(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [r for r in requests if "/manifests/" in r[1]]


def _tag_lists(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [r for r in requests if r[0] == "GET" and "/tags/list" in r[1]]


async def test_between_full_checks_a_rerun_reads_a_registry_destinations_tag_list_instead_of_a_head_per_tag(
    aiohttp_client: Any, registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    """A registry destination HEADed tag by tag at most every `verify_interval` (24 h by default); in between,
    a run compares its tag list with what the rule wrote there. A tag deleted at the destination comes back at
    the next run; a tag someone else moved there is put right by the next full check."""
    dc2 = await asyncio.to_thread(registry_factory.htpasswd, delete_enabled=True)
    user, password = dc2.default_creds or ("", "")
    config = load_config_data({"storage": {"path": str(tmp_path / "data")}, "replication": [{
        "name": "team", "source": "team/app",
        "destinations": [{"registry": dc2.url, "repository": "dc2/app", "username": user, "password": password}],
    }]})
    client = await aiohttp_client(create_app(config))
    digests = {}
    for tag, layer in (("1.0", b"zero"), ("1.1", b"one"), ("1.2", b"two")):
        digests[tag], _ = await push_image(client, "team/app", tag, layers=(layer,))
    engine = client.app[REPLICATION]

    async def run(expect_copied: int) -> list[tuple[str, str, int]]:
        mark = dc2.log_mark()
        report = await engine.run_rule("team")
        assert (report.result, report.copied, report.unchanged) == ("ok", expect_copied, 3 - expect_copied), report
        return await asyncio.to_thread(dc2.requests, mark)

    async def at_dc2(tag: str) -> str:
        return skopeo.sha256_of(await skopeo.ainspect_raw(dc2.ref(f"dc2/app:{tag}"), dc2.default_creds))

    first = await run(3)  # nothing known yet: every tag HEADed, then copied
    assert len([r for r in _manifest_requests(first) if r[0] == "HEAD"]) >= 3
    rerun = await run(0)
    assert _manifest_requests(rerun) == [] and len(_tag_lists(rerun)) == 1, rerun

    # Deleted at the destination: the tag list no longer has it, and the next run copies it again.
    async with open_remote(RemoteSpec(dc2.url, user, password), Metrics()) as at_dest:
        await at_dest.delete_manifest("dc2/app", digests["1.0"])
        await run(1)
        assert await at_dc2("1.0") == digests["1.0"]

        # Moved at the destination by someone else: a run between full checks trusts the rule's journal...
        config_blob, layer = b'{"architecture":"amd64","os":"linux"}', b"someone else's"
        for blob in (config_blob, layer):
            await at_dest.put_blob("dc2/app", Digest.of(blob), one_piece(blob), size=len(blob))
        body = image_manifest(config_blob, [layer])
        await at_dest.put_manifest("dc2/app", "1.1", body, OCI_MANIFEST)
        theirs = digest_of(body)
    await run(0)
    assert await at_dc2("1.1") == theirs
    # ... and the next full check puts it right: the last one was a day ago.
    state = engine.state("team")
    state.verified = {key: when - 86400 for key, when in state.verified.items()}
    full = await run(1)
    assert await at_dc2("1.1") == digests["1.1"]
    assert _tag_lists(full) == [] and {r[1].rsplit("/", 1)[1] for r in _manifest_requests(full) if r[0] == "HEAD"} \
        >= {"1.0", "1.1", "1.2"}
    # A full check makes the journal true again: the run after it reads the tag list.
    assert _manifest_requests(await run(0)) == []


async def test_verify_interval_zero_heads_every_tag_at_every_run(
    aiohttp_client: Any, registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    dc2 = await asyncio.to_thread(registry_factory.open)
    config = load_config_data({"storage": {"path": str(tmp_path / "data")}, "replication": [{
        "name": "team", "source": "team/app", "verify_interval": 0,
        "destinations": [{"registry": dc2.url, "repository": "dc2/app"}],
    }]})
    client = await aiohttp_client(create_app(config))
    for tag in ("1.0", "1.1"):
        await push_image(client, "team/app", tag, layers=(tag.encode(),))
    engine = client.app[REPLICATION]
    assert (await engine.run_rule("team")).copied == 2
    mark = dc2.log_mark()
    assert (await engine.run_rule("team")).unchanged == 2
    rerun = await asyncio.to_thread(dc2.requests, mark)
    assert _tag_lists(rerun) == []
    assert sorted(r[1].rsplit("/", 1)[1] for r in _manifest_requests(rerun) if r[0] == "HEAD") == ["1.0", "1.1"]
