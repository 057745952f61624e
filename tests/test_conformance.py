"""Conformance with the OCI distribution-spec v1.1, against a live `python -m mirror serve` on a port.

Written from the spec's four workflow categories (pull, push, content discovery, content management):
for each endpoint, the success and failure codes, the headers and the bodies a client relies on. The server
is a private registry (no upstreams); every test works in its own repository.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientResponse, ClientSession

from tests.registry_helpers import (
    API_VERSION,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    digest_of,
    image_manifest,
    index_manifest,
    push_blob,
    push_image,
    put_manifest,
)
from tests.support import skopeo

REPO_ROOT = Path(__file__).resolve().parents[1]
ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED",
    "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    stderr_path: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mirror exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/v2/", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"mirror did not answer {url}/v2/ within {timeout}s")


@pytest.fixture(scope="module")
def live_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, storage_kind: str
) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("conformance")
    port = free_port()
    config = workdir / "mirror.yml"
    storage: dict[str, Any] = {"path": str(workdir / "data")}
    if storage_kind == "s3":  # the same checks against a registry living in a bucket
        from tests.support.rgw import new_bucket

        storage.update(backend="s3", s3=asyncio.run(new_bucket(request.getfixturevalue("rgw"))))
    config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "storage": storage}))
    stderr_path = workdir / "stderr.log"
    with open(stderr_path, "wb") as stderr, open(workdir / "stdout.log", "wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=stdout,
            stderr=stderr,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, stderr_path)
    try:
        wait_ready(server.url, process)
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    log = stderr_path.read_text(errors="replace")
    assert "Traceback" not in log, f"the server logged an unhandled error:\n{log[-3000:]}"


@pytest.fixture
async def client(live_server: LiveServer) -> AsyncIterator[ClientSession]:
    async with ClientSession(base_url=live_server.url) as session:
        yield session


@pytest.fixture
def repo() -> str:
    return f"conformance/{uuid.uuid4().hex[:12]}"


async def assert_error(response: ClientResponse, status: int, *codes: str) -> None:
    """The spec's error body: `errors` with `code` from the known set and a `message`."""
    assert response.status == status, (response.status, await response.text())
    assert response.headers.get(API_VERSION[0]) == API_VERSION[1]
    if response.method == "HEAD":
        return
    body = await response.json(content_type=None)
    assert isinstance(body["errors"], list) and body["errors"]
    for entry in body["errors"]:
        assert entry["code"] in ERROR_CODES | {"TAG_INVALID", "PAGINATION_NUMBER_INVALID"}, entry
        assert isinstance(entry["message"], str)
    if codes:
        assert {e["code"] for e in body["errors"]} & set(codes), body


# == pull ==============================================================================================
async def test_end1_api_version_check(client: ClientSession) -> None:
    response = await client.get("/v2/")
    assert response.status == 200
    assert response.headers[API_VERSION[0]] == API_VERSION[1]


async def test_end3_pull_manifest_by_tag_and_digest(client: ClientSession, repo: str) -> None:
    digest, body = await push_image(client, repo, "v1")
    for reference in ("v1", digest):
        response = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert response.status == 200
        assert await response.read() == body
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == digest
        assert int(response.headers["Content-Length"]) == len(body)


async def test_end3_head_manifest(client: ClientSession, repo: str) -> None:
    digest, body = await push_image(client, repo, "v1")
    response = await client.head(f"/v2/{repo}/manifests/v1")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert int(response.headers["Content-Length"]) == len(body)
    assert await response.read() == b""


