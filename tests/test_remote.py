"""RemoteRegistry between two mirrors over real HTTP: the copier's wire protocol, counted request by request.

The real-client tests (tests/test_replication_real.py) prove it against the distribution registry; these
pin down what is easier to see in-process: which requests a copy makes, chunked uploads and their
resumption after a run that was cut off, paged tag lists and the before_get gate.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.errors import ManifestUnknown, Unauthorized
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.replication.copier import Copier, CopyOptions
from mirror.replication.remote import RemoteRegistry, RemoteSpec, UploadJournal, UploadState, open_remote
from tests.registry_helpers import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    digest_of,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
)


class Recorder:
    """Every request a mirror app answered: (method, path kind), and the body bytes of PATCH/PUT uploads."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.upload_bytes = 0

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        kind = ("upload" if "/blobs/uploads" in path else "blob" if "/blobs/" in path
                else "manifest" if "/manifests/" in path else "tags" if path.endswith("/tags/list") else "other")
        self.requests.append((request.method, kind))
        if request.method in ("PATCH", "PUT") and kind == "upload":
            self.upload_bytes += request.content_length or 0
        return await handler(request)

    def count(self, method: str, kind: str) -> int:
        return Counter(self.requests)[(method, kind)]

    def reset(self) -> None:
        self.requests.clear()
        self.upload_bytes = 0


async def _mirror(aiohttp_client: Any, path: Path) -> tuple[TestClient, Recorder]:
    recorder = Recorder()
    app = create_app(load_config_data({"storage": {"path": str(path)}}))
    app.middlewares.insert(0, recorder.middleware)
    return await aiohttp_client(app), recorder


def _spec(client: TestClient) -> RemoteSpec:
    return RemoteSpec(url=str(client.make_url("")).rstrip("/"))


async def test_a_copy_over_http_is_byte_for_byte_and_a_rerun_gets_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    source, source_log = await _mirror(aiohttp_client, tmp_path / "a")
    dest, dest_log = await _mirror(aiohttp_client, tmp_path / "b")
    digest, body = await push_image(source, "team/app", "1", layers=(b"x" * 100_000, b"y"), media_type=DOCKER_MANIFEST)
    gets: list[str] = []

    async def gate(kind: str) -> None:
        gets.append(kind)

    async with open_remote(_spec(source), Metrics(), push=False, before_get=gate) as src, \
            open_remote(_spec(dest), Metrics()) as dst:
        source_log.reset()
        dest_log.reset()
        outcome = await Copier().copy(src, "team/app", "1", dst, "copy/app", dest_tag="1")
        assert str(outcome.dest_digest) == digest and outcome.stats.blobs_written == 3
        assert dest_log.count("PUT", "manifest") == 1  # by tag, once everything it references is there
        assert sorted(gets) == ["blob", "blob", "blob", "manifest"]  # the gate saw every GET, no HEAD
        async with dest.get("/v2/copy/app/manifests/1", headers={"Accept": DOCKER_MANIFEST}) as response:
            assert await response.read() == body and response.headers["Content-Type"] == DOCKER_MANIFEST

        source_log.reset()
        dest_log.reset()
        again = await Copier().copy(src, "team/app", "1", dst, "copy/app", dest_tag="1")
    assert again.unchanged
    assert [method for method, _ in source_log.requests] == ["HEAD"]  # one HEAD of the tag, no GET
    assert all(method == "HEAD" for method, _ in dest_log.requests) and dest_log.upload_bytes == 0


