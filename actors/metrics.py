"""Prometheus metrics of the actor layer. Labels are bounded: no session or device ids (DESIGN §4), except the
busiest few actors (`HotActorsCollector`: at most 4 x SESSIOND_HOT_ACTORS sessions, chosen at scrape time).

Per-actor figures for every actor are in `/v1/admin/actors`; here they are aggregated.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from typing import NamedTuple

import trio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ACTORS_LIVE = Gauge("sessiond_actors_live", "Session actors currently active on this pod")
ACTIVATIONS = Counter("sessiond_actor_activations_total", "Session actors activated")
PASSIVATIONS = Counter(
    "sessiond_actor_passivations_total", "Session actors passivated, by reason (idle time, memory budget)", ["reason"]
)
ACTOR_STATE_BYTES = Gauge(
    "sessiond_actor_state_bytes",
    "Estimated bytes held by live actors on this pod, as the memory budget counts them (state, replay window, "
    "their devices' send queues here, their in-process journal entries)",
)
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


# ---- the busiest actors, with a `session` label (bounded: chosen at scrape time) --------------------------------


class HotRow(NamedTuple):
    """One live actor's figures at scrape time."""

    session: str
    changes_per_s: float
    devices: int
    mailbox_depth: int
    state_bytes: int


HOT_DIMENSIONS = ("changes_per_s", "mailbox_depth", "devices", "state_bytes")
HOT_SELECTION = (
    "exported for the union of the top K actors of this pod (SESSIOND_HOT_ACTORS) by each of changes/s, mailbox "
    "depth, devices and state bytes (a zero never qualifies), so at most 4K sessions; the others only in aggregates"
)


def select_hot(rows: Iterable[HotRow], k: int) -> list[HotRow]:
    """The union of the top `k` rows by each dimension (nonzero values only), busiest (changes/s) first.

    A union rather than one ranking: the actor an operator looks for may be busy, stuck (a deep mailbox and no
    changes), crowded or large, and each of those alone must be enough to show it.
    """
    if k <= 0:
        return []
    rows = list(rows)
    chosen: dict[str, HotRow] = {}
    for dimension in HOT_DIMENSIONS:
        value = attrgetter(dimension)
        ranked = [row for row in rows if value(row) > 0]
        for row in heapq.nlargest(k, ranked, key=lambda r: (value(r), r.session)):
            chosen[row.session] = row
    return sorted(chosen.values(), key=lambda r: (-r.changes_per_s, -r.mailbox_depth, -r.devices, -r.state_bytes,
                                                   r.session))


class _HotSource(NamedTuple):
    k: int
    rows: Callable[[], list[HotRow]]  # called on the trio thread that owns the actors
    token: trio.lowlevel.TrioToken


class HotActorsCollector(Collector):
    """`sessiond_hot_actor_*{session}` for the busiest actors of each attached registry, computed per scrape.

    A scrape runs in a worker thread (api/app.py keeps `generate_latest` off the trio loop); the actors belong to
    the trio thread, so their figures are read there (`trio.from_thread`) and only ranked here. Nothing is kept
    between scrapes: a session that left the top K has no series in the next scrape.
    """

    def __init__(self) -> None:
        self._sources: dict[int, _HotSource] = {}

    def attach(self, owner: object, k: int, rows: Callable[[], list[HotRow]]) -> None:
        """Called from the trio thread of `owner` (a Registry)."""
        self._sources[id(owner)] = _HotSource(k, rows, trio.lowlevel.current_trio_token())

    def detach(self, owner: object) -> None:
        self._sources.pop(id(owner), None)

    def describe(self) -> list[Metric]:
        return []  # names are dynamic (none when disabled): skip the registry's collect-on-register check

    def collect(self) -> Iterator[Metric]:
        sources = [source for source in list(self._sources.values()) if source.k > 0]
        if not sources:
            return
        families = (
            GaugeMetricFamily(
                "sessiond_hot_actor_changes_per_second",
                "Changes per second of a busy actor, an exponentially weighted average over about 5 s; "
                + HOT_SELECTION,
                labels=["session"],
            ),
            GaugeMetricFamily(
                "sessiond_hot_actor_mailbox_depth", "Messages waiting in a busy actor's mailbox; " + HOT_SELECTION,
                labels=["session"],
            ),
            GaugeMetricFamily(
                "sessiond_hot_actor_devices", "Devices connected to a busy actor (any pod); " + HOT_SELECTION,
                labels=["session"],
            ),
            GaugeMetricFamily(
                "sessiond_hot_actor_state_bytes",
                "Estimated state bytes (state + replay window) of a busy actor; " + HOT_SELECTION,
                labels=["session"],
            ),
        )
        for source in sources:
            for row in select_hot(_read_on_trio(source), source.k):
                for family, dimension in zip(families, HOT_DIMENSIONS, strict=True):
                    family.add_metric([row.session], getattr(row, dimension))
        yield from families


def _read_on_trio(source: _HotSource) -> list[HotRow]:
    """The source's rows, read on its trio thread (directly when we are on it); none once its loop is gone."""
    try:
        here = trio.lowlevel.current_trio_token()
    except RuntimeError:
        here = None
    if here is source.token:
        return source.rows()
    try:
        return trio.from_thread.run_sync(source.rows, trio_token=source.token)
    except (trio.RunFinishedError, RuntimeError):  # the loop ended, or we are on another trio loop's thread
        return []


HOT_ACTORS = HotActorsCollector()
REGISTRY.register(HOT_ACTORS)

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
