"""A blob body from the upstream into a file and a hash, in two threads of its own.

The receiving thread fills a buffer of PIECE_BYTES from the socket (`readinto`: no bytes object per
read), writes it to the file, then hands it to the hashing thread, which gives it back once hashed. At
most QUEUE_PIECES buffers exist per download, allocated only when the hash falls behind, so memory stays
bounded. The event loop only hears how many bytes are on disk, at most once per piece and per loop
iteration, so readers can send them with sendfile: whole pieces mean few wake-ups, also when the
upstream is far away and its bytes trickle in one TLS record (16 KiB) at a time.

Dedicated threads, not the default executor: a fill holds its threads for as long as the download
takes, and the default executor's few workers serve every file and index call of the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import threading
from collections.abc import Callable

from mirror.errors import UpstreamInvalid, UpstreamUnavailable
from mirror.upstream.blocking import BlockingResponse

PIECE_BYTES = 1 << 20
QUEUE_PIECES = 16


class BodyDownload:
    """One response body on its way to `fd` and `hasher`. `on_written` runs in the event loop."""

    def __init__(self, response: BlockingResponse, fd: int, hasher: hashlib._Hash,
                 on_written: Callable[[int], None], *, upstream: str, size: int | None = None,
                 start: int = 0, skip: int = 0) -> None:
        """`start`: bytes of the blob already in the file and the hash (a resumed fill: this response
        continues there); `skip`: body bytes to drop first (a source that ignored the Range asked for)."""
        self._response = response
        # How many bytes the blob must have: its Content-Length or, without one, the size the blob's
        # descriptor gave. None: whatever arrives (the digest check still decides).
        length = response.content_length
        self._size = size if size is not None else (None if length is None else start + length - skip)
        self._fd = fd
        self._hasher = hasher
        self._on_written = on_written
        self._upstream = upstream
        self._skip = skip
        self.received = start
        self._reported = start
        self._report_scheduled = False
        self._pieces: queue.Queue[tuple[bytearray, int] | None] = queue.Queue(QUEUE_PIECES)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # hashed, ready to be filled again
        self._buffers = 0
        self._error: BaseException | None = None
        self._aborted = False

    async def run(self) -> int:
        """Receive the whole body; return its size. Raises UpstreamUnavailable when the stream breaks
        or ends short, UpstreamInvalid when it runs past the size it must have, OSError when the disk
        fails. If cancelled, the threads are stopped and waited for before the cancellation goes on (the
        caller may close the file right after)."""
        loop = asyncio.get_running_loop()
        receiving = _thread_future(loop, self._receive, loop, name="fill-receive")
        hashing = _thread_future(loop, self._hash, name="fill-hash")
        both = asyncio.gather(receiving, hashing)
        try:
            await asyncio.shield(both)
        except asyncio.CancelledError:
            self._abort()
            while not both.done():
                try:
                    await asyncio.shield(both)
                except asyncio.CancelledError:
                    continue
            raise
        if self._error is not None:
            raise self._error
        self._report()
        return self.received

    # -- threads -----------------------------------------------------------------------------------
    def _buffer(self) -> bytearray:
        """A buffer to fill: a hashed one, or a new one while fewer than QUEUE_PIECES + 1 exist."""
        if self._buffers > QUEUE_PIECES:
            return self._free.get()
        try:
            return self._free.get_nowait()
        except queue.Empty:
            self._buffers += 1
            return bytearray(PIECE_BYTES)

    def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            expected = self._size
            self._discard(self._skip)
            while True:
                buffer = self._buffer()
                try:
                    count = self._response.readinto(memoryview(buffer))
                except OSError as exc:  # reset, timeout, TLS error: the stream, not the disk
                    raise UpstreamUnavailable(f"upstream {self._upstream} stream broke: {exc}") from exc
                except Exception as exc:  # http.client: a garbled chunked encoding
                    raise UpstreamUnavailable(f"upstream {self._upstream} stream broke: {type(exc).__name__}") from exc
                if self._aborted:
                    raise UpstreamUnavailable("download cancelled")
                if not count:
                    break
                if expected is not None and self.received + count > expected:
                    # Never written: readers may only ever see bytes within the size they were promised.
                    raise UpstreamInvalid(
                        f"upstream {self._upstream} sent more than the {expected} bytes the blob has"
                    )
                _write_all(self._fd, memoryview(buffer)[:count])
                self.received += count
                self._pieces.put((buffer, count))
                if not self._report_scheduled:
                    self._report_scheduled = True
                    loop.call_soon_threadsafe(self._report)
            if expected is not None and self.received != expected:
                raise UpstreamUnavailable(
                    f"upstream {self._upstream} stream broke: {self.received} of {expected} bytes arrived"
                )
        except BaseException as exc:
            self._error = exc
        finally:
            self._pieces.put(None)

    def _discard(self, count: int) -> None:
        """Read and drop `count` body bytes (never written, never hashed)."""
        scratch = bytearray(min(count, PIECE_BYTES)) if count else bytearray()
        while count > 0:
            try:
                got = self._response.readinto(memoryview(scratch)[:min(count, len(scratch))])
            except Exception as exc:  # noqa: BLE001 - a broken stream, as in _receive
                raise UpstreamUnavailable(f"upstream {self._upstream} stream broke: {type(exc).__name__}") from exc
            if not got or self._aborted:
                raise UpstreamUnavailable(f"upstream {self._upstream} stream ended before the resumed offset")
            count -= got

    def _hash(self) -> None:
        # Drains the queue to the end whatever happens: a receiver blocked on a full queue must never hang.
        failure: BaseException | None = None
        while (piece := self._pieces.get()) is not None:
            buffer, count = piece
            if failure is None:
                try:
                    self._hasher.update(memoryview(buffer)[:count])
                except BaseException as exc:  # noqa: BLE001 - raised once the stream is drained
                    failure = exc
            self._free.put(buffer)
        if failure is not None:
            raise failure

    # -- the loop's side ---------------------------------------------------------------------------
    def _report(self) -> None:
        # Cleared before reading `received`: a piece landing meanwhile schedules another report.
        self._report_scheduled = False
        received = self.received
        if received != self._reported:
            self._reported = received
            self._on_written(received)

    def _abort(self) -> None:
        self._aborted = True
        self._response.abort()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _thread_future(loop: asyncio.AbstractEventLoop, target: Callable[..., None], *args: object,
                   name: str) -> asyncio.Future[None]:
    """Run `target` in a new thread; the returned future completes in `loop` when it ends."""
    future: asyncio.Future[None] = loop.create_future()

    def finished(error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def body() -> None:
        error: BaseException | None = None
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which decides
            error = exc
        try:
            loop.call_soon_threadsafe(finished, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=body, name=name, daemon=True).start()
    return future
