"""A blob load generator that costs the machine almost nothing, so the servers are what it measures.

wrk reads 8 KiB per system call into its own memory: at one connection it spends a whole core on that
copy loop and measures itself (both servers came out at the same ~2 GB/s). Here each connection asks
for the blob again and again over keep-alive and drops the body in the kernel (`recv` with MSG_TRUNC
on TCP discards queued bytes without copying them out), so what is left is the server's work and the
loopback's.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

DISCARD_BYTES = 4 << 20


@dataclass
class LoadResult:
    bytes_received: int
    responses: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_received / self.seconds if self.seconds else 0.0


def _read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """Status, Content-Length and whatever body bytes arrived with the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("server closed the connection before a response")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), -1)
    if length < 0:
        raise ValueError("response without Content-Length")
    return status, length, rest


@dataclass
class _Tally:
    received: int = 0
    responses: int = 0


def _connection_loop(url: str, deadline: float, tally: _Tally, lock: threading.Lock, errors: list[str]) -> None:
    parts = urlsplit(url)
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    scratch = memoryview(bytearray(DISCARD_BYTES))
    received = responses = 0
    sock = socket.create_connection((parts.hostname, parts.port))
    try:
        while time.perf_counter() < deadline:
            sock.sendall(request)
            status, length, rest = _read_head(sock)
            if status != 200:
                errors.append(f"status {status}")
                return
            remaining = length - len(rest)
            received += len(rest)
            while remaining > 0:
                count = sock.recv_into(scratch, min(remaining, DISCARD_BYTES), socket.MSG_TRUNC)
                if count == 0:
                    errors.append("connection closed mid-body")
                    return
                remaining -= count
                received += count
            responses += 1
    finally:
        sock.close()
        with lock:
            tally.received += received
            tally.responses += responses


def run(url: str, *, connections: int, seconds: float) -> LoadResult:
    """Fetch `url` over `connections` keep-alive connections for about `seconds`. Every response is read
    to its end, and the clock runs until the last one ends."""
    tally = _Tally()
    lock = threading.Lock()
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + seconds
    threads = [threading.Thread(target=_connection_loop, args=(url, deadline, tally, lock, errors))
               for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"blob load on {url} failed: {errors[0]}")
    return LoadResult(tally.received, tally.responses, elapsed)
