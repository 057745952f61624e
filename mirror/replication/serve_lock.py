"""File locks of replication: the data directory's serve lock (a `mirror serve` owns it), and a rule's run lock.

Kept apart from the engine so that a server without replication rules takes the serve lock (which tells
`mirror sync` to go through that server) without loading the engine.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

SERVE_LOCK = "serve.lock"


class FileLock:
    """An exclusive flock on a file: held by one process at a time, released when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _serve_lock(data_dir: Path) -> FileLock:
    return FileLock(data_dir / "replication" / SERVE_LOCK)


async def take_serve_lock(data_dir: Path) -> FileLock | None:
    """This server's claim on the data directory, or None (logged) when another `mirror serve` has it."""
    lock = _serve_lock(data_dir)
    if not await asyncio.to_thread(lock.try_acquire):
        log.error("another mirror serve runs replication on %s: this one does not schedule rules", lock.path.parent)
        return None
    return lock


def serve_lock_held(data_dir: Path) -> bool:
    """True when a `mirror serve` runs replication on this data directory right now."""
    lock = _serve_lock(data_dir)
    if lock.try_acquire():
        lock.release()
        return False
    return True
