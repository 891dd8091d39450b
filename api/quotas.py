"""Per-user REST rate limiting (issue 8: one token created 300 sessions with 10 MB of state in half a second).

One token bucket per JWT subject on this pod, kept for the most recently seen users only (bounded memory);
a user forgotten and seen again starts with a full bucket, which is the conservative error.
"""

from __future__ import annotations

from collections import OrderedDict

from transport.ratelimit import TokenBucket

MAX_USERS = 100_000


class UserRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_users: int = MAX_USERS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_users = max_users
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, user: str, now: float) -> bool:
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.rate_per_s, self.burst)
            if len(self._buckets) > self.max_users:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(user)
        return bucket.allow(now)

    def retry_after_s(self, user: str, now: float) -> float:
        """Seconds until the user's next call would pass."""
        bucket = self._buckets.get(user)
        if bucket is None:
            return 0.0
        return max(0.0, (1.0 - bucket.tokens(now)) / self.rate_per_s)
