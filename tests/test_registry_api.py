"""Behaviour of every distribution-API endpoint for local repositories, against the in-process app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.registry_helpers import (
    API_VERSION,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    ClientFactory,
    descriptor,
    digest_of,
    error_codes,
    image_manifest,
    index_manifest,
    push_blob,
    push_image,
    put_manifest,
    stored_bytes,
)

MISSING = digest_of(b"never pushed")
SIG_TYPE = "application/vnd.example.signature.v1"
SBOM_TYPE = "application/vnd.example.sbom.v1"


async def expect_error(response: ClientResponse, status: int, code: str) -> None:
    """A registry error: the status, the code, the JSON body shape and the API version header."""
    assert response.status == status, (response.status, await response.text())
    assert response.headers.get(API_VERSION[0]) == API_VERSION[1]
    if response.method == "HEAD":
        assert await response.read() == b""
        return
    assert response.content_type == "application/json"
    assert code in await error_codes(response)


# -- base -----------------------------------------------------------------------------------------
async def test_base_endpoint(registry: TestClient) -> None:
    for path in ("/v2/", "/v2"):
        response = await registry.get(path)
        assert response.status == 200
        assert response.headers[API_VERSION[0]] == API_VERSION[1]
        assert await response.json() == {}


async def test_unknown_endpoint_is_a_registry_404(registry: TestClient) -> None:
    response = await registry.get("/v2/team/app/nonsense")
    assert response.status == 404
    assert response.headers[API_VERSION[0]] == API_VERSION[1]
    await error_codes(response)


async def test_wrong_method_is_405_with_allow(registry: TestClient) -> None:
    response = await registry.post("/v2/team/app/tags/list")
    await expect_error(response, 405, "UNSUPPORTED")
    assert "GET" in response.headers["Allow"]


# -- blobs: pull ----------------------------------------------------------------------------------
async def test_blob_get_and_head(registry: TestClient) -> None:
    data = bytes(range(256)) * 40
    digest = await push_blob(registry, "team/app", data)
    response = await registry.get(f"/v2/team/app/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(data))

    head = await registry.head(f"/v2/team/app/blobs/{digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert await head.read() == b""


async def test_blob_sha512_is_served_by_its_own_digest(registry: TestClient) -> None:
    data = b"sha512 content"
    digest = digest_of(data, "sha512")
    response = await registry.post("/v2/team/app/blobs/uploads/", params={"digest": digest}, data=data)
    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == digest
    got = await registry.get(f"/v2/team/app/blobs/{digest}")
    assert got.status == 200 and await got.read() == data


@pytest.mark.parametrize(
    ("header", "status", "body", "content_range"),
    [
        ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
        ("bytes=5-", 206, b"56789", "bytes 5-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=-30", 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=10-", 416, b"", "bytes */10"),
        ("bytes=100-200", 416, b"", "bytes */10"),
        ("bytes=-0", 416, b"", "bytes */10"),
        ("bytes=5-2", 416, b"", "bytes */10"),
        ("bytes=abc", 416, b"", "bytes */10"),
    ],
)
async def test_blob_range(registry: TestClient, header: str, status: int, body: bytes, content_range: str) -> None:
    digest = await push_blob(registry, "team/app", b"0123456789")
    response = await registry.get(f"/v2/team/app/blobs/{digest}", headers={"Range": header})
    assert response.status == status
    assert response.headers["Content-Range"] == content_range
    assert response.headers[API_VERSION[0]] == API_VERSION[1]
    if status == 206:
        assert await response.read() == body
        assert response.headers["Content-Length"] == str(len(body))


async def test_blob_unknown(registry: TestClient) -> None:
    await push_blob(registry, "team/app", b"something")
    await expect_error(await registry.get(f"/v2/team/app/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    await expect_error(await registry.head(f"/v2/team/app/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    await expect_error(await registry.get(f"/v2/never/pushed/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")


async def test_blob_is_only_readable_through_a_repository_that_links_it(registry: TestClient) -> None:
    digest = await push_blob(registry, "team/a", b"private bytes")
    await expect_error(await registry.get(f"/v2/team/b/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await expect_error(await registry.head(f"/v2/team/b/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_blob_bad_digest(registry: TestClient) -> None:
    for bad in ("sha256:xyz", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:" + "0" * 63):
        await expect_error(await registry.get(f"/v2/team/app/blobs/{bad}"), 400, "DIGEST_INVALID")


# -- blobs: delete --------------------------------------------------------------------------------
async def test_blob_delete(registry: TestClient) -> None:
    data = b"shared layer"
    digest = await push_blob(registry, "team/a", data)
    await push_blob(registry, "team/b", data)

    response = await registry.delete(f"/v2/team/a/blobs/{digest}")
    assert response.status == 202
    assert response.headers[API_VERSION[0]] == API_VERSION[1]
    await expect_error(await registry.get(f"/v2/team/a/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await expect_error(await registry.delete(f"/v2/team/a/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # Another repository linking the same content still serves it.
    other = await registry.get(f"/v2/team/b/blobs/{digest}")
    assert other.status == 200 and await other.read() == data


async def test_blob_delete_unknown(registry: TestClient) -> None:
    await expect_error(await registry.delete(f"/v2/team/a/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    await expect_error(await registry.delete("/v2/team/a/blobs/sha256:nope"), 400, "DIGEST_INVALID")


# -- uploads --------------------------------------------------------------------------------------
async def start(client: TestClient, name: str = "team/app") -> str:
    response = await client.post(f"/v2/{name}/blobs/uploads/")
    assert response.status == 202, await response.text()
    return response.headers["Location"]


async def test_upload_start_answers_a_session(registry: TestClient) -> None:
    response = await registry.post("/v2/team/app/blobs/uploads/")
    assert response.status == 202
    location = response.headers["Location"]
    uuid = response.headers["Docker-Upload-UUID"]
    assert location == f"/v2/team/app/blobs/uploads/{uuid}"
    assert response.headers["Range"] == "0-0"
    assert response.headers[API_VERSION[0]] == API_VERSION[1]


async def test_monolithic_post(registry: TestClient) -> None:
    data = b"monolithic" * 1000
    digest = digest_of(data)
    response = await registry.post("/v2/team/app/blobs/uploads/", params={"digest": digest}, data=data)
    assert response.status == 201
    assert response.headers["Location"] == f"/v2/team/app/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    got = await registry.get(response.headers["Location"])
    assert await got.read() == data


async def test_monolithic_post_of_an_empty_blob(registry: TestClient) -> None:
    digest = digest_of(b"")
    response = await registry.post("/v2/team/app/blobs/uploads/", params={"digest": digest}, data=b"")
    assert response.status == 201
    got = await registry.get(f"/v2/team/app/blobs/{digest}")
    assert got.status == 200 and await got.read() == b""


async def test_post_then_put(registry: TestClient) -> None:
    data = b"post then put"
    location = await start(registry)
    digest = digest_of(data)
    response = await registry.put(location, params={"digest": digest}, data=data)
    assert response.status == 201
    assert response.headers["Location"] == f"/v2/team/app/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    assert await (await registry.get(f"/v2/team/app/blobs/{digest}")).read() == data
    # The session is over once the blob is committed.
    await expect_error(await registry.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_chunked_upload_with_content_range(registry: TestClient) -> None:
    chunks = [b"aaaaa", b"bbbbbbb", b"c"]
    location = await start(registry)
    offset = 0
    for chunk in chunks:
        end = offset + len(chunk) - 1
        response = await registry.patch(
            location,
            data=chunk,
            headers={"Content-Range": f"{offset}-{end}", "Content-Type": "application/octet-stream"},
        )
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == f"0-{end}"
        assert response.headers["Docker-Upload-UUID"]
        assert response.headers["Location"].endswith(response.headers["Docker-Upload-UUID"])
        location = response.headers["Location"]
        offset = end + 1
    status = await registry.get(location)
    assert status.status == 204
    assert status.headers["Range"] == f"0-{offset - 1}"
    assert status.headers["Location"] == location
    data = b"".join(chunks)
    done = await registry.put(location, params={"digest": digest_of(data)})
    assert done.status == 201
    assert await (await registry.get(f"/v2/team/app/blobs/{digest_of(data)}")).read() == data


async def test_final_chunk_on_put(registry: TestClient) -> None:
    location = await start(registry)
    first = await registry.patch(location, data=b"head-", headers={"Content-Range": "0-4"})
    assert first.status == 202
    data = b"head-tail"
    done = await registry.put(
        first.headers["Location"], params={"digest": digest_of(data)}, data=b"tail", headers={"Content-Range": "5-8"}
    )
    assert done.status == 201
    assert await (await registry.get(f"/v2/team/app/blobs/{digest_of(data)}")).read() == data


async def test_streamed_patch_without_content_range(registry: TestClient) -> None:
    location = await start(registry)

    async def body(parts: list[bytes]) -> Any:
        for part in parts:
            yield part

    response = await registry.patch(location, data=body([b"stream", b"ed-"]))
    assert response.status == 202
    assert response.headers["Range"] == "0-8"
    response = await registry.patch(response.headers["Location"], data=b"body")
    assert response.headers["Range"] == "0-12"
    data = b"streamed-body"
    assert (await registry.put(response.headers["Location"], params={"digest": digest_of(data)})).status == 201
    assert await (await registry.get(f"/v2/team/app/blobs/{digest_of(data)}")).read() == data


async def test_out_of_order_and_repeated_patch_is_416(registry: TestClient) -> None:
    location = await start(registry)
    assert (await registry.patch(location, data=b"01234", headers={"Content-Range": "0-4"})).status == 202
    # A gap.
    gap = await registry.patch(location, data=b"abc", headers={"Content-Range": "7-9"})
    assert gap.status == 416
    assert gap.headers["Range"] == "0-4"
    assert gap.headers[API_VERSION[0]] == API_VERSION[1]
    await error_codes(gap)
    # The same chunk again.
    repeat = await registry.patch(location, data=b"01234", headers={"Content-Range": "0-4"})
    assert repeat.status == 416
    assert repeat.headers["Range"] == "0-4"
    # Overlapping.
    overlap = await registry.patch(location, data=b"456", headers={"Content-Range": "4-6"})
    assert overlap.status == 416
    # Nothing of the refused chunks was kept: the upload continues from byte 5.
    assert (await registry.patch(location, data=b"56789", headers={"Content-Range": "5-9"})).status == 202
    assert (await registry.put(location, params={"digest": digest_of(b"0123456789")})).status == 201


async def test_cancel_upload(registry: TestClient) -> None:
    location = await start(registry)
    await registry.patch(location, data=b"partial")
    response = await registry.delete(location)
    assert response.status == 204
    assert response.headers[API_VERSION[0]] == API_VERSION[1]
    await expect_error(await registry.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.patch(location, data=b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
    finish = await registry.put(location, params={"digest": digest_of(b"partial")})
    await expect_error(finish, 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize(
    "upload_id",
    # `..` itself is normalised away by the client library; test_bad_input sends it over a raw socket.
    ["0" * 32, "f" * 32, "not-an-id", "F" * 32, "0" * 31, "0" * 33, "..%2F..%2Fetc", "%2e%2e%2fx", "%00"],
)
async def test_unknown_or_malformed_upload_ids(registry: TestClient, upload_id: str) -> None:
    path = f"/v2/team/app/blobs/uploads/{upload_id}"
    await expect_error(await registry.get(path), 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.patch(path, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    finish = await registry.put(path, params={"digest": digest_of(b"x")}, data=b"x")
    await expect_error(finish, 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.delete(path), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_of_another_repository_is_unknown(registry: TestClient) -> None:
    location = await start(registry, "team/a")
    upload_id = location.rsplit("/", 1)[1]
    stolen = f"/v2/team/b/blobs/uploads/{upload_id}"
    await expect_error(await registry.get(stolen), 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.patch(stolen, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.put(stolen, params={"digest": digest_of(b"")}), 404, "BLOB_UPLOAD_UNKNOWN")
    await expect_error(await registry.delete(stolen), 404, "BLOB_UPLOAD_UNKNOWN")
    # The owner's session is untouched.
    assert (await registry.patch(location, data=b"mine")).status == 202
    assert (await registry.put(location, params={"digest": digest_of(b"mine")})).status == 201
    await expect_error(await registry.get(f"/v2/team/b/blobs/{digest_of(b'mine')}"), 404, "BLOB_UNKNOWN")


async def test_digest_mismatch_commits_nothing(registry: TestClient) -> None:
    data = b"the real bytes"
    claimed = digest_of(b"other bytes")
    location = await start(registry)
    await registry.patch(location, data=data)
    await expect_error(await registry.put(location, params={"digest": claimed}), 400, "DIGEST_INVALID")
    for digest in (claimed, digest_of(data)):
        await expect_error(await registry.get(f"/v2/team/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert await stored_bytes(registry, sessions=True) == set()
    # Monolithic pushes fail the same way.
    response = await registry.post("/v2/team/app/blobs/uploads/", params={"digest": claimed}, data=data)
    await expect_error(response, 400, "DIGEST_INVALID")
    await expect_error(await registry.get(f"/v2/team/app/blobs/{claimed}"), 404, "BLOB_UNKNOWN")
    assert await stored_bytes(registry, sessions=True) == set()


async def test_finishing_without_a_digest_is_400(registry: TestClient) -> None:
    location = await start(registry)
    await registry.patch(location, data=b"bytes")
    await expect_error(await registry.put(location), 400, "DIGEST_INVALID")
    await expect_error(await registry.put(location, params={"digest": ""}), 400, "DIGEST_INVALID")
    await expect_error(await registry.put(location, params={"digest": "sha256:zz"}), 400, "DIGEST_INVALID")
    # A refused request does not end the session: the client can still finish it.
    assert (await registry.put(location, params={"digest": digest_of(b"bytes")})).status == 201


# -- cross-repository mount ------------------------------------------------------------------------
async def test_mount_from_a_repository_that_links_the_blob(registry: TestClient) -> None:
    data = b"mount me"
    digest = await push_blob(registry, "team/source", data)
    response = await registry.post("/v2/team/target/blobs/uploads/", params={"mount": digest, "from": "team/source"})
    assert response.status == 201
    assert response.headers["Location"] == f"/v2/team/target/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    assert await (await registry.get(f"/v2/team/target/blobs/{digest}")).read() == data


async def test_mount_refuses_a_blob_the_source_does_not_link(registry: TestClient) -> None:
    """zot CVE-2024-39897 / distribution CVE-2026-35172: stored content is not readable by knowing its digest."""
    digest = await push_blob(registry, "secret/repo", b"secret layer")
    await push_blob(registry, "team/source", b"something else")
    for source in ("team/source", "never/existed"):
        response = await registry.post("/v2/team/target/blobs/uploads/", params={"mount": digest, "from": source})
        assert response.status == 202, await response.text()
        assert "/blobs/uploads/" in response.headers["Location"]
        assert response.headers["Docker-Upload-UUID"]
        await expect_error(await registry.get(f"/v2/team/target/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # The fresh session it answered with is a real one.
    assert (await registry.patch(response.headers["Location"], data=b"secret layer")).status == 202
    assert (await registry.put(response.headers["Location"], params={"digest": digest})).status == 201


async def test_mount_without_from_starts_an_upload(registry: TestClient) -> None:
    digest = await push_blob(registry, "team/source", b"data")
    response = await registry.post("/v2/team/target/blobs/uploads/", params={"mount": digest})
    assert response.status == 202
    await expect_error(await registry.get(f"/v2/team/target/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_mount_of_a_deleted_link_is_refused(registry: TestClient) -> None:
    digest = await push_blob(registry, "team/source", b"gone soon")
    await push_blob(registry, "team/keeper", b"gone soon")
    assert (await registry.delete(f"/v2/team/source/blobs/{digest}")).status == 202
    response = await registry.post("/v2/team/target/blobs/uploads/", params={"mount": digest, "from": "team/source"})
    assert response.status == 202


# -- manifests ------------------------------------------------------------------------------------
async def check_manifest_served(client: TestClient, name: str, reference: str, body: bytes, media_type: str) -> None:
    digest = digest_of(body)
    got = await client.get(f"/v2/{name}/manifests/{reference}", headers={"Accept": media_type})
    assert got.status == 200
    assert await got.read() == body  # byte for byte: never re-serialised
    assert got.headers["Content-Type"] == media_type
    assert got.headers["Docker-Content-Digest"] == digest
    assert got.headers["Content-Length"] == str(len(body))
    head = await client.head(f"/v2/{name}/manifests/{reference}")
    assert head.status == 200
    assert head.headers["Content-Type"] == media_type
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.headers["Content-Length"] == str(len(body))
    assert await head.read() == b""


async def push_blobs_of(client: TestClient, name: str, config: bytes, layers: list[bytes]) -> None:
    for blob in (config, *layers):
        await push_blob(client, name, blob)


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_image_manifest_round_trip(registry: TestClient, media_type: str) -> None:
    config, layers = b'{"os":"linux"}', [b"layer 1", b"layer 2"]
    await push_blobs_of(registry, "team/app", config, layers)
    body = image_manifest(config, layers, media_type=media_type)
    response = await put_manifest(registry, "team/app", "v1", body, media_type)
    assert response.status == 201
    digest = digest_of(body)
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Location"] == f"/v2/team/app/manifests/{digest}"
    assert "OCI-Subject" not in response.headers
    await check_manifest_served(registry, "team/app", "v1", body, media_type)
    await check_manifest_served(registry, "team/app", digest, body, media_type)


@pytest.mark.parametrize(
    ("index_type", "child_type"), [(OCI_INDEX, OCI_MANIFEST), (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)]
)
async def test_index_round_trip(registry: TestClient, index_type: str, child_type: str) -> None:
    children = []
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch}).encode()
        await push_blobs_of(registry, "team/multi", config, [arch.encode()])
        child = image_manifest(config, [arch.encode()], media_type=child_type)
        assert (await put_manifest(registry, "team/multi", digest_of(child), child, child_type)).status == 201
        children.append((child_type, child))
    body = index_manifest(children, media_type=index_type)
    response = await put_manifest(registry, "team/multi", "latest", body, index_type)
    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    await check_manifest_served(registry, "team/multi", "latest", body, index_type)
    await check_manifest_served(registry, "team/multi", digest_of(body), body, index_type)
    # The children stay reachable by digest.
    await check_manifest_served(registry, "team/multi", digest_of(children[0][1]), children[0][1], child_type)


async def test_artifact_round_trip(registry: TestClient) -> None:
    await push_blobs_of(registry, "team/art", b"{}", [b"artifact payload"])
    body = image_manifest(b"{}", [b"artifact payload"], config_type=OCI_EMPTY, artifactType=SBOM_TYPE)
    assert (await put_manifest(registry, "team/art", "sbom", body, OCI_MANIFEST)).status == 201
    await check_manifest_served(registry, "team/art", "sbom", body, OCI_MANIFEST)


async def test_manifest_put_by_digest(registry: TestClient) -> None:
    config, layers = b"{}", [b"x"]
    await push_blobs_of(registry, "team/app", config, layers)
    body = image_manifest(config, layers)
    response = await put_manifest(registry, "team/app", digest_of(body), body, OCI_MANIFEST)
    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    await check_manifest_served(registry, "team/app", digest_of(body), body, OCI_MANIFEST)
    # No tag was created.
    assert (await (await registry.get("/v2/team/app/tags/list")).json())["tags"] == []


async def test_manifest_put_by_digest_with_other_bytes(registry: TestClient) -> None:
    config, layers = b"{}", [b"x"]
    await push_blobs_of(registry, "team/app", config, layers)
    body = image_manifest(config, layers)
    wrong = digest_of(body + b" ")
    await expect_error(await put_manifest(registry, "team/app", wrong, body, OCI_MANIFEST), 400, "DIGEST_INVALID")
    for reference in (wrong, digest_of(body)):
        await expect_error(await registry.get(f"/v2/team/app/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_sha512_reference(registry: TestClient) -> None:
    config, layers = b"{}", [b"x"]
    await push_blobs_of(registry, "team/app", config, layers)
    body = image_manifest(config, layers)
    digest = digest_of(body, "sha512")
    response = await put_manifest(registry, "team/app", digest, body, OCI_MANIFEST)
    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == digest
    got = await registry.get(f"/v2/team/app/manifests/{digest}")
    assert got.status == 200 and await got.read() == body


async def test_manifest_referencing_a_missing_blob(registry: TestClient) -> None:
    config, layers = b"{}", [b"pushed", b"not pushed"]
    await push_blobs_of(registry, "team/app", config, layers[:1])
    body = image_manifest(config, layers)
    await expect_error(await put_manifest(registry, "team/app", "v1", body, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")
    await expect_error(await registry.get("/v2/team/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_referencing_a_blob_of_another_repository(registry: TestClient) -> None:
    config, layers = b"{}", [b"elsewhere"]
    await push_blobs_of(registry, "team/other", config, layers)
    body = image_manifest(config, layers)
    await expect_error(await put_manifest(registry, "team/app", "v1", body, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")


async def test_index_referencing_a_missing_manifest(registry: TestClient) -> None:
    config, layers = b"{}", [b"x"]
    await push_blobs_of(registry, "team/app", config, layers)
    present = image_manifest(config, layers)
    assert (await put_manifest(registry, "team/app", digest_of(present), present, OCI_MANIFEST)).status == 201
    absent = image_manifest(config, layers, annotations={"never": "pushed"})
    body = index_manifest([(OCI_MANIFEST, present), (OCI_MANIFEST, absent)])
    response = await put_manifest(registry, "team/app", "latest", body, OCI_INDEX)
    await expect_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


ND_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
ND_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
ELSEWHERE = "https://store.example.com/blobs/sha256/"


def manifest_with_layers(config: bytes, layers: list[dict[str, Any]], media_type: str = OCI_MANIFEST) -> bytes:
    """`image_manifest` with these exact layer descriptors (in its unusual formatting)."""
    doc = json.loads(image_manifest(config, [], media_type=media_type))
    doc["layers"] = layers
    return json.dumps(doc, indent=3).encode()


def foreign_layers(media_type: str) -> list[dict[str, Any]]:
    """Layers a client never pushes: a non-distributable type with urls, without urls, and urls alone."""
    if media_type == DOCKER_MANIFEST:
        return [
            descriptor(DOCKER_FOREIGN_LAYER, b"windows base", urls=["https://mcr.example.com/base"]),
            descriptor(DOCKER_FOREIGN_LAYER, b"windows base, the client has it"),
        ]
    return [
        descriptor(ND_LAYER_GZIP, b"nd gzip", urls=[ELSEWHERE + "1"]),
        descriptor(ND_LAYER, b"nd tar"),
        descriptor("application/vnd.oci.image.layer.v1.tar", b"plain but elsewhere", urls=[ELSEWHERE + "2"]),
    ]


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_manifest_with_non_distributable_layers_is_accepted_without_their_blobs(
    registry: TestClient, media_type: str
) -> None:
    config, pushed = b'{"os":"windows"}', b"an ordinary layer"
    await push_blobs_of(registry, "team/app", config, [pushed])
    layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip" if media_type == DOCKER_MANIFEST else ND_LAYER
    foreign = foreign_layers(media_type)
    body = manifest_with_layers(config, [foreign[0], descriptor(layer_type, pushed), *foreign[1:]], media_type)
    response = await put_manifest(registry, "team/app", "v1", body, media_type)
    assert response.status == 201, await response.text()
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    await check_manifest_served(registry, "team/app", "v1", body, media_type)
    await check_manifest_served(registry, "team/app", digest_of(body), body, media_type)
    # The registry does not pretend to have what it was never given.
    for layer in foreign:
        await expect_error(await registry.get(f"/v2/team/app/blobs/{layer['digest']}"), 404, "BLOB_UNKNOWN")
    assert (await registry.get(f"/v2/team/app/blobs/{digest_of(pushed)}")).status == 200


async def test_foreign_layers_waive_only_their_own_blobs(registry: TestClient) -> None:
    """Everything else is still checked: a missing ordinary layer, a missing config, malformed urls."""
    config = b'{"os":"windows"}'
    await push_blobs_of(registry, "team/app", config, [])
    foreign = foreign_layers(OCI_MANIFEST)
    missing = descriptor("application/vnd.oci.image.layer.v1.tar", b"ordinary, never pushed")
    response = await put_manifest(registry, "team/app", "v1", manifest_with_layers(config, [*foreign, missing]),
                                  OCI_MANIFEST)
    await expect_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert json.loads(await response.read())["errors"][0]["detail"] == {"digests": [missing["digest"]]}
    no_config = manifest_with_layers(b'{"never":"pushed"}', foreign)
    await expect_error(await put_manifest(registry, "team/app", "v1", no_config, OCI_MANIFEST), 400,
                       "MANIFEST_BLOB_UNKNOWN")
    for urls in (["ftp://example.com/x"], ["/relative"], ["https://example.com/x#frag"], "https://example.com/x"):
        bad = manifest_with_layers(config, [descriptor(ND_LAYER, b"nd", urls=urls)])
        await expect_error(await put_manifest(registry, "team/app", "v1", bad, OCI_MANIFEST), 400, "MANIFEST_INVALID")
    await expect_error(await registry.get("/v2/team/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_over_the_limit_is_413(make_registry: ClientFactory) -> None:
    client = await make_registry(limits={"manifest_bytes": "2KiB"})
    big = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "padding": "x" * 4096}).encode()
    response = await put_manifest(client, "team/app", "big", big, OCI_MANIFEST)
    assert response.status == 413
    await error_codes(response)

    async def chunked() -> Any:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    response = await client.put("/v2/team/app/manifests/big", data=chunked(), headers={"Content-Type": OCI_MANIFEST})
    assert response.status == 413
    await error_codes(response)


async def test_manifest_at_the_limit_is_accepted(make_registry: ClientFactory) -> None:
    client = await make_registry(limits={"manifest_bytes": "2KiB"})
    await push_blobs_of(client, "team/app", b"{}", [])
    body = image_manifest(b"{}", [])
    body = body[:-1] + b" " * (2048 - len(body)) + b"}"
    assert len(body) == 2048
    assert (await put_manifest(client, "team/app", "edge", body, OCI_MANIFEST)).status == 201


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", OCI_MANIFEST),
        (b"", OCI_MANIFEST),
        (b"[" * 50_000, OCI_MANIFEST),
        (image_manifest(b"{}", []), DOCKER_MANIFEST),  # mediaType disagrees with Content-Type
        (image_manifest(b"{}", []), OCI_INDEX),
        (json.dumps({"schemaVersion": 1, "name": "team/app", "tag": "v1", "fsLayers": []}).encode(),
         "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        (json.dumps({"schemaVersion": 1, "name": "team/app", "tag": "v1", "fsLayers": []}).encode(),
         "application/json"),
    ],
    ids=["garbage", "empty", "deep", "conflict-docker", "conflict-index", "schema1-signed", "schema1-json"],
)
async def test_invalid_manifests(registry: TestClient, body: bytes, content_type: str) -> None:
    await push_blob(registry, "team/app", b"{}")
    await expect_error(await put_manifest(registry, "team/app", "bad", body, content_type), 400, "MANIFEST_INVALID")
    await expect_error(await registry.get("/v2/team/app/manifests/bad"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_with_manifests_and_layers_is_invalid(registry: TestClient) -> None:
    await push_blobs_of(registry, "team/app", b"{}", [b"l"])
    doc = json.loads(image_manifest(b"{}", [b"l"]))
    doc["manifests"] = []
    body = json.dumps(doc).encode()
    await expect_error(await put_manifest(registry, "team/app", "evil", body, OCI_MANIFEST), 400, "MANIFEST_INVALID")


async def test_manifest_unknown(registry: TestClient) -> None:
    await push_image(registry, "team/app", "v1")
    await expect_error(await registry.get("/v2/team/app/manifests/v2"), 404, "MANIFEST_UNKNOWN")
    await expect_error(await registry.head("/v2/team/app/manifests/v2"), 404, "MANIFEST_UNKNOWN")
    await expect_error(await registry.get(f"/v2/team/app/manifests/{MISSING}"), 404, "MANIFEST_UNKNOWN")
    response = await registry.get("/v2/never/pushed/manifests/latest")
    assert response.status == 404
    assert set(await error_codes(response)) & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"}


async def test_manifests_are_per_repository(registry: TestClient) -> None:
    digest, _ = await push_image(registry, "team/a", "v1")
    await expect_error(await registry.get(f"/v2/team/b/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")


async def test_bad_references(registry: TestClient) -> None:
    await expect_error(await registry.get("/v2/team/app/manifests/sha256:xyz"), 400, "DIGEST_INVALID")
    await expect_error(await registry.get("/v2/team/app/manifests/-bad-tag"), 400, "TAG_INVALID")
    await expect_error(await registry.get(f"/v2/team/app/manifests/{'t' * 129}"), 400, "TAG_INVALID")


async def test_retag_moves_the_tag(registry: TestClient) -> None:
    first, _ = await push_image(registry, "team/app", "latest", layers=(b"one",))
    second, body = await push_image(registry, "team/app", "latest", layers=(b"two",))
    assert first != second
    await check_manifest_served(registry, "team/app", "latest", body, OCI_MANIFEST)
    assert (await registry.get(f"/v2/team/app/manifests/{first}")).status == 200


async def test_delete_manifest_by_digest_removes_its_tags(registry: TestClient) -> None:
    digest, _ = await push_image(registry, "team/app", "v1")
    body = await (await registry.get(f"/v2/team/app/manifests/{digest}")).read()
    await put_manifest(registry, "team/app", "also", body, OCI_MANIFEST)
    other, _ = await push_image(registry, "team/app", "other", layers=(b"different",))
    response = await registry.delete(f"/v2/team/app/manifests/{digest}")
    assert response.status == 202
    assert response.headers[API_VERSION[0]] == API_VERSION[1]
    for reference in (digest, "v1", "also"):
        await expect_error(await registry.get(f"/v2/team/app/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert (await (await registry.get("/v2/team/app/tags/list")).json())["tags"] == ["other"]
    assert (await registry.get(f"/v2/team/app/manifests/{other}")).status == 200
    await expect_error(await registry.delete(f"/v2/team/app/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")


async def test_delete_manifest_by_tag_keeps_the_manifest(registry: TestClient) -> None:
    digest, body = await push_image(registry, "team/app", "v1")
    response = await registry.delete("/v2/team/app/manifests/v1")
    assert response.status == 202
    await expect_error(await registry.get("/v2/team/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    await check_manifest_served(registry, "team/app", digest, body, OCI_MANIFEST)
    await expect_error(await registry.delete("/v2/team/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_deletes_disabled(make_registry: ClientFactory) -> None:
    client = await make_registry(storage={"delete": False})
    digest, body = await push_image(client, "team/app", "v1")
    layer = digest_of(b"layer one")
    await expect_error(await client.delete("/v2/team/app/manifests/v1"), 405, "UNSUPPORTED")
    await expect_error(await client.delete(f"/v2/team/app/manifests/{digest}"), 405, "UNSUPPORTED")
    await expect_error(await client.delete(f"/v2/team/app/blobs/{layer}"), 405, "UNSUPPORTED")
    await check_manifest_served(client, "team/app", "v1", body, OCI_MANIFEST)
    assert (await client.get(f"/v2/team/app/blobs/{layer}")).status == 200


# -- tags list and catalog --------------------------------------------------------------------------
async def tag_all(client: TestClient, name: str, tags: list[str]) -> None:
    digest, body = await push_image(client, name, tags[0])
    for tag in tags[1:]:
        assert (await put_manifest(client, name, tag, body, OCI_MANIFEST)).status == 201


async def test_tags_list(registry: TestClient) -> None:
    await tag_all(registry, "team/app", ["v2", "latest", "v1", "V1"])
    response = await registry.get("/v2/team/app/tags/list")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"name": "team/app", "tags": ["V1", "latest", "v1", "v2"]}
    assert "Link" not in response.headers


async def test_tags_pagination(registry: TestClient) -> None:
    tags = [f"t{i}" for i in range(7)]
    await tag_all(registry, "team/app", tags)
    response = await registry.get("/v2/team/app/tags/list", params={"n": "3"})
    assert (await response.json())["tags"] == ["t0", "t1", "t2"]
    assert response.headers["Link"] == '</v2/team/app/tags/list?n=3&last=t2>; rel="next"'
    seen: list[str] = []
    url: str | None = "/v2/team/app/tags/list?n=3"
    while url:
        page = await registry.get(url)
        seen += (await page.json())["tags"]
        link = page.headers.get("Link")
        url = link[1 : link.index(">")] if link else None
    assert seen == tags
    last = await registry.get("/v2/team/app/tags/list", params={"last": "t4"})
    assert (await last.json())["tags"] == ["t5", "t6"]
    tail = await registry.get("/v2/team/app/tags/list", params={"n": "2", "last": "t4"})
    assert (await tail.json())["tags"] == ["t5", "t6"]
    assert "Link" not in tail.headers
    assert (await (await registry.get("/v2/team/app/tags/list", params={"last": "t6"})).json())["tags"] == []


async def test_n_is_capped(make_registry: ClientFactory) -> None:
    client = await make_registry(limits={"page_size_max": 2})
    await tag_all(client, "team/app", ["a", "b", "c"])
    for params in ({"n": "1000000"}, {}):
        response = await client.get("/v2/team/app/tags/list", params=params)
        assert (await response.json())["tags"] == ["a", "b"]
        assert "last=b" in response.headers["Link"]
    # A number too long for int() (> 4300 digits) is just "as many as allowed".
    huge = await client.get("/v2/team/app/tags/list", params={"n": "9" * 5000})
    assert huge.status == 200
    assert (await huge.json())["tags"] == ["a", "b"]


@pytest.mark.parametrize("n", ["abc", "-1", "1.5", "0x10", " 1", "²", "١"])
async def test_bad_n(registry: TestClient, n: str) -> None:
    await push_image(registry, "team/app", "v1")
    await expect_error(await registry.get("/v2/team/app/tags/list", params={"n": n}), 400, "PAGINATION_NUMBER_INVALID")
    await expect_error(await registry.get("/v2/_catalog", params={"n": n}), 400, "PAGINATION_NUMBER_INVALID")


async def test_tags_of_unknown_repository(registry: TestClient) -> None:
    await expect_error(await registry.get("/v2/never/pushed/tags/list"), 404, "NAME_UNKNOWN")


async def test_catalog(registry: TestClient) -> None:
    assert await (await registry.get("/v2/_catalog")).json() == {"repositories": []}
    for name in ("zeta", "team/app", "team/app/sub", "alpha"):
        await push_image(registry, name, "v1")
    response = await registry.get("/v2/_catalog")
    assert response.status == 200
    assert (await response.json())["repositories"] == ["alpha", "team/app", "team/app/sub", "zeta"]
    first = await registry.get("/v2/_catalog", params={"n": "2"})
    assert (await first.json())["repositories"] == ["alpha", "team/app"]
    assert first.headers["Link"] == '</v2/_catalog?n=2&last=team%2Fapp>; rel="next"'
    link = first.headers["Link"]
    second = await registry.get(link[1 : link.index(">")])
    assert (await second.json())["repositories"] == ["team/app/sub", "zeta"]


# -- referrers (OCI 1.1) ---------------------------------------------------------------------------
async def push_referrer(
    client: TestClient, name: str, subject: bytes, payload: bytes, artifact_type: str | None, **extra: Any
) -> tuple[str, bytes, ClientResponse]:
    await push_blobs_of(client, name, b"{}", [payload])
    fields: dict[str, Any] = {"subject": descriptor(OCI_MANIFEST, subject), **extra}
    if artifact_type:
        fields["artifactType"] = artifact_type
    body = image_manifest(b"{}", [payload], config_type=OCI_EMPTY, **fields)
    response = await put_manifest(client, name, digest_of(body), body, OCI_MANIFEST)
    assert response.status == 201, await response.text()
    return digest_of(body), body, response


async def test_referrers(registry: TestClient) -> None:
    subject_digest, subject = await push_image(registry, "team/app", "v1")
    sig, sig_body, response = await push_referrer(
        registry, "team/app", subject, b"sig", SIG_TYPE, annotations={"org.example.signer": "ci"}
    )
    assert response.headers["OCI-Subject"] == subject_digest
    sbom, sbom_body, _ = await push_referrer(registry, "team/app", subject, b"sbom", SBOM_TYPE)

    listed = await registry.get(f"/v2/team/app/referrers/{subject_digest}")
    assert listed.status == 200
    assert listed.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in listed.headers
    index = await listed.json(content_type=None)
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    by_digest = {entry["digest"]: entry for entry in index["manifests"]}
    assert set(by_digest) == {sig, sbom}
    assert by_digest[sig] == {
        "mediaType": OCI_MANIFEST,
        "digest": sig,
        "size": len(sig_body),
        "artifactType": SIG_TYPE,
        "annotations": {"org.example.signer": "ci"},
    }
    assert by_digest[sbom]["artifactType"] == SBOM_TYPE
    assert by_digest[sbom]["size"] == len(sbom_body)

    filtered = await registry.get(f"/v2/team/app/referrers/{subject_digest}", params={"artifactType": SIG_TYPE})
    assert filtered.status == 200
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in (await filtered.json(content_type=None))["manifests"]] == [sig]
    nothing = await registry.get(f"/v2/team/app/referrers/{subject_digest}", params={"artifactType": "x/none"})
    assert (await nothing.json(content_type=None))["manifests"] == []
    assert nothing.headers["OCI-Filters-Applied"] == "artifactType"


async def test_referrer_without_artifact_type_is_listed_under_its_config_type(registry: TestClient) -> None:
    subject_digest, subject = await push_image(registry, "team/app", "v1")
    digest, _, _ = await push_referrer(registry, "team/app", subject, b"plain", None)
    index = await (await registry.get(f"/v2/team/app/referrers/{subject_digest}")).json(content_type=None)
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(digest, OCI_EMPTY)]


async def test_referrer_pushed_before_its_subject(registry: TestClient) -> None:
    future_subject = image_manifest(b"{}", [b"not yet"])
    digest, _, response = await push_referrer(registry, "team/app", future_subject, b"early sig", SIG_TYPE)
    assert response.headers["OCI-Subject"] == digest_of(future_subject)
    index = await (await registry.get(f"/v2/team/app/referrers/{digest_of(future_subject)}")).json(content_type=None)
    assert [m["digest"] for m in index["manifests"]] == [digest]


async def test_deleted_referrer_is_no_longer_listed(registry: TestClient) -> None:
    subject_digest, subject = await push_image(registry, "team/app", "v1")
    digest, _, _ = await push_referrer(registry, "team/app", subject, b"sig", SIG_TYPE)
    assert (await registry.delete(f"/v2/team/app/manifests/{digest}")).status == 202
    index = await (await registry.get(f"/v2/team/app/referrers/{subject_digest}")).json(content_type=None)
    assert index["manifests"] == []


async def test_referrers_are_per_repository(registry: TestClient) -> None:
    subject_digest, subject = await push_image(registry, "team/app", "v1")
    await push_referrer(registry, "team/app", subject, b"sig", SIG_TYPE)
    index = await (await registry.get(f"/v2/team/other/referrers/{subject_digest}")).json(content_type=None)
    assert index["manifests"] == []


async def test_referrers_of_unknown_subject_and_bad_digest(registry: TestClient) -> None:
    response = await registry.get(f"/v2/team/app/referrers/{MISSING}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert await response.json(content_type=None) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    await expect_error(await registry.get("/v2/team/app/referrers/sha256:nope"), 400, "DIGEST_INVALID")
    await expect_error(await registry.get("/v2/team/app/referrers/latest"), 400, "DIGEST_INVALID")


# -- every response ---------------------------------------------------------------------------------
async def test_every_response_carries_the_api_version(registry: TestClient) -> None:
    digest, _ = await push_image(registry, "team/app", "v1")
    layer = digest_of(b"layer one")
    location = await start(registry)
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v2/", {}),
        ("GET", "/v2/_catalog", {}),
        ("GET", "/v2/_catalog?n=x", {}),
        ("GET", "/v2/team/app/tags/list", {}),
        ("GET", "/v2/nope/tags/list", {}),
        ("GET", "/v2/team/app/manifests/v1", {}),
        ("HEAD", "/v2/team/app/manifests/v1", {}),
        ("GET", "/v2/team/app/manifests/nope", {}),
        ("HEAD", "/v2/team/app/manifests/nope", {}),
        ("PUT", "/v2/team/app/manifests/bad", {"data": b"{"}),
        ("GET", f"/v2/team/app/blobs/{layer}", {}),
        ("HEAD", f"/v2/team/app/blobs/{layer}", {}),
        ("GET", f"/v2/team/app/blobs/{layer}", {"headers": {"Range": "bytes=0-1"}}),
        ("GET", f"/v2/team/app/blobs/{layer}", {"headers": {"Range": "bytes=999-"}}),
        ("GET", f"/v2/team/app/blobs/{MISSING}", {}),
        ("GET", "/v2/team/app/blobs/sha256:x", {}),
        ("GET", location, {}),
        ("PATCH", location, {"data": b"x", "headers": {"Content-Range": "5-5"}}),
        ("GET", f"/v2/team/app/referrers/{digest}", {}),
        ("GET", "/v2/Bad/tags/list", {}),
        ("GET", "/v2/team/app/whatever", {}),
        ("DELETE", "/v2/team/app/tags/list", {}),
        ("GET", "/nowhere", {}),
    ]
    for method, path, kwargs in requests:
        response = await registry.request(method, path, **kwargs)
        body = await response.read()
        assert response.status < 500, (method, path, response.status)
        assert response.headers.get(API_VERSION[0]) == API_VERSION[1], (method, path)
        if response.status >= 400 and method != "HEAD" and response.status != 416:
            assert "errors" in json.loads(body), (method, path, body)


# -- large manifests never hold other clients -------------------------------------------------------------
@pytest.mark.slow
async def test_large_manifest_pushes_do_not_stall_other_clients(
    make_registry: ClientFactory,
) -> None:
    """Eight 25,000-layer manifests (about 4 MB each) pushed at once: validating them on the event loop, as
    the first design did, held `GET /v2/` behind the parses back to back (1.2-1.8 s here, where one parse
    takes 0.15-0.25 s). It must answer as usual meanwhile (0.05-0.18 s here): the bound is four parses,
    measured right now so that it scales with the machine and its load, and at least 0.5 s. With
    validation moved back onto the loop this fails in most runs, not all: a GET can slip in between two
    parses. (Its first floors, 1.5 s and 2.5 s on S3, were above what that regression costs on this
    machine.)

    One more burst is allowed when the first had a slow GET: twice in full test runs on a quiet machine the
    whole process stood still for 2-5 s once, which never happened with the test alone. A GET that takes
    over a second dumps every thread's stack to stderr, so such a stall says where it was."""
    import asyncio
    import faulthandler
    import sys
    import time

    from mirror.oci.manifest import parse_manifest

    client = await make_registry(limits={"manifest_bytes": "8MiB"})
    config, layer = b'{"architecture":"amd64","os":"linux"}', b"one layer, used many times"
    await push_blob(client, "team/big", config)
    await push_blob(client, "team/big", layer)
    body = image_manifest(config, [layer] * 25_000)
    assert len(body) > 3_500_000
    started = time.perf_counter()
    parse_manifest(body, OCI_MANIFEST)
    parse_seconds = time.perf_counter() - started
    bound = max(0.5, 4 * parse_seconds)

    async def push(tag: str) -> int:
        response = await put_manifest(client, "team/big", tag, body, OCI_MANIFEST)
        return response.status

    async def burst(name: str) -> float:
        """The slowest GET /v2/ while eight big manifests are pushed."""
        pushes = [asyncio.create_task(push(f"{name}{i}")) for i in range(8)]
        worst = 0.0
        while not all(task.done() for task in pushes):
            started = time.perf_counter()
            faulthandler.dump_traceback_later(1.0, file=sys.stderr)
            response = await client.get("/v2/")
            faulthandler.cancel_dump_traceback_later()
            assert response.status == 200
            worst = max(worst, time.perf_counter() - started)
            await asyncio.sleep(0.01)
        assert [task.result() for task in pushes] == [201] * 8
        return worst

    worst = await burst("v")
    if worst >= bound:
        print(f"GET /v2/ waited {worst:.2f} s (bound {bound:.2f} s): one more burst", file=sys.stderr)
        worst = await burst("w")
    assert worst < bound, f"GET /v2/ waited {worst:.2f} s behind manifest validation (bound {bound:.2f} s)"


