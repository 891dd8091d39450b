"""Prometheus metrics of the storage layer (DESIGN §4: names start with `sessiond_`; labels bounded).

Labels take only fixed values: `backend` is redis | postgres | amqp, `kind` an error class, `reason` a drop
reason. The hot path observes once per bridge call / journal batch, never per op. Defined once at import (the
default registry refuses duplicates), so every backend instance shares them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from runtime.hothistogram import HotHistogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)

BRIDGE_CALL_SECONDS = Histogram(
    "sessiond_bridge_call_seconds",
    "Round trip of one trio -> asyncio bridge call (queueing + the asyncio work + the wakeup back)",
    buckets=_LATENCY_BUCKETS,
)


class JournalFigures:
    """One backend's journal batch figures, bumped on the trio thread once per batch and read at scrape time
    (`sessiond_storage_journal_append_seconds` and `..._changes_total`).

    Why not a Histogram and a Counter: their values take a lock per update (the sum, the bucket, the counter),
    and at hundreds of group commits a second those locks were 4 % of the server's CPU in Redis mode (py-spy
    --gil, `bench fanout --redis`).
    """

    __slots__ = ("changes", "seconds")

    def __init__(self) -> None:
        self.seconds = HotHistogram(_LATENCY_BUCKETS)
        self.changes = 0

    def observe(self, seconds: float, changes: int) -> None:
        """One batch written in `seconds` with `changes` changes accepted."""
        self.seconds.observe(seconds)
        self.changes += changes


JOURNAL_FIGURES = {backend: JournalFigures() for backend in ("redis", "postgres")}


class _JournalCollector(Collector):
    def collect(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
        seconds = HistogramMetricFamily(
            "sessiond_storage_journal_append_seconds",
            "One journal batch write (one round trip, all sessions of the batch), by backend",
            labels=["backend"],
        )
        changes = CounterMetricFamily(
            "sessiond_storage_journal_changes", "Changes written to a journal batch, by backend", labels=["backend"]
        )
        for backend, figures in JOURNAL_FIGURES.items():
            seconds.add_metric([backend], figures.seconds.cumulative(), figures.seconds.sum)
            changes.add_metric([backend], figures.changes)
        yield seconds
        yield changes


REGISTRY.register(_JournalCollector())

STORAGE_ERRORS = Counter(
    "sessiond_storage_errors_total",
    "Storage calls that failed, by backend and kind (unavailable, full, fenced, conflict)",
    ["backend", "kind"],
)
EVENTS_PUBLISHED = Counter("sessiond_events_published_total", "Events confirmed by RabbitMQ")
EVENTS_DROPPED = Counter(
    "sessiond_events_dropped_total",
    "Events dropped before RabbitMQ confirmed them, by reason (buffer_full, unencodable, closed)",
    ["reason"],
)
EVENTS_BUFFERED = Gauge("sessiond_events_buffered", "Events waiting for RabbitMQ (buffered plus unconfirmed)")

# Pre-create the label sets, so dashboards see zeros instead of missing series.
for _backend in ("redis", "postgres"):
    for _kind in ("unavailable", "full", "fenced", "conflict"):
        STORAGE_ERRORS.labels(_backend, _kind)
STORAGE_ERRORS.labels("amqp", "unavailable")
for _reason in ("buffer_full", "unencodable", "closed"):
    EVENTS_DROPPED.labels(_reason)


def error_kind(exc: BaseException) -> str:
    """Bounded label for a storage error: full (a journal at its cap), fenced (a newer owner's token), conflict
    (a stale writer), else unavailable."""
    name = type(exc).__name__
    if name == "JournalFull":
        return "full"
    if name == "Fenced":
        return "fenced"
    if name in ("VersionConflict", "JournalRefused"):
        return "conflict"
    return "unavailable"
