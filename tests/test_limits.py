"""Request limits against abuse: URL and header caps (the server process), body caps, a stalled body."""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.config import ConfigError, load_config_data
from tests.registry_helpers import digest_of, error_codes, files_under
from tests.support.fixtures import MirrorFactory
from tests.support.tls import make_private_ca


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


class _Trickler:
    """A raw connection that sends a request a few bytes at a time and notices when the server hangs up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def poll(self, wait: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], wait)
        if readable:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            self.received += data
            self.closed = self.closed or not data


def _slowloris_config(tmp_path: Path, **http: Any) -> dict[str, Any]:
    return {"storage": {"path": str(tmp_path / "data")},
            "http": {"header_timeout": "2s", "keepalive_timeout": "60s", **http}}


def _trickle_until_cut(sock: socket.socket, served: Callable[[], int]) -> tuple[float, bytes]:
    """Send a never-ending header one byte every 0.2 s; meanwhile `served()` another client. Returns how
    long until the server hung up, and what it said."""
    slow = _Trickler(sock)
    started = time.monotonic()
    slow.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    while not slow.closed and time.monotonic() - started < 20:
        slow.send(b"X")
        assert served() == 200  # the server is not stuck on the slow client
        slow.poll(0.2)
    return time.monotonic() - started, slow.received


def _normal_client(port: int, context: ssl.SSLContext | None = None) -> Callable[[], int]:
    connection = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10) if context
                  else http.client.HTTPConnection("127.0.0.1", port, timeout=10))

    def get() -> int:
        connection.request("GET", "/v2/")
        response = connection.getresponse()
        response.read()
        return response.status

    return get


def test_headers_trickled_in_are_cut_off_while_other_clients_are_served(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """slowloris: a header sent one byte every 0.2 s never completes. The keep-alive timer (60 s) does not
    apply while a request is arriving, so without `http.header_timeout` (2 s here) the connection stayed
    open for as long as the client kept sending; now it is answered 408 and closed after 2 s, while a
    normal client on its own keep-alive connection is served all along."""
    mirror = mirror_factory(_slowloris_config(tmp_path))
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
        took, said = _trickle_until_cut(sock, _normal_client(mirror.port))
    assert 1.8 <= took < 5, took
    head, _, body = said.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), said
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    # Nothing sent at all is an idle connection: the same bound from the start.
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert 1.8 <= time.monotonic() - started < 5
    assert mirror.running
    log = mirror.log_text(tail=None)
    assert "request headers not complete after 2s" in log and "Traceback" not in log


def test_slow_but_complete_requests_and_idle_keep_alive_are_not_cut(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """The bound is on each request's header phase, not on the connection: headers that take 1.5 s, a body
    that trickles for 4 s (within body_idle_timeout), 3 s of keep-alive idle between requests (longer than
    header_timeout) and two pipelined requests in one write all get their answers on one connection."""
    mirror = mirror_factory(_slowloris_config(tmp_path))
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
        client = _Trickler(sock)
        # Headers in 1.5 s, then a monolithic upload whose 40 bytes take 4 s.
        data = b"z" * 40
        head = (f"POST /v2/team/app/blobs/uploads/?digest={digest_of(data)} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(data)}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        for piece in (head[i:i + 20] for i in range(0, len(head), 20)):
            client.send(piece)
            time.sleep(1.5 / (len(head) / 20))
        for piece in (data[i:i + 4] for i in range(0, len(data), 4)):
            client.send(piece)
            time.sleep(0.4)
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in client.received and not client.closed and time.monotonic() < deadline:
            client.poll(0.2)
        assert client.received.startswith(b"HTTP/1.1 201 "), client.received
        client.received = b""
        time.sleep(3)  # idle between requests: keepalive_timeout's, not header_timeout's
        client.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/team/app/tags/list HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while client.received.count(b"HTTP/1.1 ") < 2 and not client.closed and time.monotonic() < deadline:
            client.poll(0.2)
        assert client.received.count(b"HTTP/1.1 200 ") == 2, client.received
        assert not client.closed
    assert "request headers not complete" not in mirror.log_text(tail=None)


def test_headers_trickled_in_over_tls_are_cut_off_too(mirror_factory: MirrorFactory, tmp_path: Path) -> None:
    ca = make_private_ca(tmp_path / "tls")
    tls = {"cert": str(ca.cert_file), "key": str(ca.key_file)}
    mirror = mirror_factory({**_slowloris_config(tmp_path), "tls": tls}, tls_ca=ca.ca_file)
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", mirror.port), timeout=10),
                             server_hostname="127.0.0.1") as sock:
        took, said = _trickle_until_cut(sock, _normal_client(mirror.port, context))
    assert 1.8 <= took < 5, took
    assert said.startswith(b"HTTP/1.1 408 "), said
    assert mirror.running


@pytest.mark.parametrize("bad", [0, "0s", "soon", -1])
def test_header_timeout_must_be_a_positive_duration(bad: Any) -> None:
    with pytest.raises(ConfigError) as error:
        load_config_data({"http": {"header_timeout": bad}})
    assert str(error.value).startswith("http.header_timeout"), str(error.value)
    assert load_config_data({}).security.http.header_timeout == 30
