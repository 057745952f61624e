"""Storage behaviour a user notices: uploads survive restarts, concurrent pushes stay correct, nothing
half-verified is ever served, and start-up cleans what an interrupted run left behind."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.registry_helpers import ClientFactory, digest_of, files_under

MIB = 1024 * 1024


def blob_files(data_dir: Path) -> set[str]:
    return files_under(data_dir / "blobs")


# -- resumable uploads --------------------------------------------------------------------------------
async def test_upload_resumes_after_a_restart(make_registry: ClientFactory, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 17)
    half = len(data) // 2
    first = await make_registry()
    location = (await first.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    response = await first.patch(location, data=data[:half], headers={"Content-Range": f"0-{half - 1}"})
    assert response.status == 202
    await first.close()  # the process goes away: in-memory hash state is lost

    second = await make_registry()
    status = await second.get(location)
    assert status.status == 204
    assert status.headers["Range"] == f"0-{half - 1}"
    response = await second.patch(location, data=data[half:], headers={"Content-Range": f"{half}-{len(data) - 1}"})
    assert response.status == 202
    assert response.headers["Range"] == f"0-{len(data) - 1}"
    done = await second.put(location, params={"digest": digest_of(data)})
    assert done.status == 201, await done.text()
    got = await second.get(f"/v2/team/app/blobs/{digest_of(data)}")
    assert await got.read() == data


async def test_upload_resumed_after_a_restart_can_finish_as_sha512(make_registry: ClientFactory) -> None:
    data = b"resumed and finished as sha512 " * 1000
    first = await make_registry()
    location = (await first.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    assert (await first.patch(location, data=data[:100])).status == 202
    await first.close()
    second = await make_registry()
    assert (await second.patch(location, data=data[100:])).status == 202
    digest = digest_of(data, "sha512")
    assert (await second.put(location, params={"digest": digest})).status == 201
    assert await (await second.get(f"/v2/team/app/blobs/{digest}")).read() == data


async def test_restart_keeps_committed_content(make_registry: ClientFactory) -> None:
    first = await make_registry()
    data = b"persisted"
    await first.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(data)}, data=data)
    await first.close()
    second = await make_registry()
    assert await (await second.get(f"/v2/team/app/blobs/{digest_of(data)}")).read() == data
    assert (await (await second.get("/v2/_catalog")).json())["repositories"] == ["team/app"]


# -- concurrency --------------------------------------------------------------------------------------
async def test_concurrent_pushes_of_the_same_blob(registry: TestClient, tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 3)
    digest = digest_of(data)

    async def monolithic(i: int) -> int:
        response = await registry.post(f"/v2/team/app{i % 3}/blobs/uploads/", params={"digest": digest}, data=data)
        return response.status

    async def chunked(i: int) -> int:
        location = (await registry.post(f"/v2/team/app{i % 3}/blobs/uploads/")).headers["Location"]
        response = await registry.patch(location, data=data)
        response = await registry.put(response.headers["Location"], params={"digest": digest})
        return response.status

    statuses = await asyncio.gather(*(monolithic(i) if i % 2 else chunked(i) for i in range(10)))
    assert statuses == [201] * 10
    assert blob_files(tmp_path / "data") == {f"sha256/{digest[7:9]}/{digest[7:]}"}
    assert files_under(tmp_path / "data" / "uploads") == set()
    for i in range(3):
        got = await registry.get(f"/v2/team/app{i}/blobs/{digest}")
        assert await got.read() == data


async def slow_body(byte: bytes, chunks: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        yield byte * size
        await asyncio.sleep(0.001)


async def test_concurrent_patches_on_one_upload_serialise(registry: TestClient, tmp_path: Path) -> None:
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    upload_id = location.rsplit("/", 1)[1]
    chunks, size = 40, 16 * 1024
    part = chunks * size
    first, second = await asyncio.gather(
        registry.patch(location, data=slow_body(b"a", chunks, size)),
        registry.patch(location, data=slow_body(b"b", chunks, size)),
    )
    assert (first.status, second.status) == (202, 202)
    assert sorted([first.headers["Range"], second.headers["Range"]]) == [f"0-{2 * part - 1}", f"0-{part - 1}"]
    received = (tmp_path / "data" / "uploads" / upload_id / "data").read_bytes()
    expected = {b"a" * part + b"b" * part, b"b" * part + b"a" * part}
    assert received in expected  # one whole chunk after the other, never interleaved or overwritten
    done = await registry.put(location, params={"digest": digest_of(received)})
    assert done.status == 201


async def test_concurrent_patches_claiming_the_same_offset(registry: TestClient) -> None:
    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    responses = await asyncio.gather(
        *(registry.patch(location, data=bytes([65 + i]) * 1000, headers={"Content-Range": "0-999"}) for i in range(5))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [202, 416, 416, 416, 416]
    status = await registry.get(location)
    assert status.headers["Range"] == "0-999"


# -- atomicity ------------------------------------------------------------------------------------------
async def test_no_blob_file_before_the_digest_is_verified(registry: TestClient, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    paused = asyncio.Event()
    resume = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * MIB
        paused.set()
        await resume.wait()
        yield b"y" * MIB

    location = (await registry.post("/v2/team/app/blobs/uploads/")).headers["Location"]
    claimed = digest_of(b"x" * MIB + b"y" * MIB)
    put = asyncio.create_task(registry.put(location, params={"digest": claimed}, data=body()))
    await asyncio.wait_for(paused.wait(), timeout=10)
    await asyncio.sleep(0.2)  # let the server write what it has received
    assert blob_files(data_dir) == set()  # half the bytes are in the upload session, none in blobs/
    resume.set()
    response = await put
    assert response.status == 201
    assert blob_files(data_dir) == {f"sha256/{claimed[7:9]}/{claimed[7:]}"}


async def test_failed_put_leaves_no_blob_and_no_temp(registry: TestClient, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    paused = asyncio.Event()
    resume = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"z" * MIB
        paused.set()
        await resume.wait()
        yield b"tampered"

    claimed = digest_of(b"z" * MIB + b"original")
    post = asyncio.create_task(
        registry.post("/v2/team/app/blobs/uploads/", params={"digest": claimed}, data=body())
    )
    await asyncio.wait_for(paused.wait(), timeout=10)
    await asyncio.sleep(0.2)
    assert blob_files(data_dir) == set()
    resume.set()
    response = await post
    assert response.status == 400
    assert blob_files(data_dir) == set()
    assert files_under(data_dir / "tmp") == set()
    assert files_under(data_dir / "uploads") == set()
    assert (await registry.get(f"/v2/team/app/blobs/{claimed}")).status == 404


async def test_interrupted_monolithic_push_leaves_no_session(registry: TestClient, tmp_path: Path) -> None:
    """The client of a single POST never learns its session id, so a hang-up must not strand its bytes."""
    data_dir = tmp_path / "data"
    digest = digest_of(b"q" * 100_000)
    port = registry.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /v2/team/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: 100000\r\n\r\n".encode()
        + b"q" * 40_000
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    assert files_under(data_dir / "uploads") != set()  # the bytes so far are in a session
    writer.close()
    for _ in range(100):
        if files_under(data_dir / "uploads") == set():
            break
        await asyncio.sleep(0.02)
    assert files_under(data_dir / "uploads") == set()
    assert blob_files(data_dir) == set()
    assert (await registry.get("/v2/")).status == 200


# -- start-up recovery ------------------------------------------------------------------------------------
def make_upload(data_dir: Path, upload_id: str, repository: str, content: bytes, age: float) -> Path:
    directory = data_dir / "uploads" / upload_id
    directory.mkdir(parents=True)
    (directory / "data").write_bytes(content)
    (directory / "info.json").write_text(json.dumps({"repository": repository, "started": time.time() - age}))
    stamp = time.time() - age
    for path in (directory / "data", directory / "info.json", directory):
        os.utime(path, (stamp, stamp))
    return directory


async def test_startup_removes_stale_temps_and_uploads(make_registry: ClientFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "tmp").mkdir(parents=True)
    old_temp = data_dir / "tmp" / "0123.part"
    new_temp = data_dir / "tmp" / "4567.part"
    old_temp.write_bytes(b"interrupted long ago")
    new_temp.write_bytes(b"interrupted just now")
    two_hours_ago = time.time() - 7200
    os.utime(old_temp, (two_hours_ago, two_hours_ago))
    old_upload = make_upload(data_dir, "a" * 32, "team/app", b"stale", age=7200)
    new_upload = make_upload(data_dir, "b" * 32, "team/app", b"fresh-", age=60)

    client = await make_registry(storage={"temp_grace": "1h"}, uploads={"expire": "1h"})
    assert not old_temp.exists()
    assert new_temp.exists()
    assert not old_upload.exists()
    assert new_upload.exists()
    assert (await client.get(f"/v2/team/app/blobs/uploads/{'a' * 32}")).status == 404
    # The recent session is still a working upload.
    location = f"/v2/team/app/blobs/uploads/{'b' * 32}"
    status = await client.get(location)
    assert status.status == 204 and status.headers["Range"] == "0-5"
    assert (await client.patch(location, data=b"rest", headers={"Content-Range": "6-9"})).status == 202
    assert (await client.put(location, params={"digest": digest_of(b"fresh-rest")})).status == 201
    assert await (await client.get(f"/v2/team/app/blobs/{digest_of(b'fresh-rest')}")).read() == b"fresh-rest"


async def test_startup_grace_is_configurable(make_registry: ClientFactory, tmp_path: Path) -> None:
    # Push sessions follow uploads.expire at start-up as at run time; storage.temp_grace (for fills'
    # temp files) does not end them.
    data_dir = tmp_path / "data"
    upload = make_upload(data_dir, "c" * 32, "team/app", b"ten minutes old", age=600)
    await make_registry(storage={"temp_grace": "5m"}, uploads={"expire": "1h"})
    assert upload.exists()
    data_dir2 = tmp_path / "data2"
    upload2 = make_upload(data_dir2, "c" * 32, "team/app", b"ten minutes old", age=600)
    await make_registry(storage={"temp_grace": "1h", "path": str(data_dir2)}, uploads={"expire": "5m"})
    assert not upload2.exists()
