"""A small real filesystem (tmpfs, 32 MiB) that fills up during pulls: clients succeed (eviction makes
room) or get a clean 503, and the store is consistent afterwards: no temp files, every blob hashes to its
name, the index agrees with the disk. A push onto the full disk is a clean 503 and resumes once there is room.

Mounting needs root (CAP_SYS_ADMIN); without it the tests skip, or fail under MIRROR_REQUIRE_REAL_CLIENTS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.state import CACHE
from tests.cache_helpers import MiB, add_to_upstream, blob_files, check_store, make_image, pull, push
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of, upstream_config
from tests.proxy_helpers import fills_settled, metric_value, metrics_text
from tests.support.procs import REQUIRE_ENV, real_clients_required

FS_SIZE = 32 * MiB
pytestmark = pytest.mark.needs_tools("mount", "umount")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE // MiB}m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}"
        if real_clients_required():
            pytest.fail(f"{message} and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


async def start(aiohttp_server: Any, make_registry: Any, fake: FakeUpstream, data: Path) -> Any:
    server = await aiohttp_server(fake.app())
    return await make_registry(
        upstreams=[upstream_config(f"http://{server.host}:{server.port}", library_prefix=True, tag_ttl="1h")],
        local={"repositories": ["local/**"]},
        storage={"path": str(data)},  # no max_size: the filesystem is the only bound
    )


async def get_status(client: Any, path: str) -> tuple[int, bytes]:
    async with client.get(path) as response:
        return response.status, await response.read()


async def test_pulls_beyond_the_filesystem_succeed_by_evicting(aiohttp_server, make_registry, small_fs):
    fake = FakeUpstream()
    images = [make_image(f"library/fill{i}", "1", [os.urandom(3 * MiB)]) for i in range(12)]  # 36 MiB > 32
    for image in images:
        add_to_upstream(fake, image)
    data = small_fs / "data"
    client = await start(aiohttp_server, make_registry, fake, data)
    for image in images:
        await pull(client, image)
    assert metric_value(await metrics_text(client), "mirror_evictions_total") > 0
    assert images[0].layer_digests[0] not in blob_files(data)  # the oldest went first
    assert images[-1].layer_digests[0] in blob_files(data)

    # Several at once on a full disk: each client gets its blob or a clean 503, never wrong bytes.
    async def attempt(image: Any) -> int:
        status, body = await get_status(client, f"/v2/{image.repo}/blobs/{image.layer_digests[0]}")
        assert status in (200, 503), status
        if status == 200:
            assert body == image.layers[0]
        else:
            assert b"UNAVAILABLE" in body
        return status

    statuses = await asyncio.gather(*(attempt(image) for image in images[:6]))
    assert 200 in statuses
    await fills_settled(client)
    await client.server.app[CACHE].flush_accesses()
    check_store(data)
    for image in images[:6]:  # and a client that retries gets it
        await pull(client, image)
    check_store(data)


async def test_a_disk_full_of_pushed_content_answers_503_cleanly(aiohttp_server, make_registry, small_fs):
    fake = FakeUpstream()
    wanted = make_image("library/big", "1", [os.urandom(6 * MiB)])
    add_to_upstream(fake, wanted)
    data = small_fs / "data"
    client = await start(aiohttp_server, make_registry, fake, data)
    # Pushed content is never evicted: fill the disk with it until a fill can no longer fit.
    n = 0
    while free_bytes(data) > 12 * MiB:
        await push(client, make_image(f"local/filler{n}", "1", [os.urandom(4 * MiB)]))
        n += 1
    status, body = await get_status(client, "/v2/library/big/manifests/1")
    assert status == 200
    status, body = await get_status(client, f"/v2/library/big/blobs/{wanted.layer_digests[0]}")
    assert status == 503 and b"UNAVAILABLE" in body, (status, body[:300])
    assert metric_value(await metrics_text(client), "mirror_upstream_errors_total", reason="disk_full") >= 1
    check_store(data)
    # Nothing of the refused fill is left, and the pushed images are intact.
    assert wanted.layer_digests[0] not in blob_files(data)
    status, _ = await get_status(client, "/v2/local/filler0/manifests/1")
    assert status == 200


async def test_the_disk_filling_up_during_a_download_fails_it_cleanly(aiohttp_server, make_registry, small_fs):
    """Someone else fills the filesystem while a fill is writing: the fill fails (the client is cut off and
    would retry), nothing partial is kept, and once there is room again the blob pulls whole."""
    fake = FakeUpstream(blob_delay=0.01)
    big = os.urandom(8 * MiB)
    image = make_image("library/slow", "1", [big])
    add_to_upstream(fake, image)
    data = small_fs / "data"
    client = await start(aiohttp_server, make_registry, fake, data)
    status, _ = await get_status(client, "/v2/library/slow/manifests/1")
    assert status == 200
    status, _ = await get_status(client, f"/v2/library/slow/blobs/{digest_of(image.config)}")
    assert status == 200

    response = await client.get(f"/v2/library/slow/blobs/{digest_of(big)}")
    assert response.status == 200  # headers are out: room was there when the fill started
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * max(free_bytes(small_fs) - (256 << 10), 0))  # leave less than the rest needs
    try:
        received = await response.read()
    except aiohttp.ClientError:
        received = None  # cut off: the client retries (with Range) against a mirror that has room again
    finally:
        response.release()
    assert received is None, "the fill should not have been able to finish on a full disk"
    await asyncio.sleep(0.2)
    assert list((data / "tmp").iterdir()) == []  # nothing half-written is left ...
    assert digest_of(big) not in blob_files(data)  # ... or half-committed

    # Completely full now (not a byte left): what is stored is still served, what would need storing is a
    # clean 503.
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    assert free_bytes(small_fs) == 0
    status, body = await get_status(client, "/v2/library/slow/manifests/1")
    assert status == 200 and body == image.manifest
    status, body = await get_status(client, f"/v2/library/slow/blobs/{digest_of(image.config)}")
    assert status == 200 and body == image.config
    other = make_image("library/other", "1", [os.urandom(1000)])
    add_to_upstream(fake, other)
    status, body = await get_status(client, "/v2/library/other/manifests/1")
    assert status == 503 and b"UNAVAILABLE" in body, (status, body[:300])
    status, body = await get_status(client, f"/v2/library/other/blobs/{other.layer_digests[0]}")
    assert status == 503 and b"UNAVAILABLE" in body, (status, body[:300])

    filler.unlink()
    await fills_settled(client)
    await client.server.app[CACHE].maintain()  # index changes that could not be written are written now
    check_store(data)  # the index agrees with the disk (it is opened only now: opening writes to it)
    await pull(client, image)
    await pull(client, other)
    check_store(data)


async def test_a_push_onto_a_full_disk_is_a_clean_503_and_resumes_later(make_registry, small_fs):
    data = small_fs / "data"
    client = await make_registry(storage={"path": str(data)})  # a private registry
    blob = os.urandom(2 * MiB)
    async with client.post("/v2/team/app/blobs/uploads/") as r:
        location = r.headers["Location"]
    async with client.patch(location, data=blob[: 1 * MiB], headers={"Content-Range": f"0-{MiB - 1}"}) as r:
        assert r.status == 202
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * (64 << 10))
    finally:
        os.close(fd)
    async with client.patch(location, data=blob[MiB:]) as r:
        assert r.status == 503 and "UNAVAILABLE" in await r.text()
    filler.unlink()
    async with client.get(location) as r:  # what the session holds now (part of the refused chunk, maybe)
        assert r.status == 204
        persisted = int(r.headers["Range"].split("-")[1]) + 1
    assert MiB <= persisted <= 2 * MiB
    rest = {"data": blob[persisted:], "headers": {"Content-Range": f"{persisted}-{2 * MiB - 1}"}}
    async with client.put(f"{location}?digest={digest_of(blob)}", **(rest if persisted < len(blob) else {})) as r:
        assert r.status == 201, await r.text()
    async with client.get(f"/v2/team/app/blobs/{digest_of(blob)}") as r:
        assert r.status == 200 and await r.read() == blob
    check_store(data)


def fill_completely(small_fs: Path) -> Path:
    """Write a file until the filesystem has not a byte left; returns it (unlink it to make room again)."""
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    assert free_bytes(small_fs) == 0
    return filler


async def test_metadata_writes_on_a_full_disk_are_a_clean_503_and_leave_nothing_behind(make_registry, small_fs):
    """Tags, manifest links and upload sessions are small files written atomically: on a full disk each is
    the same 503 a blob gets (clients retry elsewhere), never a 500, and no temp file or half session stays."""
    data = small_fs / "data"
    client = await make_registry(storage={"path": str(data)})  # a private registry
    image = make_image("team/app", "v1", [os.urandom(1000)])
    await push(client, image)
    filler = fill_completely(small_fs)
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*") if "index" not in p.parts)

    # The manifest body is stored already: only its link and the new tag need writing.
    retag = {"data": image.manifest, "headers": {"Content-Type": OCI_MANIFEST}}
    async with client.put("/v2/team/app/manifests/v2", **retag) as r:
        assert r.status == 503 and "UNAVAILABLE" in await r.text(), (r.status, await r.text())
    async with client.post("/v2/team/app/blobs/uploads/") as r:  # a session needs its info file
        assert r.status == 503 and "UNAVAILABLE" in await r.text(), (r.status, await r.text())
    after = sorted(str(p.relative_to(data)) for p in data.rglob("*") if "index" not in p.parts)
    assert after == before  # no .tmp-* file, no session directory without its info file
    async with client.get("/v2/team/app/manifests/v2") as r:
        assert r.status == 404
    async with client.get("/v2/team/app/manifests/v1") as r:
        assert r.status == 200 and await r.read() == image.manifest

    filler.unlink()  # room again: the same requests succeed
    async with client.put("/v2/team/app/manifests/v2", **retag) as r:
        assert r.status == 201, await r.text()
    async with client.post("/v2/team/app/blobs/uploads/") as r:
        assert r.status == 202
    await client.server.app[CACHE].maintain()
    check_store(data)
