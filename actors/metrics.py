"""Prometheus metrics of the actor layer. Labels are bounded: no session or device ids (DESIGN §4).

Per-actor figures are in `/v1/admin/actors`; here they are aggregated as histograms.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTORS_LIVE = Gauge("sessiond_actors_live", "Session actors currently active on this pod")
ACTIVATIONS = Counter("sessiond_actor_activations_total", "Session actors activated")
PASSIVATIONS = Counter(
    "sessiond_actor_passivations_total", "Session actors passivated, by reason (idle time, memory budget)", ["reason"]
)
ACTOR_STATE_BYTES = Gauge("sessiond_actor_state_bytes", "Estimated state bytes held by live actors on this pod")
CRASHES = Counter("sessiond_actor_crashes_total", "Exceptions that crashed a session actor")
FAILED = Counter("sessiond_actor_failed_total", "Sessions whose actor spent its restart budget")
CHANGES = Counter("sessiond_changes_total", "Changes accepted (one version step each)")
REJECTED = Counter("sessiond_requests_rejected_total", "Requests refused by a session actor", ["code"])
TURN_MESSAGES = Histogram(
    "sessiond_actor_turn_messages",
    "Messages handled per actor turn (group commit size)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MAILBOX_DEPTH = Histogram(
    "sessiond_actor_mailbox_depth",
    "Mailbox depth seen at the start of each actor turn",
    buckets=(0, 1, 4, 16, 64, 256, 1024, 4096),
)
JOURNAL_SECONDS = Histogram(
    "sessiond_journal_write_seconds",
    "Time to write one turn's changes to the journal",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
)
CHECKPOINT_SECONDS = Histogram(
    "sessiond_checkpoint_seconds",
    "Time to write one snapshot checkpoint, by tier (fast: Redis, durable: PostgreSQL / SQLite)",
    ["tier"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
CHECKPOINT_FAILURES = Counter("sessiond_checkpoint_failures_total", "Checkpoints that failed (retried later)")
SLOW_CONSUMERS = Counter(
    "sessiond_slow_consumer_total", "Send queue overflows", ["action"]
)  # action: resync | disconnect
