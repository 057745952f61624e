"""call_with_retries: the first attempt outside tenacity, the rest on the schedule the whole call would have had."""

from __future__ import annotations

import asyncio
import time

import pytest

from mirror.retrying import call_with_retries


class Flaky:
    """Fails with `errors` in order, then answers "ok"; remembers when each attempt started."""

    def __init__(self, *errors: Exception, takes: float = 0.0) -> None:
        self.errors = list(errors)
        self.takes = takes
        self.started: list[float] = []

    async def __call__(self) -> str:
        self.started.append(time.monotonic())
        if self.takes:
            await asyncio.sleep(self.takes)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _transient(error: BaseException) -> bool:
    return isinstance(error, ConnectionError)


async def test_a_call_that_succeeds_is_attempted_once() -> None:
    attempt = Flaky()
    assert await call_with_retries(attempt, attempts=3, retry_on=_transient, multiplier=0.01, wait_max=1) == "ok"
    assert len(attempt.started) == 1


async def test_transient_failures_are_retried_with_doubling_waits() -> None:
    attempt = Flaky(ConnectionError("reset"), ConnectionError("refused"))
    assert await call_with_retries(attempt, attempts=3, retry_on=_transient, multiplier=0.05, wait_max=1) == "ok"
    first_wait, second_wait = (b - a for a, b in zip(attempt.started, attempt.started[1:], strict=False))
    assert first_wait >= 0.05 and second_wait >= 0.1  # multiplier, then twice it


async def test_the_last_failure_is_raised_after_the_last_attempt() -> None:
    attempt = Flaky(ConnectionError("one"), ConnectionError("two"), ConnectionError("three"), ConnectionError("four"))
    with pytest.raises(ConnectionError, match="three"):
        await call_with_retries(attempt, attempts=3, retry_on=_transient, multiplier=0.001, wait_max=1)
    assert len(attempt.started) == 3


async def test_a_failure_not_worth_retrying_is_raised_at_once() -> None:
    attempt = Flaky(ValueError("garbled"))
    with pytest.raises(ValueError, match="garbled"):
        await call_with_retries(attempt, attempts=3, retry_on=_transient, multiplier=0.001, wait_max=1)
    assert len(attempt.started) == 1


async def test_no_attempt_starts_after_the_deadline() -> None:
    attempt = Flaky(ConnectionError("slow"), ConnectionError("slow again"), takes=0.15)
    with pytest.raises(ConnectionError, match="slow"):
        await call_with_retries(attempt, attempts=5, retry_on=_transient, multiplier=0.001, wait_max=1, deadline=0.1)
    assert len(attempt.started) == 1  # the first took longer than the whole deadline


async def test_retries_stop_once_the_deadline_has_passed() -> None:
    attempt = Flaky(*(ConnectionError(str(n)) for n in range(10)), takes=0.04)
    with pytest.raises(ConnectionError):
        await call_with_retries(attempt, attempts=10, retry_on=_transient, multiplier=0.001, wait_max=1, deadline=0.1)
    assert 2 <= len(attempt.started) <= 4
