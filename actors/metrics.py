"""Prometheus metrics of the actor layer. Labels are bounded: no session or device ids (DESIGN §4).

Per-actor figures are in `/v1/admin/actors`; here they are aggregated as histograms.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

ACTORS_LIVE = Gauge("sessiond_actors_live", "Session actors currently active on this pod")
ACTIVATIONS = Counter("sessiond_actor_activations_total", "Session actors activated")
PASSIVATIONS = Counter(
    "sessiond_actor_passivations_total", "Session actors passivated, by reason (idle time, memory budget)", ["reason"]
)
ACTOR_STATE_BYTES = Gauge("sessiond_actor_state_bytes", "Estimated state bytes held by live actors on this pod")
CRASHES = Counter("sessiond_actor_crashes_total", "Exceptions that crashed a session actor")
JOURNAL_GAPS = Counter("sessiond_journal_gaps_total", "Restores that found versions missing from the journal")
FAILED = Counter("sessiond_actor_failed_total", "Sessions whose actor spent its restart budget")
REJECTED = Counter("sessiond_requests_rejected_total", "Requests refused by a session actor", ["code"])
CHECKPOINT_SECONDS = Histogram(
    "sessiond_checkpoint_seconds",
    "Time to write one snapshot checkpoint, by tier (fast: Redis, durable: PostgreSQL / SQLite)",
    ["tier"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
CHECKPOINT_FAILURES = Counter("sessiond_checkpoint_failures_total", "Checkpoints that failed (retried later)")


class HotCounters:
    """Bumped once per change: plain ints read at scrape time (a Counter's lock costs more than they do)."""

    __slots__ = ("changes", "turns")

    def __init__(self) -> None:
        self.changes = 0
        self.turns = 0


HOT = HotCounters()


class _HotCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("sessiond_changes", "Changes accepted (one version step each)", value=HOT.changes)
        yield CounterMetricFamily("sessiond_actor_turns", "Actor turns that wrote to the journal", value=HOT.turns)


REGISTRY.register(_HotCollector())

# ---- the cluster (DESIGN §6) ----------------------------------------------------------------------------------
FENCED_WRITES = Counter(
    "sessiond_fenced_writes_total", "Writes refused because another pod holds a newer lease token for the session"
)
MOVES = Counter(
    "sessiond_session_moves_total",
    "Sessions this pod stopped owning, by reason (rebalance: placement changed; drain: SIGTERM; lease_lost)",
    ["reason"],
)
LEASE_RENEWALS = Counter(
    "sessiond_lease_renewals_total", "Session lease renewals, by result (ok, lost, error)", ["result"]
)
LEASES_HELD = Gauge("sessiond_leases_held", "Session leases this pod holds")
CLUSTER_MEMBERS = Gauge("sessiond_cluster_members", "Live pods in this pod's view of the cluster")
RELAY_LATENCY = Histogram(
    "sessiond_relay_latency_seconds",
    "Transit of one relay message between pods (publish to receipt, wall clocks)",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
RELAY_MESSAGES = Counter(
    "sessiond_relay_messages_total", "Relay messages (one pub/sub message each, many items) by direction", ["direction"]
)
RELAY_ITEMS = Counter(
    "sessiond_relay_items_total", "Frames and requests relayed between pods, by direction", ["direction"]
)
RELAY_GAPS = Counter(
    "sessiond_relay_gaps_total", "Relay links cut because messages were lost (a sequence gap, or the subscription)"
)
for _reason in ("rebalance", "drain", "lease_lost"):
    MOVES.labels(_reason)
for _result in ("ok", "lost", "error"):
    LEASE_RENEWALS.labels(_result)
for _direction in ("in", "out"):
    RELAY_MESSAGES.labels(_direction)
    RELAY_ITEMS.labels(_direction)
