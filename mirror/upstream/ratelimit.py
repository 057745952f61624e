"""What an upstream last said about its pull budget: `ratelimit-remaining: 76;w=21600` and 429 Retry-After.

Kept per upstream on its UpstreamClient, so every request (pull-through and replication alike) updates
one reading, and replication can leave what remains of the budget to clients (mirror/replication/gate.py).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass

# A Retry-After further out than this is treated as this: a typo or a hostile upstream must not park a
# rule for a year.
MAX_RETRY_AFTER_SECONDS = 6 * 3600.0
DEFAULT_RETRY_AFTER_SECONDS = 60.0


def parse_quota(value: str | None) -> tuple[int | None, float | None]:
    """`76;w=21600` -> (76, 21600.0); empty or garbled -> (None, None). Docker Hub sometimes sends it empty."""
    if not value:
        return None, None
    count_text, *params = value.split(";")
    try:
        count = int(count_text.strip())
    except ValueError:
        return None, None
    window = None
    for param in params:
        name, _, number = param.strip().partition("=")
        if name.strip() == "w":
            try:
                window = float(number)
            except ValueError:
                window = None
    return count, window


def parse_retry_after(value: str | None, *, now: float | None = None) -> float:
    """Seconds to wait for `Retry-After` (delta-seconds or an HTTP date), bounded."""
    now = time.time() if now is None else now
    if not value:
        return DEFAULT_RETRY_AFTER_SECONDS
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_SECONDS
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


@dataclass(slots=True)
class RateLimitReading:
    remaining: int | None = None  # None: the upstream never said (no limit we know of)
    limit: int | None = None
    window: float | None = None  # seconds, from `w=`
    observed_at: float = 0.0
    blocked_until: float = 0.0  # from the last 429's Retry-After (wall clock)

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        remaining, window = parse_quota(headers.get("ratelimit-remaining"))
        if remaining is not None:
            self.remaining, self.observed_at = remaining, time.time()
            self.window = window or self.window
        limit, _ = parse_quota(headers.get("ratelimit-limit"))
        if limit is not None:
            self.limit = limit
        if status == 429:
            self.block_for(parse_retry_after(headers.get("Retry-After")))

    def block_for(self, seconds: float) -> None:
        self.blocked_until = max(self.blocked_until, time.time() + seconds)
