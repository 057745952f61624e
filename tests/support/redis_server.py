"""A real Redis (Debian's `redis-server`) on 127.0.0.1, no persistence, stopped by its pid."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from .procs import ManagedProcess, ProcessDied, free_port, require_tool


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, log_dir: Path | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.log_dir = log_dir
        self.port = 0
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        for _attempt in range(3):  # the free port may be taken between free_port() and the bind
            self.port = free_port()
            self.proc = ManagedProcess(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--protected-mode", "yes"],
                name="redis-server",
                log_dir=self.log_dir,
            ).start()
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    self.proc.check_alive()
                    if _pong(self.port):
                        return self
                    time.sleep(0.05)
            except ProcessDied:
                self.proc.stop()
                continue
            self.proc.stop()
            raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout} s")
        raise RuntimeError(f"redis-server did not start; log tail:\n{self.proc.log_text() if self.proc else ''}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