async def test_end3_manifest_not_found(client: ClientSession, repo: str) -> None:
    await push_image(client, repo, "v1")
    await assert_error(await client.get(f"/v2/{repo}/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.head(f"/v2/{repo}/manifests/nope"), 404)
    await assert_error(await client.get(f"/v2/{repo}/manifests/{digest_of(b'absent')}"), 404, "MANIFEST_UNKNOWN")


async def test_end2_pull_blob(client: ClientSession, repo: str) -> None:
    data = os.urandom(70_000)
    digest = await push_blob(client, repo, data)
    response = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Docker-Content-Digest"] == digest
    head = await client.head(f"/v2/{repo}/blobs/{digest}")
    assert head.status == 200
    assert int(head.headers["Content-Length"]) == len(data)
    assert await head.read() == b""


async def test_end2_blob_range(client: ClientSession, repo: str) -> None:
    data = bytes(range(200))
    digest = await push_blob(client, repo, data)
    response = await client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=100-149"})
    assert response.status == 206
    assert response.headers["Content-Range"] == "bytes 100-149/200"
    assert await response.read() == data[100:150]
    response = await client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=500-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */200"


async def test_end2_blob_not_found(client: ClientSession, repo: str) -> None:
    await push_blob(client, repo, b"something")
    await assert_error(await client.get(f"/v2/{repo}/blobs/{digest_of(b'absent')}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/{repo}/blobs/{digest_of(b'absent')}"), 404)


# == push ==============================================================================================
async def test_end4a_end6_post_then_put(client: ClientSession, repo: str) -> None:
    data = b"post then put"
    response = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert response.status == 202
    location = response.headers["Location"]
    response = await client.put(location, params={"digest": digest_of(data)}, data=data,
                                headers={"Content-Type": "application/octet-stream"})
    assert response.status == 201
    assert response.headers["Location"]
    assert response.headers["Docker-Content-Digest"] == digest_of(data)
    assert await (await client.get(response.headers["Location"])).read() == data


async def test_end4b_single_post(client: ClientSession, repo: str) -> None:
    data = b"single post"
    response = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    assert response.status == 201
    assert response.headers["Location"]
    assert await (await client.get(f"/v2/{repo}/blobs/{digest_of(data)}")).read() == data


async def test_end5_end13_chunked_push(client: ClientSession, repo: str) -> None:
    chunks = [os.urandom(1000), os.urandom(1000), os.urandom(5)]
    location = (await client.post(f"/v2/{repo}/blobs/uploads/")).headers["Location"]
    offset = 0
    for chunk in chunks:
        response = await client.patch(
            location,
            data=chunk,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Length": str(len(chunk)),
            },
        )
        assert response.status == 202
        offset += len(chunk)
        assert response.headers["Range"] == f"0-{offset - 1}"
        location = response.headers["Location"]
        status = await client.get(location)
        assert status.status == 204
        assert status.headers["Range"] == f"0-{offset - 1}"
        assert status.headers["Location"]
    data = b"".join(chunks)
    response = await client.put(location, params={"digest": digest_of(data)})
    assert response.status == 201
    assert await (await client.get(f"/v2/{repo}/blobs/{digest_of(data)}")).read() == data


async def test_end5_out_of_order_chunk(client: ClientSession, repo: str) -> None:
    location = (await client.post(f"/v2/{repo}/blobs/uploads/")).headers["Location"]
    await client.patch(location, data=b"12345", headers={"Content-Range": "0-4"})
    response = await client.patch(location, data=b"67890", headers={"Content-Range": "10-14"})
    assert response.status == 416
    assert response.headers["Range"] == "0-4"


async def test_end6_digest_mismatch(client: ClientSession, repo: str) -> None:
    location = (await client.post(f"/v2/{repo}/blobs/uploads/")).headers["Location"]
    response = await client.put(location, params={"digest": digest_of(b"other")}, data=b"mine")
    await assert_error(response, 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/{repo}/blobs/{digest_of(b'other')}"), 404, "BLOB_UNKNOWN")


async def test_end6_unknown_upload(client: ClientSession, repo: str) -> None:
    response = await client.put(f"/v2/{repo}/blobs/uploads/{'0' * 32}", params={"digest": digest_of(b"")})
    await assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_end11_mount(client: ClientSession, repo: str) -> None:
    digest = await push_blob(client, repo, b"mountable")
    target = f"{repo}-mounted"
    response = await client.post(f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert response.status == 201
    assert response.headers["Location"]
    assert response.headers["Docker-Content-Digest"] == digest
    assert await (await client.get(f"/v2/{target}/blobs/{digest}")).read() == b"mountable"


async def test_end11_mount_falls_back_to_an_upload(client: ClientSession, repo: str) -> None:
    digest = await push_blob(client, repo, b"not in the source")
    response = await client.post(
        f"/v2/{repo}-target/blobs/uploads/", params={"mount": digest, "from": f"{repo}-empty"}
    )
    assert response.status == 202
    assert "/blobs/uploads/" in response.headers["Location"]
    await assert_error(await client.get(f"/v2/{repo}-target/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_end7_push_manifest(client: ClientSession, repo: str) -> None:
    config, layers = b'{"os":"linux"}', [b"a layer"]
    for blob in (config, *layers):
        await push_blob(client, repo, blob)
    body = image_manifest(config, layers)
    response = await put_manifest(client, repo, "v1", body, OCI_MANIFEST)
    assert response.status == 201
    assert response.headers["Location"]
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    response = await put_manifest(client, repo, digest_of(body), body, OCI_MANIFEST)
    assert response.status == 201


async def test_end7_manifest_failures(client: ClientSession, repo: str) -> None:
    await push_blob(client, repo, b"{}")
    missing = image_manifest(b"{}", [b"never uploaded"])
    await assert_error(await put_manifest(client, repo, "v1", missing, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")
    await assert_error(await put_manifest(client, repo, "v1", b"{nope", OCI_MANIFEST), 400, "MANIFEST_INVALID")
    good = image_manifest(b"{}", [])
    response = await put_manifest(client, repo, digest_of(b"not the body"), good, OCI_MANIFEST)
    await assert_error(response, 400, "DIGEST_INVALID")


async def test_end7_index(client: ClientSession, repo: str) -> None:
    child_digest, child = await push_image(client, repo, "child")
    body = index_manifest([(OCI_MANIFEST, child)])
    response = await put_manifest(client, repo, "multi", body, OCI_INDEX)
    assert response.status == 201
    got = await client.get(f"/v2/{repo}/manifests/multi", headers={"Accept": OCI_INDEX})
    assert got.headers["Content-Type"] == OCI_INDEX
    assert await got.read() == body


async def test_end7_subject_answers_oci_subject(client: ClientSession, repo: str) -> None:
    subject_digest, subject = await push_image(client, repo, "v1")
    await push_blob(client, repo, b"{}")
    await push_blob(client, repo, b"sig")
    body = image_manifest(
        b"{}", [b"sig"], config_type=OCI_EMPTY, artifactType="application/vnd.example.sig",
        subject=descriptor(OCI_MANIFEST, subject),
    )
    response = await put_manifest(client, repo, digest_of(body), body, OCI_MANIFEST)
    assert response.status == 201
    assert response.headers["OCI-Subject"] == subject_digest


ND_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
ND_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


def tar_gz(name: str, content: bytes) -> tuple[bytes, bytes]:
    """A one-file layer: (the gzip blob, the tar it decompresses to)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), mtime=0), buffer.getvalue()


def non_distributable_image() -> tuple[bytes, bytes, list[bytes], list[str]]:
    """The conformance suite's "non-distributable layers" image: two layers that live elsewhere (their blobs
    never pushed: a gzip one and a plain one, each with `urls`) and one ordinary layer.
    Returns (manifest, config, the blobs to push, the foreign layers' digests)."""
    foreign = [digest_of(os.urandom(256)) for _ in range(2)]
    layer, layer_tar = tar_gz("conformance-1.txt", os.urandom(64))
    config = json.dumps({
        "author": "mirror conformance", "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest_of(os.urandom(256)), foreign[1], digest_of(layer_tar)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [
            {"mediaType": ND_LAYER_GZIP, "digest": foreign[0], "size": 123456,
             "urls": [f"https://store.example.com/blobs/sha256/{foreign[0][7:]}"]},
            {"mediaType": ND_LAYER, "digest": foreign[1], "size": 12345,
             "urls": [f"https://store.example.com/blobs/sha256/{foreign[1][7:]}"]},
            descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer),
        ],
    }).encode()
    return manifest, config, [config, layer], foreign


async def test_end7_non_distributable_layers(client: ClientSession, repo: str) -> None:
    """Push, list, head, pull and delete an image whose non-distributable layers were never uploaded."""
    body, _, blobs, foreign = non_distributable_image()
    for blob in blobs:
        await push_blob(client, repo, blob)
    response = await put_manifest(client, repo, "non-distributable-image", body, OCI_MANIFEST)
    assert response.status == 201, await response.text()
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    assert (await (await client.get(f"/v2/{repo}/tags/list")).json())["tags"] == ["non-distributable-image"]
    for reference in ("non-distributable-image", digest_of(body)):
        head = await client.head(f"/v2/{repo}/manifests/{reference}")
        assert head.status == 200
        assert head.headers["Docker-Content-Digest"] == digest_of(body)
        got = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert got.status == 200 and got.headers["Content-Type"] == OCI_MANIFEST
        assert await got.read() == body
    for blob in blobs:
        assert await (await client.get(f"/v2/{repo}/blobs/{digest_of(blob)}")).read() == blob
    for digest in foreign:
        await assert_error(await client.head(f"/v2/{repo}/blobs/{digest}"), 404)
    assert (await client.delete(f"/v2/{repo}/manifests/{digest_of(body)}")).status == 202
    await assert_error(await client.get(f"/v2/{repo}/manifests/non-distributable-image"), 404, "MANIFEST_UNKNOWN")
    for blob in blobs:
        assert (await client.delete(f"/v2/{repo}/blobs/{digest_of(blob)}")).status == 202


def write_oci_layout(path: Path, tag: str, manifest: bytes, blobs: list[bytes]) -> None:
    """An OCI image layout holding `blobs` and `manifest` (not the foreign layers: a client never has to)."""
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for blob in (*blobs, manifest):
        (path / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    top = descriptor(OCI_MANIFEST, manifest, annotations={"org.opencontainers.image.ref.name": tag})
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))


@pytest.mark.real
@pytest.mark.needs_tools("skopeo")
def test_skopeo_round_trips_an_image_with_foreign_layers(live_server: LiveServer, tmp_path: Path) -> None:
    """skopeo skips layers that have `urls` on push and on pull; the mirror must take the manifest without
    them and give it back byte for byte."""
    body, _, blobs, foreign = non_distributable_image()
    source, pulled = tmp_path / "source", tmp_path / "pulled"
    write_oci_layout(source, "1", body, blobs)
    ref = f"docker://{live_server.url.removeprefix('http://')}/conformance/foreign-{uuid.uuid4().hex[:8]}:1"
    skopeo.copy(f"oci:{source}:1", ref)
    assert skopeo.inspect_raw(ref) == body
    skopeo.copy(ref, f"oci:{pulled}:1")
    stored = {p.name for p in (pulled / "blobs" / "sha256").iterdir()}
    assert stored == {hashlib.sha256(b).hexdigest() for b in (*blobs, body)}
    assert not {d[7:] for d in foreign} & stored


# == content discovery ======================================================================================
async def test_end8_tags_list_and_pagination(client: ClientSession, repo: str) -> None:
    _, body = await push_image(client, repo, "c")
    for tag in ("a", "b", "d"):
        await put_manifest(client, repo, tag, body, OCI_MANIFEST)
    response = await client.get(f"/v2/{repo}/tags/list")
    assert response.status == 200
    assert await response.json() == {"name": repo, "tags": ["a", "b", "c", "d"]}
    response = await client.get(f"/v2/{repo}/tags/list", params={"n": "2"})
    assert (await response.json())["tags"] == ["a", "b"]
    link = response.headers["Link"]
    assert link.endswith('; rel="next"')
    response = await client.get(link[1 : link.index(">")])
    assert (await response.json())["tags"] == ["c", "d"]
    response = await client.get(f"/v2/{repo}/tags/list", params={"n": "2", "last": "b"})
    assert (await response.json())["tags"] == ["c", "d"]


async def test_end8_unknown_repository(client: ClientSession, repo: str) -> None:
    await assert_error(await client.get(f"/v2/{repo}/tags/list"), 404, "NAME_UNKNOWN")


async def test_end12_referrers(client: ClientSession, repo: str) -> None:
    subject_digest, subject = await push_image(client, repo, "v1")
    await push_blob(client, repo, b"{}")
    referrers = {}
    for artifact_type in ("application/vnd.example.sig", "application/vnd.example.sbom"):
        payload = artifact_type.encode()
        await push_blob(client, repo, payload)
        body = image_manifest(
            b"{}", [payload], config_type=OCI_EMPTY, artifactType=artifact_type,
            subject=descriptor(OCI_MANIFEST, subject),
        )
        assert (await put_manifest(client, repo, digest_of(body), body, OCI_MANIFEST)).status == 201
        referrers[digest_of(body)] = (artifact_type, len(body))

    response = await client.get(f"/v2/{repo}/referrers/{subject_digest}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    index = await response.json(content_type=None)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert {m["digest"]: (m["artifactType"], m["size"]) for m in index["manifests"]} == referrers
    assert all(m["mediaType"] == OCI_MANIFEST for m in index["manifests"])

    response = await client.get(
        f"/v2/{repo}/referrers/{subject_digest}", params={"artifactType": "application/vnd.example.sbom"}
    )
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["artifactType"] for m in (await response.json(content_type=None))["manifests"]] == [
        "application/vnd.example.sbom"
    ]


async def test_end12_referrers_of_nothing(client: ClientSession, repo: str) -> None:
    response = await client.get(f"/v2/{repo}/referrers/{digest_of(b'no such subject')}")
    assert response.status == 200
    assert (await response.json(content_type=None))["manifests"] == []
    await assert_error(await client.get(f"/v2/{repo}/referrers/sha256:bad"), 400, "DIGEST_INVALID")


async def test_catalog_lists_pushed_repositories(client: ClientSession, repo: str) -> None:
    await push_image(client, repo, "v1")
    names: list[str] = []
    url: str | None = "/v2/_catalog?n=50"
    while url:
        response = await client.get(url)
        assert response.status == 200
        names += (await response.json())["repositories"]
        link = response.headers.get("Link")
        url = link[1 : link.index(">")] if link else None
    assert repo in names
    assert names == sorted(names)


# == content management ======================================================================================
async def test_end9_delete_tag_and_manifest(client: ClientSession, repo: str) -> None:
    digest, _ = await push_image(client, repo, "v1")
    await put_manifest(client, repo, "v2", (await (await client.get(f"/v2/{repo}/manifests/v1")).read()), OCI_MANIFEST)
    response = await client.delete(f"/v2/{repo}/manifests/v1")
    assert response.status == 202
    await assert_error(await client.get(f"/v2/{repo}/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert (await client.get(f"/v2/{repo}/manifests/v2")).status == 200
    response = await client.delete(f"/v2/{repo}/manifests/{digest}")
    assert response.status == 202
    await assert_error(await client.get(f"/v2/{repo}/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.get(f"/v2/{repo}/manifests/v2"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.delete(f"/v2/{repo}/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")


async def test_end10_delete_blob(client: ClientSession, repo: str) -> None:
    digest = await push_blob(client, repo, b"to be deleted")
    response = await client.delete(f"/v2/{repo}/blobs/{digest}")
    assert response.status == 202
    await assert_error(await client.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_end14_cancel_upload(client: ClientSession, repo: str) -> None:
    location = (await client.post(f"/v2/{repo}/blobs/uploads/")).headers["Location"]
    response = await client.delete(location)
    assert response.status == 204
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_invalid_names_are_name_invalid(client: ClientSession) -> None:
    await assert_error(await client.get("/v2/Upper/Case/tags/list"), 400, "NAME_INVALID")
    await assert_error(await client.post("/v2/a__-b/blobs/uploads/"), 400, "NAME_INVALID")
