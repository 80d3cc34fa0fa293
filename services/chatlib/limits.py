"""Limits: a token bucket for frames, buckets per client address (guest sign-ins), and a
tally of violations for abuse."""

from __future__ import annotations

import time
from collections import deque


class TokenBucket:
    """`rate` tokens per second, up to `burst`; each counted frame takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")  # two per socket: no dict each

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self, now: float | None = None) -> float:
        """Seconds until `take` would succeed (0 when it would now)."""
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


class KeyedBuckets:
    """A TokenBucket per key (a client address), at most `max_keys` of them: past that the
    oldest is forgotten, so a flood of addresses costs bounded memory (a forgotten address
    starts again with a full bucket, the worst it can gain)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float | None = None) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until one is free."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[key] = TokenBucket(self.rate, int(self.burst), now)
        return 0.0 if bucket.take(now) else bucket.wait(now)


class AbuseGuard:
    """More than `limit` violations within `window` seconds makes a client abusive."""

    # One per socket, and most sockets never misbehave: the deque (~760 B even when
    # empty) is made at the first violation.
    __slots__ = ("limit", "times", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.times: deque[float] | None = None

    def violation(self, now: float | None = None) -> bool:
        """Record one; True when the client is now abusive."""
        now = time.monotonic() if now is None else now
        if self.times is None:
            self.times = deque()
        self.times.append(now)
        while self.times and self.times[0] < now - self.window:
            self.times.popleft()
        return len(self.times) > self.limit
