"""Tasks waiting for a key to change, woken when it does; nothing is left behind for keys no one waits on."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter


class Wakeups:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: Counter[str] = Counter()

    def watch(self, key: str) -> asyncio.Event:
        """Register before reading the state, so a change between the read and the wait still wakes."""
        self._waiters[key] += 1
        return self._events.setdefault(key, asyncio.Event())

    async def wait(self, key: str, event: asyncio.Event, timeout: float) -> None:
        """Until `key` changes or `timeout` passes; ends the registration `watch` made."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self.unwatch(key, event)

    def unwatch(self, key: str, event: asyncio.Event) -> None:
        """End a registration without waiting (the state read after `watch` was already new)."""
        self._waiters[key] -= 1
        if self._waiters[key] <= 0:
            del self._waiters[key]
            if self._events.get(key) is event:
                del self._events[key]

    def wake(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def __len__(self) -> int:
        return len(self._events)
