"""Prometheus metrics of the WebSocket transport (bounded labels only).

Per-frame counts are plain integer attributes of `HOT`, read by a collector at scrape time: a
prometheus Counter takes a lock on every `inc`, which is measurable on the per-message path.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONNECTIONS = Gauge("sessiond_ws_connections", "Open device WebSocket connections")
CONNECTS = Counter("sessiond_ws_connects_total", "WebSocket handshakes, by outcome", ["outcome"])
ERRORS = Counter("sessiond_ws_errors_total", "Error frames sent to devices, by code", ["code"])
CLOSES = Counter("sessiond_ws_closes_total", "Connections closed by the server, by close code", ["code"])
SLOW_CONSUMERS = Counter(
    "sessiond_slow_consumer_total",
    "Send queue overflows, by action (resync: fresh welcome; disconnect: 4008)",
    ["action"],
)


class HotCounters:
    """Counters bumped on every frame; only the trio thread writes them."""

    __slots__ = ("frames_in", "frames_out", "messages_out")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.messages_out = 0


HOT = HotCounters()


class _HotCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("sessiond_ws_frames_in", "Frames received from devices", value=HOT.frames_in)
        yield CounterMetricFamily("sessiond_ws_frames_out", "Frames sent to devices", value=HOT.frames_out)
        yield CounterMetricFamily(
            "sessiond_ws_messages_out",
            "WebSocket messages sent (one message may batch several frames)",
            value=HOT.messages_out,
        )


REGISTRY.register(_HotCollector())
