"""At most one run per key; every caller gets that run's result or its exception.

The run is a task the owner tracks, not a child of any request: a caller that goes away (a client that
disconnects) stops waiting, and the run carries on for the others.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._runs: dict[Hashable, asyncio.Task[T]] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._runs.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._runs[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        # asyncio.wait never cancels what it waits for: a cancelled caller leaves the run alone.
        await asyncio.wait({task})
        return task.result()

    def _forget(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._runs.get(key) is task:
            del self._runs[key]
        if not task.cancelled():
            task.exception()  # mark it retrieved: the callers re-raise it, asyncio needn't log it again

    def in_flight(self, key: Hashable) -> bool:
        return key in self._runs

    async def close(self) -> None:
        tasks = list(self._runs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