async def test_a_large_blob_goes_in_chunks_and_a_cut_off_upload_resumes(aiohttp_client: Any, tmp_path: Path) -> None:
    source, _source_log = await _mirror(aiohttp_client, tmp_path / "a")
    dest, dest_log = await _mirror(aiohttp_client, tmp_path / "b")
    layer = os.urandom(1_000_000)
    await push_image(source, "team/big", "1", layers=(layer,))
    journal = UploadJournal(tmp_path / "journal")
    chunk = 100_000
    sent = 0
    cut = asyncio.Event()

    async def gate(kind: str) -> None:
        return None

    async with open_remote(_spec(source), Metrics(), push=False, before_get=gate) as src, \
            open_remote(_spec(dest), Metrics(), journal=journal, chunk_bytes=chunk) as dst:

        class Dying(RemoteRegistry):
            """The first run: killed after four chunks of the layer were acknowledged."""

            async def _patch(self, repo: str, digest: Digest, state: Any, data: bytes) -> Any:
                nonlocal sent
                if sent == 4:
                    cut.set()
                    raise asyncio.CancelledError
                result = await super()._patch(repo, digest, state, data)
                sent += 1
                return result

        dying = Dying(dst.client, journal=journal, chunk_bytes=chunk, push=True)
        with pytest.raises(asyncio.CancelledError):
            await Copier().copy(src, "team/big", "1", dying, "copy/big", dest_tag="1")
        assert cut.is_set() and len(list((tmp_path / "journal").iterdir())) == 1
        first_run_bytes = dest_log.upload_bytes
        assert dest_log.count("PATCH", "upload") == 4

        dest_log.reset()
        outcome = await Copier().copy(src, "team/big", "1", dst, "copy/big", dest_tag="1")
    # The second run sent only what the first had not: the layer's remaining 600 kB (+ two tiny blobs).
    assert dest_log.upload_bytes < len(layer) - 4 * chunk + 10_000
    assert first_run_bytes + dest_log.upload_bytes < len(layer) + 20_000
    assert outcome.stats.bytes_written < len(layer) - 4 * chunk + 10_000  # and read only that from the source
    assert not list((tmp_path / "journal").iterdir())
    async with dest.get(f"/v2/copy/big/blobs/sha256:{hashlib.sha256(layer).hexdigest()}") as response:
        assert response.status == 200 and await response.read() == layer


async def test_a_stale_upload_journal_starts_a_fresh_upload(aiohttp_client: Any, tmp_path: Path) -> None:
    source, _ = await _mirror(aiohttp_client, tmp_path / "a")
    dest, _ = await _mirror(aiohttp_client, tmp_path / "b")
    layer = os.urandom(300_000)
    await push_image(source, "team/big", "1", layers=(layer,))
    journal = UploadJournal(tmp_path / "journal")
    digest = Digest.parse("sha256:" + hashlib.sha256(layer).hexdigest())
    async with open_remote(_spec(source), Metrics(), push=False) as src, \
            open_remote(_spec(dest), Metrics(), journal=journal, chunk_bytes=64_000) as dst:
        stale = UploadState("/v2/copy/big/blobs/uploads/gone", 128_000)
        await journal.save(dst.client.config.url, "copy/big", digest, stale)
        outcome = await Copier().copy(src, "team/big", "1", dst, "copy/big", dest_tag="1")
    assert outcome.stats.blobs_written == 2 and outcome.stats.bytes_written > len(layer)  # all of it, again
    async with dest.get(f"/v2/copy/big/blobs/{digest}") as response:
        assert await response.read() == layer


async def test_tags_are_read_page_by_page(aiohttp_client: Any, tmp_path: Path) -> None:
    source, source_log = await _mirror(aiohttp_client, tmp_path / "a")
    digest, body = await push_image(source, "team/app", "t0")
    for number in range(1, 7):
        assert (await put_manifest(source, "team/app", f"t{number}", body, OCI_MANIFEST)).status == 201
    async with open_remote(_spec(source), Metrics(), push=False) as src:
        src.page_size = 2
        source_log.reset()
        tags = await src.list_tags("team/app")
        with pytest.raises(ManifestUnknown):
            await src.stat_manifest("team/app", "missing")
    assert tags == [f"t{n}" for n in range(7)]
    assert source_log.count("GET", "tags") == 4


