"""Every row of the bad-input table: the answer it gets, no 500, no traceback, nothing on disk.

Path tricks are sent over a raw socket as well, so the client library cannot normalise `..` or `//` away
before the server sees them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.registry_helpers import (
    API_VERSION,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    ClientFactory,
    digest_of,
    error_codes,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    stored_bytes,
)

ZERO = "sha256:" + "0" * 64
LONG_NAME = "a" * 300
TRACEBACK_MARKERS = ("Traceback", 'File "', "Error:", "/mirror/")


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


async def raw_request(
    client: TestClient, method: str, target: str, body: bytes = b"", headers: str = ""
) -> RawResponse:
    """Send `target` byte for byte; return the parsed answer."""
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}"
        if (body or method in ("PUT", "POST", "PATCH")) and "content-length:" not in headers.lower():
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        lines = head_bytes.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(lines[0].split(" ")[1])
        parsed = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            parsed[key.strip().lower()] = value.strip()
        # Read exactly the body: the server may linger on a request body it chose not to read.
        if method == "HEAD" or status in (204, 304):
            payload = b""
        elif "content-length" in parsed:
            payload = await asyncio.wait_for(reader.readexactly(int(parsed["content-length"])), timeout=10)
        else:
            payload = await asyncio.wait_for(reader.read(), timeout=10)
            if parsed.get("transfer-encoding") == "chunked":
                payload = _dechunk(payload)
    finally:
        writer.close()
    return RawResponse(status, parsed, payload)


def _dechunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        payload = rest[size + 2 :]
    return out


def assert_clean(body: bytes) -> None:
    text = body.decode(errors="replace")
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, text


def assert_registry_error(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, (response.status, response.body)
    assert response.headers.get(API_VERSION[0].lower()) == API_VERSION[1]
    assert_clean(response.body)
    if response.body:
        errors = response.json()["errors"]
        assert code in [e["code"] for e in errors], errors
        assert all(isinstance(e["message"], str) for e in errors)


def snapshot(root: Path) -> set[str]:
    """Every file and directory below `root` (the test's tmp dir: the data dir and whatever is beside it)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
async def seeded(registry: TestClient) -> TestClient:
    """A registry with one image, so bad requests meet real data."""
    await push_image(registry, "team/app", "v1")
    return registry


# -- bad names --------------------------------------------------------------------------------------
BAD_NAMES = [
    "team/%2e%2e/x",
    "%2e%2e",
    "%2E%2E/%2e%2e/etc",
    "team/../x",
    "../../etc/passwd",
    "..",
    "team/./x",
    "team//x",
    "/team",
    "team/",
    "Team/App",
    "team/APP",
    LONG_NAME,
    "/".join(["ab"] * 100),
    "team%2Fapp",
    "team/app%00",
    "team\\app",
    "team/.hidden",
]

ENDPOINTS = [
    ("GET", "/v2/{name}/tags/list", b""),
    ("GET", "/v2/{name}/manifests/latest", b""),
    ("HEAD", "/v2/{name}/manifests/latest", b""),
    ("PUT", "/v2/{name}/manifests/latest", image_manifest(b"{}", [])),
    ("DELETE", "/v2/{name}/manifests/latest", b""),
    ("GET", "/v2/{name}/blobs/" + ZERO, b""),
    ("DELETE", "/v2/{name}/blobs/" + ZERO, b""),
    ("POST", "/v2/{name}/blobs/uploads/", b""),
    ("POST", "/v2/{name}/blobs/uploads/?digest=" + digest_of(b"x"), b"x"),
    ("POST", "/v2/{name}/blobs/uploads/?mount=" + ZERO + "&from=team/app", b""),
    ("PATCH", "/v2/{name}/blobs/uploads/" + "0" * 32, b"x"),
    ("GET", "/v2/{name}/referrers/" + ZERO, b""),
]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_never_touch_the_disk(seeded: TestClient, tmp_path: Path, name: str) -> None:
    before = snapshot(tmp_path)
    for method, template, body in ENDPOINTS:
        target = template.format(name=name)
        response = await raw_request(seeded, method, target, body)
        assert_registry_error(response, 400, "NAME_INVALID")
    assert snapshot(tmp_path) == before
    # Nothing named after the bad input anywhere, inside the data dir or beside it.
    for path in tmp_path.rglob("*"):
        assert "%" not in path.name and ".." not in path.name and path.name.lower() != "passwd"
    assert not (tmp_path / "etc").exists()


async def test_bad_name_through_the_client_library_too(seeded: TestClient, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    for name in ("Team/App", LONG_NAME, "team/a__-b", "team/-x"):
        response = await seeded.get(f"/v2/{name}/tags/list")
        assert response.status == 400
        assert await error_codes(response) == ["NAME_INVALID"]
        response = await seeded.post(f"/v2/{name}/blobs/uploads/")
        assert response.status == 400
    assert snapshot(tmp_path) == before


async def test_mount_from_a_bad_name(seeded: TestClient, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    layer = digest_of(b"layer one")
    for source in ("../team/app", "team/%2e%2e/app", "TEAM/APP", "team//app"):
        response = await raw_request(seeded, "POST", f"/v2/team/other/blobs/uploads/?mount={layer}&from={source}")
        assert_registry_error(response, 400, "NAME_INVALID")
    assert snapshot(tmp_path) == before
    response = await seeded.get(f"/v2/team/other/blobs/{layer}")
    assert response.status == 404


# -- bad digests --------------------------------------------------------------------------------------
BAD_DIGESTS = [
    "sha256:xyz",
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "A" * 64,
    "md5:" + "0" * 32,
    "sha1:" + "0" * 40,
    "sha256:..%2Fx",
    "sha256:../x",
    "sha256:%2e%2e",
    "sha512:" + "0" * 64,
    "SHA256:" + "0" * 64,
    "sha256",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
async def test_bad_digests(seeded: TestClient, tmp_path: Path, digest: str) -> None:
    before = snapshot(tmp_path)
    targets = [
        ("GET", f"/v2/team/app/blobs/{digest}"),
        ("HEAD", f"/v2/team/app/blobs/{digest}"),
        ("DELETE", f"/v2/team/app/blobs/{digest}"),
        ("GET", f"/v2/team/app/manifests/{digest}"),
        ("DELETE", f"/v2/team/app/manifests/{digest}"),
        ("GET", f"/v2/team/app/referrers/{digest}"),
        ("POST", f"/v2/team/app/blobs/uploads/?digest={digest}"),
        ("POST", f"/v2/team/app/blobs/uploads/?mount={digest}&from=team/app"),
    ]
    for method, target in targets:
        if "/manifests/" in target and ":" not in digest:
            continue  # without a colon it is a (valid) tag, not a digest
        response = await raw_request(seeded, method, target)
        if "/" in digest and "?" not in target:
            # A literal `/` (`sha256:../x`) splits the path into more segments than any endpoint has: no
            # endpoint, no disk access. Encoded (`..%2Fx`) or in a query parameter it is DIGEST_INVALID.
            assert_registry_error(response, 404, "NOT_FOUND")
            continue
        assert_registry_error(response, 400, "DIGEST_INVALID")
    # Finishing an upload with a bad digest.
    location = (await seeded.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    response = await raw_request(seeded, "PUT", f"{location}?digest={digest}", b"data")
    assert_registry_error(response, 400, "DIGEST_INVALID")
    after = snapshot(tmp_path)
    assert {p for p in after - before if not p.startswith("data/uploads")} == set()


# -- upload ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("upload_id", ["..", "%2e%2e", ".", "..%2f..%2fblobs", "%2e%2e%2f%2e%2e", "0" * 32, "x" * 5000])
async def test_upload_ids_over_a_raw_socket(seeded: TestClient, tmp_path: Path, upload_id: str) -> None:
    before = snapshot(tmp_path)
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        target = f"/v2/team/app/blobs/uploads/{upload_id}"
        if method == "PUT":
            target += "?digest=" + digest_of(b"x")
        response = await raw_request(seeded, method, target, b"x" if method in ("PATCH", "PUT") else b"")
        assert_registry_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
    assert snapshot(tmp_path) == before


# -- finishing an upload with the wrong digest or length -------------------------------------------------
async def test_wrong_digest_or_length_commits_nothing(registry: TestClient, tmp_path: Path) -> None:
    data = b"0123456789"
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await registry.patch(location, data=data[:5], headers={"Content-Range": "0-4"})).status == 202

    # Content-Range says 5 bytes, Content-Length says 3.
    response = await raw_request(
        registry, "PATCH", location, b"567", headers="Content-Range: 5-9\r\n"
    )
    assert_registry_error(response, 400, "SIZE_INVALID")

    # Sent without a Content-Length: the length only shows once the bytes arrived, and the chunk is refused whole.
    async def short_body() -> AsyncIterator[bytes]:
        yield b"56"

    response = await registry.put(
        location, params={"digest": digest_of(data)}, data=short_body(), headers={"Content-Range": "5-9"}
    )
    assert response.status == 400
    assert await error_codes(response) == ["SIZE_INVALID"]
    status = await registry.get(location)
    assert status.status == 204
    assert status.headers["Range"] == "0-4"  # the refused bytes are not part of the upload
    assert (await registry.get(f"/v2/team/app/blobs/{digest_of(data)}")).status == 404
    assert await stored_bytes(registry) == set()

    # The session is still good for the right bytes.
    response = await registry.put(
        location, params={"digest": digest_of(data)}, data=data[5:], headers={"Content-Range": "5-9"}
    )
    assert response.status == 201
    assert await (await registry.get(f"/v2/team/app/blobs/{digest_of(data)}")).read() == data


async def test_wrong_digest_on_final_put(registry: TestClient, tmp_path: Path) -> None:
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    response = await registry.put(location, params={"digest": digest_of(b"expected")}, data=b"delivered")
    assert response.status == 400
    assert await error_codes(response) == ["DIGEST_INVALID"]
    assert await stored_bytes(registry, sessions=True) == set()  # the refused session is gone too


# -- PATCH out of order, bad Content-Range ------------------------------------------------------------------
async def test_patch_out_of_order(registry: TestClient) -> None:
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    await registry.patch(location, data=b"abc", headers={"Content-Range": "0-2"})
    for content_range in ("0-2", "1-3", "4-6", "100-102"):
        response = await raw_request(registry, "PATCH", location, b"xyz", headers=f"Content-Range: {content_range}\r\n")
        assert_registry_error(response, 416, "BLOB_UPLOAD_INVALID")
        assert response.headers["range"] == "0-2"


@pytest.mark.parametrize(
    "content_range",
    ["bytes=abc", "5-2", "-1-3", "0--1", "a-b", "0-2/abc", "0-2-4", "", "9" * 4400 + "-0", "0x0-0x2"],
    ids=["word", "backwards", "negative", "negative-end", "letters", "bad-total", "three", "blank", "huge", "hex"],
)
async def test_garbage_content_range(registry: TestClient, content_range: str) -> None:
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    response = await raw_request(registry, "PATCH", location, b"xyz", headers=f"Content-Range: {content_range}\r\n")
    assert response.status < 500
    assert_clean(response.body)
    if content_range:  # an empty header is just "no Content-Range": a streamed chunk
        assert_registry_error(response, 400, "BLOB_UPLOAD_INVALID")
    status = await registry.get(location)
    assert status.headers["Range"] == ("0-2" if not content_range else "0-0")


# -- manifests -------------------------------------------------------------------------------------------
async def test_manifest_rows(make_registry: ClientFactory) -> None:
    client = await make_registry(limits={"manifest_bytes": "4KiB"})
    await push_blob(client, "team/app", b"{}")
    too_big = b'{"schemaVersion":2,"pad":"' + b"x" * 5000 + b'"}'
    response = await put_manifest(client, "team/app", "big", too_big, OCI_MANIFEST)
    assert response.status == 413
    await error_codes(response)
    # A Content-Length that lies about a huge body is refused before reading it.
    response = await raw_request(
        client, "PUT", "/v2/team/app/manifests/big", b"",
        headers=f"Content-Type: {OCI_MANIFEST}\r\nContent-Length: 999999999\r\n",
    )
    assert response.status == 413
    assert_clean(response.body)
    for body, media_type in ((b"{{{", OCI_MANIFEST), (image_manifest(b"{}", []), DOCKER_MANIFEST)):
        response = await put_manifest(client, "team/app", "bad", body, media_type)
        assert response.status == 400
        assert await error_codes(response) == ["MANIFEST_INVALID"]
    response = await put_manifest(client, "team/app", "missing", image_manifest(b"{}", [b"absent"]), OCI_MANIFEST)
    assert response.status == 400
    assert await error_codes(response) == ["MANIFEST_BLOB_UNKNOWN"]
    for garbage_type in ("", ";;;", "x" * 2000, "application/vnd.oci.image.manifest.v1+json; charset=\x7f"):
        response = await raw_request(
            client, "PUT", "/v2/team/app/manifests/odd", b"{}", headers=f"Content-Type: {garbage_type}\r\n"
        )
        assert response.status in (400, 413), response.body
        assert_clean(response.body)


async def test_bad_tags(seeded: TestClient, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    body = image_manifest(b"{}", [])
    for tag in ("..", ".hidden", "-x", "a" * 129, "%2e%2e", "a%2Fb"):
        response = await raw_request(
            seeded, "PUT", f"/v2/team/app/manifests/{tag}", body, headers=f"Content-Type: {OCI_MANIFEST}\r\n"
        )
        assert_registry_error(response, 400, "TAG_INVALID")
        response = await raw_request(seeded, "GET", f"/v2/team/app/manifests/{tag}")
        assert_registry_error(response, 400, "TAG_INVALID")
    assert snapshot(tmp_path) == before


# -- Range, pagination, disallowed writes -----------------------------------------------------------------
UNKNOWN_RANGE_UNITS = ("items=0-1", "pages=1-2", "rows=0-")


def refused_byte_ranges(size: int) -> tuple[str, ...]:
    return ("bytes=5-2", "bytes=0-1,5-6", f"bytes={size}-", "bytes=-0", "bytes=x-y", "bytes=" + "9" * 5000 + "-")


def assert_range_refused(response: RawResponse, size: int) -> None:
    assert_registry_error(response, 416, "RANGE_INVALID")
    assert response.body, "a 416 needs the registry's JSON error body"
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["content-range"] == f"bytes */{size}"


async def test_a_range_in_an_unknown_unit_is_ignored_and_a_bad_byte_range_is_a_registry_416(seeded: TestClient) -> None:
    layer = b"layer one"
    target = f"/v2/team/app/blobs/{digest_of(layer)}"
    for value in UNKNOWN_RANGE_UNITS:  # RFC 9110 section 14.2: ignored, the whole blob
        response = await raw_request(seeded, "GET", target, headers=f"Range: {value}\r\n")
        assert (response.status, response.body) == (200, layer), value
    for value in refused_byte_ranges(len(layer)):
        assert_range_refused(await raw_request(seeded, "GET", target, headers=f"Range: {value}\r\n"), len(layer))
    response = await raw_request(seeded, "GET", target, headers="Range: Bytes=2-4\r\n")  # units are case-blind
    assert (response.status, response.body, response.headers["content-range"]) == (206, b"yer", "bytes 2-4/9")


async def test_ranges_of_a_blob_still_being_filled_follow_the_same_rules(aiohttp_server, make_registry) -> None:
    from tests.fake_upstream import FakeUpstream, Fault, upstream_config

    fake = FakeUpstream()
    layer = bytes(range(256)) * 4096  # 1 MiB, sent in 64 KiB pieces 50 ms apart: the fill runs ~0.8 s
    digest = fake.add_blob(layer)
    fake.faults[f"/blobs/{digest}"] = Fault("slow", delay=0.05)
    server = await aiohttp_server(fake.app())
    client = await make_registry(
        upstreams=[upstream_config(f"http://{server.host}:{server.port}", library_prefix=True)]
    )
    target = f"/v2/library/app/blobs/{digest}"
    first = await client.get(target)  # starts the fill; its body is streamed while the download runs
    assert first.status == 200
    try:
        for value in refused_byte_ranges(len(layer)):
            assert_range_refused(await raw_request(client, "GET", target, headers=f"Range: {value}\r\n"), len(layer))
        assert fake.requests[("GET", f"/v2/library/app/blobs/{digest}")] == 1, "the fill had ended: not streamed"
        response = await raw_request(client, "GET", target, headers="Range: items=0-1\r\n")
        assert (response.status, len(response.body)) == (200, len(layer))
        assert response.body == layer
        assert await first.read() == layer
    finally:
        first.release()


async def test_bad_and_huge_n(seeded: TestClient) -> None:
    for path in ("/v2/team/app/tags/list", "/v2/_catalog"):
        for n in ("abc", "-1", "1e3", "%00", "%C2%B2"):
            response = await raw_request(seeded, "GET", f"{path}?n={n}")
            assert_registry_error(response, 400, "PAGINATION_NUMBER_INVALID")
        for n in ("99999999999999999999999", "9" * 6000):
            response = await raw_request(seeded, "GET", f"{path}?n={n}")
            assert response.status == 200
            assert_clean(response.body)


async def test_deletes_where_not_allowed(make_registry: ClientFactory) -> None:
    client = await make_registry(storage={"delete": False})
    digest, _ = await push_image(client, "team/app", "v1")
    layer = digest_of(b"layer one")
    for target in ("/v2/team/app/manifests/v1", f"/v2/team/app/manifests/{digest}", f"/v2/team/app/blobs/{layer}"):
        response = await raw_request(client, "DELETE", target)
        assert_registry_error(response, 405, "UNSUPPORTED")


# -- garbage at the HTTP level ------------------------------------------------------------------------------
async def test_http_level_garbage_is_a_4xx_without_a_traceback(seeded: TestClient) -> None:
    requests = [
        b"PUT /v2/team/app/manifests/v2 HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
        b"PATCH /v2/team/app/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header Line\r\nConnection: close\r\n\r\n",
        b"GET \x00\x01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /v2/" + b"a" * 9000 + b"/tags/list HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    port = seeded.server.port
    for request in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        status = int(data.split(b" ", 2)[1])
        assert 400 <= status < 500, data[:200]
        assert_clean(data.partition(b"\r\n\r\n")[2])
    # The server is still fine afterwards.
    assert (await seeded.get("/v2/")).status == 200


# -- clients that leave, requests HTTP cannot parse -----------------------------------------------------------
async def _send_and_hang_up(client: TestClient, request: bytes, *, read_head: bool = False, reset: bool = True) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request)
    await writer.drain()
    if read_head:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    if reset:
        writer.transport.abort()  # a reset, as a killed client leaves it (ConnectionResetError)
    else:
        writer.close()  # a plain close: the server's next writes meet a broken pipe (BrokenPipeError)


async def test_a_client_that_hangs_up_is_counted_as_499_and_logged_quietly(
    registry: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.proxy_helpers import metric_value, metrics_text

    caplog.set_level(logging.INFO)
    big = os.urandom(32 << 20)  # more than the socket buffers hold: sendfile is still writing when the client goes
    await push_blob(registry, "team/app", big)
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    await _send_and_hang_up(  # a manifest PUT whose body stops coming
        registry,
        b"PUT /v2/team/app/manifests/v9 HTTP/1.1\r\nHost: x\r\nContent-Type: " + OCI_MANIFEST.encode()
        + b"\r\nContent-Length: 1000\r\n\r\n{\"schemaVersion\"",
    )
    patch = f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 1000
    await _send_and_hang_up(registry, patch)  # a chunk cut short
    get = f"GET /v2/team/app/blobs/{digest_of(big)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await _send_and_hang_up(registry, get, read_head=True)  # a blob abandoned mid-body
    await _send_and_hang_up(registry, get, read_head=True, reset=False)  # ... and closed, not reset

    def counted(endpoint: str, method: str) -> float:
        return metric_value(text, "mirror_http_requests_total", endpoint=endpoint, method=method, status="499")

    text = ""
    for _ in range(500):
        text = await metrics_text(registry)
        if counted("manifest", "PUT") and counted("upload", "PATCH") and counted("blob", "GET") == 2:
            break
        await asyncio.sleep(0.01)
    assert (counted("manifest", "PUT"), counted("upload", "PATCH"), counted("blob", "GET")) == (1, 1, 2), text
    assert metric_value(text, "mirror_http_requests_total", status="500") == 0, text
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
    # The server is fine, and the session kept what arrived before the hang-up (the client resumes there).
    status = await registry.get(location)
    assert status.status == 204


MALFORMED_REQUESTS = [
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\nConnection: close\r\n\r\n",
    b"GET x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"PUT * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
]


async def test_malformed_requests_log_one_rate_limited_warning_line_not_a_traceback(
    registry: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.proxy_helpers import metric_value, metrics_text

    caplog.set_level(logging.INFO)
    sent = 0
    for _ in range(10):
        for request in MALFORMED_REQUESTS:
            reader, writer = await asyncio.open_connection("127.0.0.1", registry.server.port)
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), timeout=10)
            writer.close()
            assert data.startswith(b"HTTP/1.") and data.split(b" ", 2)[1] == b"400", data[:200]
            sent += 1
    records = [r for r in caplog.records if r.name.startswith(("aiohttp.server", "mirror"))]
    assert [r for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 5, warnings  # one line each, but rate-limited
    assert all("\n" not in line and "malformed request" in line for line in warnings), warnings
    assert metric_value(await metrics_text(registry), "mirror_http_malformed_requests_total") == sent
    assert (await registry.get("/v2/")).status == 200


def test_requests_http_cannot_parse_get_the_registry_error_shape_from_mirror_serve(
    mirror_factory: Any, tmp_path: Path
) -> None:
    """`PUT *`, a NUL in a header, a bad request line: aiohttp answers these before any application code
    runs; `mirror serve` still answers them as a registry (JSON error body, API version header), and the
    server goes on serving."""
    import socket

    mirror = mirror_factory({"storage": {"path": str(tmp_path / "data")}})
    for request in MALFORMED_REQUESTS:
        with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        response = RawResponse(int(lines[0].split(" ")[1]), headers, body)
        assert_registry_error(response, 400, "UNSUPPORTED")
        assert headers["content-type"].startswith("application/json"), (request, data)
        assert "malformed HTTP request" in response.json()["errors"][0]["message"]
    log = mirror.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
