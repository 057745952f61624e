"""A slow network link for tests: a 127.0.0.1 TCP proxy whose server-to-client direction is rate-limited.

A pull through it takes as long as its bytes need at `bytes_per_second`, so a test can make one operation
of a real client outlast something time-bound (a token's lifetime) without a sleep in the client. It runs
its own event loop in a thread, so synchronous tests (subprocess clients) can use it; `close()` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

_PIECE = 16 << 10


class SlowLink:
    def __init__(self, target_port: int, bytes_per_second: int) -> None:
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="slow-link", daemon=True)

    def start(self) -> SlowLink:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("slow link did not start")
        return self

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._relay(reader, writer)
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return

        async def upstream() -> None:  # client -> server: full speed
            while data := await client_reader.read(_PIECE):
                server_writer.write(data)
                await server_writer.drain()
            with contextlib.suppress(OSError):
                server_writer.write_eof()

        async def downstream() -> None:  # server -> client: at most bytes_per_second
            while data := await server_reader.read(_PIECE):
                client_writer.write(data)
                await client_writer.drain()
                await asyncio.sleep(len(data) / self.bytes_per_second)  # no credit saved up while idle
            with contextlib.suppress(OSError):
                client_writer.write_eof()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