# -- abandoned and oversized uploads ---------------------------------------------------------------------
async def test_abandoned_uploads_expire_while_the_server_runs(
    make_registry: ClientFactory, tmp_path: Path, storage_kind: str
) -> None:
    import asyncio

    from tests.proxy_helpers import metric_value, metrics_text

    client = await make_registry(uploads={"expire": "1s"})
    abandoned = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await client.patch(abandoned, data=b"x" * 50_000)).status == 202
    active = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    sessions = tmp_path / "data" / "uploads"
    on_disk = storage_kind == "fs"  # on S3 the sessions are objects in the bucket
    assert not on_disk or len(list(sessions.iterdir())) == 2
    received = b""
    for _ in range(12):  # 2.4 s: the active session keeps receiving bytes, the other gets nothing
        await asyncio.sleep(0.2)
        chunk = b"y" * 1000
        response = await client.patch(active, data=chunk)
        assert response.status == 202, await response.text()
        received += chunk
    await expect_error(await client.get(abandoned), 404, "BLOB_UPLOAD_UNKNOWN")
    if on_disk:
        assert [p.name for p in sessions.iterdir()] == [active.rsplit("/", 1)[1]]  # files freed, the other kept
    text = await metrics_text(client)
    assert metric_value(text, "mirror_uploads_expired_total") == 1
    assert metric_value(text, "mirror_uploads_open_bytes") == len(received)
    response = await client.put(active, params={"digest": digest_of(received)})
    assert response.status == 201, await response.text()
    assert metric_value(await metrics_text(client), "mirror_uploads_open_bytes") == 0


