"""Retries with exponential backoff (tenacity), with the first attempt made before any of it is built.

Almost every call succeeds at once, and tenacity's machinery costs about 30 µs a call to build and step
through: nothing next to a blob, but a replication rerun that finds nothing changed makes hundreds of
HEADs and little else. So the first attempt is a plain await, and only a call that has failed once (in a
way worth retrying) pays for tenacity, which then makes the remaining attempts with the same schedule the
whole call would have had: waits of multiplier, 2 x multiplier, 4 x ... (each at most `wait_max`), no more
than `attempts` in all, and none started after `deadline` seconds from the first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential
from tenacity.stop import stop_base

T = TypeVar("T")


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    retry_on: Callable[[BaseException], bool],
    multiplier: float,
    wait_max: float,
    deadline: float | None = None,
) -> T:
    """`attempt()`, again after a failure `retry_on` accepts, up to `attempts` times in all; the last
    failure is raised as it was."""
    started = time.monotonic()
    try:
        return await attempt()
    except Exception as exc:  # noqa: BLE001 - judged by retry_on, re-raised otherwise
        if attempts <= 1 or not retry_on(exc):
            raise
        if deadline is not None and time.monotonic() - started >= deadline:
            raise
    await asyncio.sleep(min(multiplier, wait_max))  # the wait after the first attempt
    stop: stop_base = stop_after_attempt(attempts - 1)
    if deadline is not None:
        stop = stop | stop_after_delay(max(deadline - (time.monotonic() - started), 0.0))
    async for retry in AsyncRetrying(
        stop=stop,
        # tenacity counts from its own first attempt, which is the call's second: twice the multiplier
        # gives the waits the call would have had after its second, third, ... attempts.
        wait=wait_exponential(multiplier=multiplier * 2, max=wait_max),
        retry=retry_if_exception(retry_on),
        reraise=True,
    ):
        with retry:
            return await attempt()
    raise AssertionError("unreachable: tenacity either returns or raises")
