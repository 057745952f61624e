"""One 127.0.0.1 port in front of two servers: TLS connections go to one, plain HTTP to the other.

A real registry host answers https on port 443 and http on port 80: `https://registry.example` and
`http://registry.example` have the same host:port as written in a URL. Tests cannot bind those ports, so
this mux gives `https://127.0.0.1:P` and `http://127.0.0.1:P` instead: a connection whose first byte
starts a TLS handshake record (0x16) is passed to the TLS server, any other to the plain one.
"""

from __future__ import annotations

import asyncio
import contextlib

_TLS_HANDSHAKE = b"\x16"


class ProtocolMux:
    def __init__(self, tls_port: int, plain_port: int) -> None:
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            first = await reader.read(1)
            if not first:
                return
            port = self.tls_port if first == _TLS_HANDSHAKE else self.plain_port
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
            self._writers.add(upstream_writer)
            upstream_writer.write(first)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except OSError:
            pass
        finally:
            for each in (writer, upstream_writer):
                if each is not None:
                    self._writers.discard(each)
                    each.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
