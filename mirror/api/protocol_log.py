"""The logger aiohttp's connection handler (web_protocol.RequestHandler) writes to, owned by the app.

aiohttp logs every request it cannot parse (a NUL in a header, a bad request line, `PUT *`) as an ERROR with
a ten-line traceback of its own parser, and a client that hangs up mid-response the same way. Neither is a
fault of the server: on a port open to the internet they are noise that buries real errors (a fuzzer made
136,000 lines in 10 minutes). The app hands this adapter to aiohttp through `handler_args`, so nothing
global is touched: a malformed request becomes one WARNING line, at most `burst` per `interval` (the count
of those left out is carried by the next line and by `mirror_http_malformed_requests_total`); a
disconnect becomes a DEBUG line; every other record (a real bug) passes through unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_LOG_NAME = "mirror.http"
_REASON_CHARS = 200


class RateLimit:
    """At most `burst` events per `interval` seconds; remembers how many it refused since the last one."""

    def __init__(self, burst: int, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._window_start = -float("inf")
        self._used = 0
        self.refused = 0

    def allow(self) -> bool:
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.refused += 1
        return False


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    def __init__(
        self,
        on_malformed: Callable[[], None],
        *,
        burst: int = 5,
        interval: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(logger or logging.getLogger(_LOG_NAME), {})
        self.on_malformed = on_malformed
        self.limit = RateLimit(burst, interval)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = _exception_of(kwargs.get("exc_info"))
        if isinstance(error, HttpProcessingError):
            self._malformed(error, args)
            return
        if isinstance(error, ConnectionError):
            # A client that hung up while aiohttp was still writing: routine, and it will retry.
            self.logger.debug("client disconnected: %r", error)
            return
        super().log(level, msg, *args, **kwargs)

    def _malformed(self, error: HttpProcessingError, args: tuple[object, ...]) -> None:
        self.on_malformed()
        if not self.limit.allow():
            return
        refused, self.limit.refused = self.limit.refused, 0
        remote = args[0] if args else "?"
        more = f" ({refused} more not logged)" if refused else ""
        self.logger.warning(
            "malformed request from %s: HTTP %s %s%s", remote, error.code, one_line_reason(error), more
        )


def _exception_of(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info[1]
    return None


def one_line_reason(error: HttpProcessingError) -> str:
    """aiohttp's message on one line; the offending bytes are already escaped by its repr of them."""
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip() and line.strip() != "^"]
    text = " ".join(lines)
    printable = "".join(ch if ch.isprintable() else "?" for ch in text)
    return printable[:_REASON_CHARS]


def handler_args(on_malformed: Callable[[], None]) -> Mapping[str, Any]:
    """`web.Application(handler_args=...)`: what every connection handler of the app is built with."""
    return {"logger": ProtocolLog(on_malformed)}
