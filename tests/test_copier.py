"""The copier between two local registries: byte-for-byte manifests, resumable order, cheap reruns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.errors import BlobUnknown
from mirror.oci.digest import Digest
from mirror.replication.copier import Copier, CopyOptions
from mirror.state import ROUTER
from mirror.storage.interface import Manifest, ManifestInfo, Registry
from tests.registry_helpers import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    descriptor,
    digest_of,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
)


async def _two_registries(aiohttp_client: Any, tmp_path: Path) -> tuple[TestClient, TestClient]:
    source = await aiohttp_client(create_app(load_config_data({"storage": {"path": str(tmp_path / "a")}})))
    dest = await aiohttp_client(create_app(load_config_data({"storage": {"path": str(tmp_path / "b")}})))
    return source, dest


def _local(client: TestClient) -> Registry:
    return client.app[ROUTER].local


async def test_an_image_arrives_byte_for_byte_and_a_rerun_changes_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    source, dest = await _two_registries(aiohttp_client, tmp_path)
    digest, body = await push_image(
        source, "team/app", "1", layers=(b"a" * 3_000_000, b"b"), media_type=DOCKER_MANIFEST
    )
    copier = Copier()
    outcome = await copier.copy(_local(source), "team/app", "1", _local(dest), "mirror/app", dest_tag="1")
    assert str(outcome.dest_digest) == digest and not outcome.unchanged
    assert outcome.stats.blobs_written == 3 and outcome.stats.bytes_written == 3_000_000 + 1 + len(
        b'{"architecture":"amd64","os":"linux"}'
    )
    async with dest.get("/v2/mirror/app/manifests/1", headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 200
        assert await response.read() == body
        assert response.headers["Content-Type"] == DOCKER_MANIFEST
    again = await Copier().copy(_local(source), "team/app", "1", _local(dest), "mirror/app", dest_tag="1")
    assert again.unchanged and again.stats.blobs_written == 0


async def test_a_second_repository_mounts_instead_of_uploading(aiohttp_client: Any, tmp_path: Path) -> None:
    source, dest = await _two_registries(aiohttp_client, tmp_path)
    await push_image(source, "team/app", "1")
    copier = Copier()
    await copier.copy(_local(source), "team/app", "1", _local(dest), "one/app", dest_tag="1")
    second = await copier.copy(_local(source), "team/app", "1", _local(dest), "two/app", dest_tag="1")
    assert second.stats.blobs_mounted == 3 and second.stats.blobs_written == 0


async def test_an_index_is_filtered_by_platform_only_when_asked(aiohttp_client: Any, tmp_path: Path) -> None:
    source, dest = await _two_registries(aiohttp_client, tmp_path)
    children = []
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        layer = f"layer for {arch}".encode()
        for blob in (config, layer):
            await push_blob(source, "team/multi", blob)
        child = image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
        assert (await put_manifest(source, "team/multi", digest_of(child), child, DOCKER_MANIFEST)).status == 201
        children.append(descriptor(DOCKER_MANIFEST, child, platform={"architecture": arch, "os": "linux"}))
    index = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": children}).encode()
    assert (await put_manifest(source, "team/multi", "1", index, DOCKER_MANIFEST_LIST)).status == 201

    whole = await Copier().copy(_local(source), "team/multi", "1", _local(dest), "whole/multi", dest_tag="1")
    assert str(whole.dest_digest) == digest_of(index) and whole.stats.manifests_written == 3

    filtered = await Copier(CopyOptions(platforms=frozenset({"linux/arm64"}))).copy(
        _local(source), "team/multi", "1", _local(dest), "arm/multi", dest_tag="1"
    )
    assert filtered.dest_digest != Digest.parse(digest_of(index))
    async with dest.get("/v2/arm/multi/manifests/1", headers={"Accept": DOCKER_MANIFEST_LIST}) as response:
        kept = (await response.json(content_type=None))["manifests"]
    assert [entry["platform"]["architecture"] for entry in kept] == ["arm64"]
    async with dest.get(f"/v2/arm/multi/manifests/{children[0]['digest']}") as response:
        assert response.status == 404  # the amd64 image was not copied


async def test_referrers_and_cosign_tags_come_along(aiohttp_client: Any, tmp_path: Path) -> None:
    source, dest = await _two_registries(aiohttp_client, tmp_path)
    digest, body = await push_image(source, "team/app", "1")
    await push_blob(source, "team/app", b"{}")
    await push_blob(source, "team/app", b"sbom")
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(body)}
    sbom = image_manifest(b"{}", [b"sbom"], artifactType="application/spdx+json", subject=subject)
    assert (await put_manifest(source, "team/app", digest_of(sbom), sbom,
                               "application/vnd.oci.image.manifest.v1+json")).status == 201
    await push_blob(source, "team/app", b"signature")
    sig = image_manifest(b"{}", [b"signature"])
    sig_tag = "sha256-" + digest.split(":")[1] + ".sig"
    response = await put_manifest(source, "team/app", sig_tag, sig, "application/vnd.oci.image.manifest.v1+json")
    assert response.status == 201

    copier = Copier(CopyOptions(referrers=True))
    await copier.copy(_local(source), "team/app", "1", _local(dest), "team/app", dest_tag="1")
    async with dest.get(f"/v2/team/app/referrers/{digest}") as response:
        listed = (await response.json(content_type=None))["manifests"]
    assert [entry["digest"] for entry in listed] == [digest_of(sbom)]
    async with dest.get(f"/v2/team/app/manifests/{sig_tag}") as response:
        assert response.status == 200 and await response.read() == sig


async def test_a_failing_blob_stops_the_other_transfers_of_its_image(aiohttp_client: Any, tmp_path: Path) -> None:
    source, dest = await _two_registries(aiohttp_client, tmp_path)
    await push_image(source, "team/app", "1", layers=(b"slow layer", b"broken layer"))
    stopped = asyncio.Event()

    class Faulty(Registry):
        """The source: one layer streams forever, the other fails at once."""

        def __init__(self, inner: Registry) -> None:
            self.inner = inner

        async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
            return await self.inner.stat_manifest(repo, reference)

        async def get_manifest(self, repo: str, reference: str) -> Manifest:
            return await self.inner.get_manifest(repo, reference)

        async def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
            if digest == Digest.of(b"broken layer"):
                raise BlobUnknown(detail={"digest": str(digest)})
            try:
                while True:
                    yield b"x"
                    await asyncio.sleep(0.01)
            finally:
                stopped.set()

    with pytest.raises(BlobUnknown):
        await Copier().copy(Faulty(_local(source)), "team/app", "1", _local(dest), "copy/app", dest_tag="1")
    assert stopped.is_set()  # not still streaming after copy() gave up
