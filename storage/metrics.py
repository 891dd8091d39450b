"""Prometheus metrics of the storage layer (DESIGN §4: names start with `sessiond_`; labels bounded).

Labels take only fixed values: `backend` is redis | postgres | amqp, `kind` an error class, `reason` a drop
reason. The hot path observes once per bridge call / journal batch, never per op. Defined once at import (the
default registry refuses duplicates), so every backend instance shares them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)

BRIDGE_CALL_SECONDS = Histogram(
    "sessiond_bridge_call_seconds",
    "Round trip of one trio -> asyncio bridge call (queueing + the asyncio work + the wakeup back)",
    buckets=_LATENCY_BUCKETS,
)
JOURNAL_APPEND_SECONDS = Histogram(
    "sessiond_storage_journal_append_seconds",
    "One journal batch write (one round trip, all sessions of the batch), by backend",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
)
JOURNAL_APPENDED = Counter(
    "sessiond_storage_journal_changes_total", "Changes written to a journal batch, by backend", ["backend"]
)
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
    JOURNAL_APPEND_SECONDS.labels(_backend)
    JOURNAL_APPENDED.labels(_backend)
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
