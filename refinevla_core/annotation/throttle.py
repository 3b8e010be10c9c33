"""Being a polite API client at scale: a requests-per-minute limiter shared by all threads, and retry delays.

Paid APIs answer bursts with 429s; 100k frames at full concurrency would hit the quota within seconds. Every HTTP
attempt (retries and re-asks included) passes the limiter, and failed attempts wait with exponential backoff and
full jitter (so eight threads don't retry in lockstep), or exactly as long as the server's Retry-After says.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from datetime import datetime, timezone


class RateLimiter:
    """Spaces request starts at least 60/requests_per_minute seconds apart across threads; 0 = no limit."""

    def __init__(self, requests_per_minute: float, clock=time.monotonic, sleep=time.sleep) -> None:
        self.interval_s = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> float:
        """Block until this caller may start a request; returns the seconds waited."""
        if self.interval_s <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval_s
        delay = start - now
        if delay > 0:
            self._sleep(delay)
        return delay


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform(0, min(max_s, base_s * 2**attempt)) for attempt 0, 1, 2, ..."""
    ceiling = min(max_s, base_s * (2.0 ** attempt))
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
