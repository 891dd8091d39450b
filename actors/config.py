"""The actor-side slice of the settings (actors do not import api.settings: DESIGN §1 layering)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ActorConfig:
    mailbox_size: int = 4096
    replay_window: int = 1000
    max_state_bytes: int = 1 << 20
    passivate_after_s: float = 300.0
    dormant_after_s: float = 2.0  # idle this long, an actor gives its task back until its next message
    checkpoint_every_versions: int = 1000  # durable checkpoint (PostgreSQL / SQLite) every M versions ...
    checkpoint_every_s: float = 5.0  # ... or T seconds when changed
    fast_snapshot_every_versions: int | None = None  # tiered stores (Redis): a fast snapshot every N versions
    # Every handoff snapshot to the durable tier too (durability=postgres: an acked claim must survive losing Redis).
    durable_handoffs: bool = False
    max_restarts: int = 10
    restart_window_s: float = 60.0
    storage_timeout_s: float = 5.0
    memory_budget_bytes: int = 512 << 20  # state bytes of all live actors; idle ones beyond it are passivated
    max_devices: int = 64  # devices one session may have connected at once (a quota: the next one is refused)
    hot_actors: int = 20  # K: the busiest K actors by each dimension get per-session metrics (0: none)
