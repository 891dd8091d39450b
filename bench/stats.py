"""Latency samples and their summary (percentiles), throughput buckets over time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass(slots=True)
class Latency:
    """Latency samples in nanoseconds; summarised in milliseconds."""

    samples: list[int] = field(default_factory=list)

    def add(self, ns: int) -> None:
        self.samples.append(ns)

    def summary(self) -> dict[str, float | int]:
        """count, mean, p50, p90, p99, max in ms (nan when no sample)."""
        values = sorted(self.samples)
        ms = 1e-6
        mean = sum(values) / len(values) * ms if values else math.nan
        return {
            "count": len(values),
            "mean_ms": mean,
            "p50_ms": percentile(values, 50) * ms,
            "p90_ms": percentile(values, 90) * ms,
            "p99_ms": percentile(values, 99) * ms,
            "max_ms": float(values[-1]) * ms if values else math.nan,
        }

    def ms(self) -> list[float]:
        return [v * 1e-6 for v in self.samples]


@dataclass(slots=True)
class Timeline:
    """Events counted per time bucket (default 1 s) from `t0_ns`: throughput over time."""

    t0_ns: int = 0
    bucket_s: float = 1.0
    counts: list[int] = field(default_factory=list)

    def add(self, now_ns: int, n: int = 1) -> None:
        index = int((now_ns - self.t0_ns) / 1e9 / self.bucket_s)
        if index < 0:
            return
        if index >= len(self.counts):
            self.counts.extend([0] * (index + 1 - len(self.counts)))
        self.counts[index] += n

    def rates(self) -> list[float]:
        """Events per second in each bucket."""
        return [c / self.bucket_s for c in self.counts]
