"""Blob bodies come over blocking connections read in threads (mirror/upstream/blocking.py). What a user
would notice: connections to the upstream are reused (no handshake per layer), a keep-alive connection
the upstream dropped while idle does not fail a pull, and stopping the server mid-download is prompt and
leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest

from mirror.state import ROUTER
from mirror.upstream.blocking import BlockingPool
from tests.fake_upstream import FakeUpstream, Fault
from tests.proxy_helpers import assert_stopping_mid_download_is_prompt, eventually, fills_settled, start_mirror


class TinyServer:
    """Answers every request with `hello`; with `drop_after_each`, closes the connection after each answer
    without saying so (what an upstream's idle timeout looks like to the client)."""

    def __init__(self, *, drop_after_each: bool) -> None:
        self.drop_after_each = drop_after_each
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                _, _, pending = pending.partition(b"\r\n\r\n")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                if self.drop_after_each:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def tiny_server(request: pytest.FixtureRequest) -> Iterator[TinyServer]:
    server = TinyServer(drop_after_each=request.param)
    yield server
    server.close()


async def _get(pool: BlockingPool, url: str) -> bytes:
    """The whole body, read the way fills read it (read1 until it returns nothing)."""
    response = await pool.request("GET", url, {})
    try:
        assert response.status == 200
        body = b""
        while piece := await asyncio.to_thread(response.read1, 1 << 20):
            body += piece
        return body
    finally:
        response.release()


@pytest.mark.parametrize(
    ("tiny_server", "connections"),
    [(False, 1), (True, 3)],
    indirect=["tiny_server"],
    ids=["kept alive: one connection for all", "dropped while idle: a new one, and no failure"],
)
async def test_blob_requests_reuse_kept_alive_connections_and_survive_dropped_ones(
    tiny_server: TinyServer, connections: int
) -> None:
    pool = BlockingPool(user_agent="test", timeout=5)
    try:
        for _ in range(3):
            assert await _get(pool, f"http://127.0.0.1:{tiny_server.port}/v2/a/blobs/x") == b"hello"
            await asyncio.to_thread(time.sleep, 0.05)  # a dropped connection's FIN reaches our side first
        assert tiny_server.connections == connections
    finally:
        pool.close()


@pytest.mark.parametrize("tiny_server", [False], indirect=True)
async def test_connections_to_an_upstream_are_capped_and_the_next_request_waits_for_one(
    tiny_server: TinyServer,
) -> None:
    pool = BlockingPool(user_agent="test", timeout=10, max_connections=2)
    url = f"http://127.0.0.1:{tiny_server.port}/v2/a/blobs/x"
    try:
        first, second = await pool.request("GET", url, {}), await pool.request("GET", url, {})
        third = asyncio.ensure_future(pool.request("GET", url, {}))
        await asyncio.sleep(0.3)
        assert not third.done()  # both connections are busy with unread bodies
        first.release()  # unread: closed, which frees its slot
        response = await asyncio.wait_for(third, 5)
        assert response.status == 200
        assert pool.open_connections == 2  # the second and the third: never more than the cap
        assert tiny_server.connections == 3
        response.release()
        second.release()
        assert pool.open_connections == pool.idle_connections  # nothing is held by a finished request
    finally:
        pool.close()
    assert pool.open_connections == 0


@pytest.mark.parametrize("tiny_server", [False], indirect=True)
async def test_connections_opened_ahead_carry_the_blob_requests_that_follow(tiny_server: TinyServer) -> None:
    """A cold pull's blob GETs at distance: their connections are set up while the manifest is on its
    way, so the GETs that follow it open none of their own (no TCP and TLS round trips after it)."""
    pool = BlockingPool(user_agent="test", timeout=5, max_connections=4)
    url = f"http://127.0.0.1:{tiny_server.port}/v2/a/blobs/x"
    try:
        assert pool.warm(url, 3) == 3
        await eventually(lambda: pool.idle_connections == 3, what="three connections opened ahead")
        # (The server counts a connection when its accept() returns, a moment after ours connected.)
        await eventually(lambda: tiny_server.connections == 3, what="the server's three accepts")
        assert pool.warm(url, 3) == 0  # three are idle already: none more

        responses = await asyncio.gather(*(pool.request("GET", url, {}) for _ in range(3)))
        for response in responses:
            assert await asyncio.to_thread(response.read1, 1 << 20) == b"hello"
            assert await asyncio.to_thread(response.read1, 1 << 20) == b""
            response.release()
        await asyncio.sleep(0.1)  # a new connection's accept would be counted by now
        assert tiny_server.connections == 3  # every GET went over a connection opened ahead

        assert pool.warm(url, 10) == 1  # never past max_connections (4, three of them open)
        await eventually(lambda: pool.idle_connections == 4, what="the fourth connection")
    finally:
        pool.close()
    assert pool.open_connections == 0


async def test_a_connection_that_cannot_be_opened_ahead_costs_nothing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]  # closed below: nothing listens there any more
    pool = BlockingPool(user_agent="test", timeout=5)
    try:
        assert pool.warm(f"http://127.0.0.1:{port}/v2/", 2) == 2
        await eventually(lambda: pool.warm(f"http://127.0.0.1:{port}/v2/", 0) == 0 and not pool._warming,
                         what="both attempts over")
        assert pool.open_connections == 0
    finally:
        pool.close()


async def test_failed_downloads_give_their_connections_back(aiohttp_server, make_registry) -> None:
    fake = FakeUpstream()
    kinds = ["truncate", "wrong", "chunked-truncate", "503"]
    blobs = {kind: os.urandom(1 << 20) for kind in kinds}
    for kind, data in blobs.items():
        fake.faults[fake.add_blob(data)] = Fault(kind)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    missing = "sha256:" + "0" * 64
    for digest in [*fake.faults, missing]:
        async with client.get(f"/v2/library/alpine/blobs/{digest}") as response:
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await response.read()  # an error or a cut body: either way the fill is over
    await fills_settled(client)
    pool = client.server.app[ROUTER].upstreams["fake.io"].registry.client.blocking  # type: ignore[attr-defined]
    assert pool.open_connections == pool.idle_connections


async def test_stopping_the_server_mid_download_is_prompt_and_leaves_no_temp(aiohttp_server, make_registry) -> None:
    fake = FakeUpstream()
    layer = os.urandom(4 << 20)
    digest = fake.add_blob(layer)
    fake.faults[digest] = Fault("stall", delay=60)  # half the body, then silence
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, timeout=60)
    response = await client.get(f"/v2/library/alpine/blobs/{digest}")
    assert response.status == 200
    await assert_stopping_mid_download_is_prompt(client, fake, digest, len(layer))