async def test_a_second_repository_is_mounted_at_the_destination(aiohttp_client: Any, tmp_path: Path) -> None:
    source, _ = await _mirror(aiohttp_client, tmp_path / "a")
    dest, dest_log = await _mirror(aiohttp_client, tmp_path / "b")
    await push_image(source, "team/app", "1", layers=(b"l" * 50_000,))
    async with open_remote(_spec(source), Metrics(), push=False) as src, open_remote(_spec(dest), Metrics()) as dst:
        copier = Copier()
        await copier.copy(src, "team/app", "1", dst, "one/app", dest_tag="1")
        dest_log.reset()
        second = await copier.copy(src, "team/app", "1", dst, "two/app", dest_tag="1")
    assert second.stats.blobs_mounted == 2 and second.stats.blobs_written == 0
    assert dest_log.upload_bytes == 0 and dest_log.count("POST", "upload") == 2


async def test_wrong_credentials_are_an_error_not_an_absent_image(aiohttp_server: Any, tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server: TestServer = await aiohttp_server(app)
    spec = RemoteSpec(url=str(server.make_url("")).rstrip("/"), username="u", password="wrong")
    async with open_remote(spec, Metrics()) as dst:
        with pytest.raises(Unauthorized):
            await dst.stat_manifest("team/app", "1")


async def test_a_rerun_with_referrers_gets_no_manifest_or_blob_at_the_source(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    source, source_log = await _mirror(aiohttp_client, tmp_path / "a")
    dest, dest_log = await _mirror(aiohttp_client, tmp_path / "b")
    digest, body = await push_image(source, "team/app", "1")
    await push_blob(source, "team/app", b"{}")
    await push_blob(source, "team/app", b"sbom")
    subject = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)}
    sbom = image_manifest(b"{}", [b"sbom"], artifactType="application/spdx+json", subject=subject)
    assert (await put_manifest(source, "team/app", digest_of(sbom), sbom, OCI_MANIFEST)).status == 201
    sig_tag = "sha256-" + digest.split(":")[1] + ".sig"
    await push_blob(source, "team/app", b"signature")
    signature = image_manifest(b"{}", [b"signature"])
    assert (await put_manifest(source, "team/app", sig_tag, signature, OCI_MANIFEST)).status == 201

    async with open_remote(_spec(source), Metrics(), push=False) as src, open_remote(_spec(dest), Metrics()) as dst:
        tags = await src.list_tags("team/app")
        first = await Copier(CopyOptions(referrers=True)).copy(src, "team/app", "1", dst, "team/app", dest_tag="1",
                                                             source_tags=tags)
        assert first.stats.manifests_written == 3  # the image, the SBOM referrer, the signature
        source_log.reset()
        dest_log.reset()
        again = await Copier(CopyOptions(referrers=True)).copy(src, "team/app", "1", dst, "team/app", dest_tag="1",
                                                             source_tags=tags)
    assert again.unchanged
    assert source_log.count("GET", "manifest") == 0 and source_log.count("GET", "blob") == 0
    assert dest_log.upload_bytes == 0 and dest_log.count("PUT", "manifest") == 0
    async with dest.get(f"/v2/team/app/referrers/{digest}") as response:
        assert [entry["digest"] for entry in (await response.json(content_type=None))["manifests"]] == [digest_of(sbom)]


async def test_repositories_copied_at_once_upload_a_shared_layer_once(aiohttp_client: Any, tmp_path: Path) -> None:
    source, _ = await _mirror(aiohttp_client, tmp_path / "a")
    dest, dest_log = await _mirror(aiohttp_client, tmp_path / "b")
    base = os.urandom(300_000)
    for number in range(4):
        await push_image(source, f"team/app{number}", "1", layers=(base, f"app {number}".encode()))
    async with open_remote(_spec(source), Metrics(), push=False) as src, open_remote(_spec(dest), Metrics()) as dst:
        copier = Copier()
        outcomes = await asyncio.gather(*(
            copier.copy(src, f"team/app{number}", "1", dst, f"copy/app{number}", dest_tag="1") for number in range(4)
        ))
    mounted = sum(o.stats.blobs_mounted for o in outcomes)
    assert mounted >= 3 + 3  # the base layer and the shared config: sent once each, mounted into the others
    assert dest_log.upload_bytes < 2 * len(base)
