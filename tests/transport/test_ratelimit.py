"""TokenBucket: starts full, allows a burst, then refills at the configured rate."""

from __future__ import annotations

import pytest

from transport.ratelimit import TokenBucket


def test_burst_then_refill_rate() -> None:
    bucket = TokenBucket(rate_per_s=50, burst=100)
    now = 1000.0
    assert all(bucket.allow(now) for _ in range(100))  # starts full
    assert not bucket.allow(now)
    assert not bucket.allow(now + 0.019)  # 0.95 tokens
    assert bucket.allow(now + 0.02)  # 1 token after 20 ms at 50/s
    assert not bucket.allow(now + 0.02)
    # one second later: 50 more frames, not 51
    later = now + 1.02
    assert sum(bucket.allow(later) for _ in range(60)) == 50


def test_sustained_rate_is_the_configured_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    allowed = sum(bucket.allow(t / 100) for t in range(1000))  # 100 attempts/s for 10 s
    assert allowed == 5 + 100 - 1 or allowed == 5 + 100  # burst + 10/s x ~10 s


def test_refill_caps_at_burst() -> None:
    bucket = TokenBucket(rate_per_s=100, burst=3)
    assert all(bucket.allow(0.0) for _ in range(3))
    assert bucket.tokens(3600.0) == 3
    assert sum(bucket.allow(3600.0) for _ in range(10)) == 3


def test_cost_and_refusal_is_free() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=4)
    assert bucket.allow(0.0, cost=3)
    assert not bucket.allow(0.0, cost=2)  # refused: nothing taken
    assert bucket.allow(0.0, cost=1)
    assert not bucket.allow(0.0)
    assert not bucket.allow(0.0, cost=5)
    assert not TokenBucket(1, 4).allow(0.0, cost=5)  # more than the burst never passes


def test_clock_going_backwards_refills_nothing() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=1)
    assert bucket.allow(10.0)
    assert not bucket.allow(5.0)
    assert not bucket.allow(10.5)
    assert bucket.allow(11.0)


def test_zero_rate_never_refills() -> None:
    bucket = TokenBucket(rate_per_s=0, burst=2)
    assert bucket.allow(0.0) and bucket.allow(0.0)
    assert not bucket.allow(1e9)


@pytest.mark.parametrize(("rate", "burst"), [(-1, 1), (1, 0)])
def test_bad_configuration(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
