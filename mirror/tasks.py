"""A task that runs beside a block: started on entry, cancelled and awaited on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running_beside(work: Coroutine[Any, Any, None], *, name: str | None = None) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs; on exit it is cancelled and waited for, so nothing of it
    outlives the block (an exception it raised before is raised here)."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
