"""Token-bucket rate limiting for per-connection frame rates (DESIGN §3 `rate_limited`: 50/s, burst 100).

Pure: the caller passes the clock (`trio.current_time()`), so tests need no sleeping and no trio.
"""

from __future__ import annotations

_EPSILON = 1e-9  # float clocks: 20 ms at 50/s must make exactly one token, not 0.99999999


class TokenBucket:
    """`burst` tokens, refilled at `rate_per_s`; starts full. A refused request costs nothing."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s < 0:
            raise ValueError("rate_per_s must be >= 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = float(rate_per_s)
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None  # the first allow() sets the clock: the bucket is full then

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens if there are enough at time `now` (a clock going backwards refills nothing)."""
        last = self._last
        if last is None:
            self._last = now
        elif now > last:
            tokens = self._tokens + (now - last) * self.rate
            self._tokens = tokens if tokens < self.burst else float(self.burst)
            self._last = now
        if self._tokens >= cost - _EPSILON:
            self._tokens -= cost
            return True
        return False

    def tokens(self, now: float) -> float:
        """Tokens available at `now`, without taking any (for metrics and tests)."""
        if self._last is None or now <= self._last:
            return self._tokens
        return min(float(self.burst), self._tokens + (now - self._last) * self.rate)