async def test_open_uploads_have_a_byte_bound_of_their_own(make_registry: ClientFactory, tmp_path: Path) -> None:
    from tests.proxy_helpers import metric_value, metrics_text

    client = await make_registry(uploads={"max_bytes": "1MiB"})
    first_bytes, second_bytes = b"a" * 700_000, b"b" * 500_000
    first = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await client.patch(first, data=first_bytes, headers={"Content-Range": "0-699999"})).status == 202
    second = (await client.post("/v2/team/app/blobs/uploads/")).headers["Location"]

    # Together they would pass the bound: refused for now (503, retry later), and refused whole.
    response = await client.patch(second, data=second_bytes)
    await expect_error(response, 503, "UNAVAILABLE")
    assert int(response.headers["Retry-After"]) > 0
    assert (await client.get(second)).headers["Range"] == "0-0"

    # One upload larger than the whole bound can never fit: 413, and no session is left of it.
    huge = b"c" * (2 << 20)
    before = await stored_bytes(client, sessions=True)
    response = await client.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(huge)}, data=huge)
    await expect_error(response, 413, "BLOB_UPLOAD_INVALID")
    assert await stored_bytes(client, sessions=True) == before
    assert metric_value(await metrics_text(client), "mirror_uploads_open_bytes") == len(first_bytes)

    # Once the first finishes, the room is back.
    assert (await client.put(first, params={"digest": digest_of(first_bytes)})).status == 201
    assert (await client.patch(second, data=second_bytes)).status == 202
    response = await client.put(second, params={"digest": digest_of(second_bytes)})
    assert response.status == 201, await response.text()
    assert await (await client.get(f"/v2/team/app/blobs/{digest_of(second_bytes)}")).read() == second_bytes
