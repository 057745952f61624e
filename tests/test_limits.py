"""Request limits against abuse: URL and header caps (the server process), body caps, a stalled body."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

from tests.registry_helpers import digest_of, error_codes, files_under
from tests.support.fixtures import MirrorFactory


async def test_a_body_over_the_cap_is_413_and_stores_nothing(make_registry: Any, tmp_path: Path) -> None:
    registry = await make_registry(http={"max_body_bytes": "1KiB"})
    data = b"x" * 2048
    async with registry.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(data)}, data=data) as r:
        assert r.status == 413
        assert await error_codes(r) == ["SIZE_INVALID"]
    small = b"y" * 100
    async with registry.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(small)}, data=small) as r:
        assert r.status == 201
    assert not [p for p in files_under(tmp_path / "data" / "blobs") if digest_of(data)[7:] in p]


async def test_a_stalled_upload_body_is_cut_off_and_the_upload_resumes(make_registry: Any) -> None:
    registry = await make_registry(http={"body_idle_timeout": "1s"})
    async with registry.post("/v2/team/app/blobs/uploads/") as response:
        location = response.headers["Location"]

    async def trickle() -> Any:
        yield b"a" * 1000
        await asyncio.sleep(3)
        yield b"b" * 1000

    started = time.monotonic()
    async with registry.patch(location, data=trickle()) as response:
        assert response.status == 408
    assert time.monotonic() - started < 3
    async with registry.get(location) as response:
        assert response.status == 204
        assert response.headers["Range"] == "0-999"  # what arrived before the stall is kept


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def test_url_and_header_caps_answer_before_any_handler(mirror_factory: MirrorFactory, tmp_path: Path) -> None:
    mirror = mirror_factory({"storage": {"path": str(tmp_path / "data")},
                             "http": {"max_url_bytes": 1024, "max_header_bytes": 512, "max_headers": 20}})
    long_url = b"GET /v2/" + b"a" * 2000 + b"/tags/list HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _raw(mirror.port, long_url).split(b" ")[1] in (b"400", b"414")
    long_header = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 1000 + b"\r\n\r\n"
    assert _raw(mirror.port, long_header).split(b" ")[1] in (b"400", b"431")
    many = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n"
    assert _raw(mirror.port, many).split(b" ")[1] in (b"400", b"431")
    assert _raw(mirror.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").split(b" ")[1] == b"200"
    assert mirror.running
    assert "Traceback" not in mirror.log_text(tail=None)
