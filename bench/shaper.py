"""A TCP proxy on 127.0.0.1 that puts an upstream at a distance: added round-trip time and a bandwidth cap
per connection. These kernels have no `netem`, so the benchmark shapes traffic itself.

What it models, per connection:
- set-up costs one round trip: nothing the client sends is forwarded before `rtt` after the accept (the
  SYN / SYN-ACK exchange);
- every byte, in each direction, is delivered half a round trip after it arrived, so each exchange
  (a TLS handshake step, a request and its response) costs one round trip, as on a real path;
- each direction of each connection is paced to `bandwidth` bytes per second; bytes in flight are bounded
  (about twice the bandwidth-delay product), so a fast sender is held back by TCP as by a real link.
It forwards bytes untouched: TLS passes straight through, end to end. It does not model slow start,
loss or a bottleneck shared between connections (every connection gets the full `bandwidth`).

Two threads per direction (one receives and stamps, one waits and sends): blocking sockets release the
GIL, and 128 KiB pieces keep the proxy's own CPU cost small next to the servers'.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from dataclasses import dataclass

PIECE_BYTES = 128 << 10


@dataclass(frozen=True)
class Profile:
    name: str
    rtt: float  # seconds
    bandwidth: float  # bytes per second, per connection and direction

    def describe(self) -> str:
        return f"{self.name}: {self.rtt * 1e3:g} ms RTT, {self.bandwidth / 1e6:g} MB/s per connection"


WAN = Profile("wan", rtt=0.030, bandwidth=50e6)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class _Direction:
    """One way of one connection: bytes from `source` reach `sink` half a round trip later, paced."""

    def __init__(self, source: socket.socket, sink: socket.socket, profile: Profile, not_before: float,
                 done: threading.Event) -> None:
        self.source, self.sink, self.profile = source, sink, profile
        self.not_before = not_before  # the connection is "set up" then: nothing goes out earlier
        in_flight = 2 * profile.bandwidth * profile.rtt
        self.pieces: queue.Queue[tuple[float, bytes]] = queue.Queue(max(4, math.ceil(in_flight / PIECE_BYTES)))
        self.done = done

    def start(self) -> None:
        threading.Thread(target=self._receive, daemon=True, name="shaper-recv").start()
        threading.Thread(target=self._send, daemon=True, name="shaper-send").start()

    def _receive(self) -> None:
        try:
            while True:
                data = self.source.recv(PIECE_BYTES)
                self.pieces.put((time.monotonic(), data))
                if not data:
                    return
        except OSError:
            self.pieces.put((time.monotonic(), b""))

    def _send(self) -> None:
        one_way = self.profile.rtt / 2
        free_at = 0.0  # when the paced link can take the next byte
        try:
            while True:
                arrived, data = self.pieces.get()
                due = max(arrived, self.not_before) + one_way
                if not data:
                    _sleep_until(due)
                    self.sink.shutdown(socket.SHUT_WR)
                    return
                start = max(due, free_at)
                _sleep_until(start)
                self.sink.sendall(data)
                free_at = start + len(data) / self.profile.bandwidth
        except OSError:  # reset by either end: the whole connection is over
            for sock in (self.source, self.sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            self.done.set()


class ShapingProxy:
    """Listens on 127.0.0.1 (a free port) and forwards every connection to `target` through `profile`."""

    def __init__(self, target_host: str, target_port: int, profile: Profile = WAN) -> None:
        self.target = (target_host, target_port)
        self.profile = profile
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self.connections = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ShapingProxy:
        threading.Thread(target=self._accept, daemon=True, name="shaper-accept").start()
        return self

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, time.monotonic()), daemon=True,
                             name="shaper-conn").start()

    def _serve(self, client: socket.socket, accepted: float) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_up = accepted + self.profile.rtt
        ends = [threading.Event(), threading.Event()]
        _Direction(client, server, self.profile, set_up, ends[0]).start()
        _Direction(server, client, self.profile, set_up, ends[1]).start()
        for end in ends:
            end.wait()
        client.close()
        server.close()

    def stop(self) -> None:
        self._closing = True
        self._listener.close()
