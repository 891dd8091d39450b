"""The narrow storage interfaces the actors and the API need (DESIGN §1, §5).

Every backend (memory, SQLite, Redis, PostgreSQL) implements these Protocols, and one conformance
suite in tests/storage runs against each of them. Records are plain frozen dataclasses so they
cross the asyncio bridge and thread boundaries as data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

JSON = Any


class StorageError(Exception):
    """Base of every error a storage backend raises on purpose (never counted as an actor crash)."""


class StorageUnavailable(StorageError):
    """A backend cannot be reached right now; the caller may retry later."""


class JournalFull(StorageUnavailable):
    """A session's journal reached its cap: snapshots (which trim it) have stopped."""


MAX_JOURNAL_ENTRIES = 10_000  # per session, in every journal backend


class DurabilitySwitchRefused(StorageError):
    """The durability mode changed while the previous mode's journal may still hold acked changes."""


class Fenced(StorageError):
    """A write carried a fencing token older than the session's: another pod owns the session now (DESIGN §6).

    The writer must stop serving the session at once; retrying cannot help.
    """


class VersionConflict(StorageError):
    """An append reused a version that holds a different change (a stale writer)."""


class JournalRefused(StorageError):
    """`append_many`: some sessions' batches were refused; the others were written."""

    def __init__(self, errors: Mapping[str, Exception]) -> None:
        super().__init__(f"journal append refused for {sorted(errors)}")
        self.errors = dict(errors)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Session metadata as kept in the metadata store (the state lives in snapshots)."""

    id: str
    owner: str
    name: str
    metadata: dict[str, JSON]
    status: str  # "active" | "paused" | "ended"
    version: int
    active: str | None
    created_at: float  # unix seconds
    updated_at: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything needed to rebuild a session actor at `version` (journal entries after it replay on top)."""

    session_id: str
    version: int
    state: dict[str, JSON]
    status: str
    active: str | None
    # Idempotency table: device id -> list of [op id, version] most recent last (bounded by the actor); the last
    # pair of a device is its high-water mark (op ids only grow per device, DESIGN §3). Pairs are tuples when the
    # actor took the snapshot (cheaper to build), lists when read back from JSON; both are written as JSON arrays.
    acked: dict[str, Sequence[Sequence[int]]] = field(default_factory=dict)
    # The fencing token of the writer (the session's epoch when it was taken). A store refuses it (Fenced) when
    # the session's fence is newer; 0 is the token of a session that no pod has owned yet (its creation).
    epoch: int = 0


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class Change:
    """One accepted change, as journaled: the ops that took the session from version-1 to version."""

    version: int
    device: str
    op_id: int | None
    ops: list[dict[str, JSON]]
    # The ops' encoded size when the actor knows it (an upper bound: the frame's length); 0: not known. Not
    # stored by any backend: the in-memory journal counts its bytes with it.
    size: int = field(default=0, compare=False)
    # Handoff (pause/claim) changes `active`/`status`, not the version: it writes a snapshot instead.


class SessionStore(Protocol):
    """Session metadata and users."""

    async def create_session(self, record: SessionRecord) -> None: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def list_sessions(
        self, owner: str, limit: int, cursor: str | None
    ) -> tuple[list[SessionRecord], str | None]:
        """Newest first (created_at desc, id desc); `cursor` is opaque, returned as `next`."""
        ...

    async def count_sessions(self, owner: str) -> int:
        """How many sessions `owner` has that are not ended (the per-user quota)."""
        ...

    async def update_session(self, record: SessionRecord, token: int = 0) -> None:
        """Replace an existing record (a missing one stays missing); Fenced when the session's fence > token."""
        ...

    async def fence(self, session_id: str, token: int) -> int:
        """Raise the session's fence to `token` (never lowers it) and return the fence now in force.

        A result above `token` means a newer owner existed (the lease counter was lost): take a higher token.
        Returns `token` for an unknown session.
        """
        ...

    async def record_user(self, subject: str) -> None:
        """Note a JWT `sub` on first sight (idempotent)."""
        ...

    async def get_marker(self, key: str) -> str | None:
        """A deployment-wide fact kept with the sessions (e.g. the durability mode of the last start)."""
        ...

    async def set_marker(self, key: str, value: str) -> None: ...


class SnapshotStore(Protocol):
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep the snapshot unless a newer version is already stored; Fenced when the session's fence is newer
        than `snapshot.epoch`."""
        ...

    async def load_snapshot(self, session_id: str) -> Snapshot | None: ...

    async def delete_snapshots(self, session_id: str) -> None: ...


async def save_durable(store: SnapshotStore, snapshot: Snapshot) -> None:
    """Write to the durable tier of a tiered store (`save_durable`), or to a single-tier store itself."""
    durable = getattr(store, "save_durable", None)
    if durable is not None:
        await durable(snapshot)
    else:
        await store.save_snapshot(snapshot)


async def save_durable_checkpoint(storage: Storage, snapshot: Snapshot, record: SessionRecord, token: int) -> None:
    """A durable checkpoint: the snapshot to the durable tier, then the session record (fenced by `token`).

    When both live in one database that can take them in one write (`joint_checkpoint_writer`: the SQLite file),
    they go in one transaction and one thread hop instead of two of each: a pause waits for this before its ack.
    A fenced record then also refuses the snapshot (the two are written together or not at all).
    """
    finder = getattr(storage.snapshots, "joint_checkpoint_writer", None)
    joint = finder(storage.sessions) if finder is not None else None
    if joint is not None:
        await joint(snapshot, record, token)
        return
    await save_durable(storage.snapshots, snapshot)
    await storage.sessions.update_session(record, token)


class Journal(Protocol):
    """The per-session change log. Implementations bound their own I/O time (socket / command timeouts) and
    raise StorageUnavailable when it runs out: the actor awaits `append` on every turn without a timeout of its own."""

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        """Durably add changes in order (one round trip for the whole batch); Fenced (nothing written) when the
        session's fence is newer than `token`."""
        ...

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        """Changes with version > `version`, in order."""
        ...

    async def trim(self, session_id: str, upto_version: int) -> None:
        """Forget changes with version <= upto_version (a snapshot covers them)."""
        ...

    async def delete(self, session_id: str) -> None: ...


class EventSink(Protocol):
    def publish(self, routing_key: str, body: dict[str, JSON]) -> None:
        """Queue a lifecycle event (DESIGN §7); never blocks, never raises."""
        ...


class Health(Protocol):
    async def ping(self) -> None:
        """Raise StorageUnavailable when the backend cannot serve."""
        ...


# ---- the cluster (DESIGN §6) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """A live pod as the membership list shows it."""

    pod: str
    leaving: bool = False  # draining: still serving what it holds, placed nothing new
    shareable: bool = True  # uses only shared storage (an embedded store cannot join a cluster)
    started_at: float = 0.0


class LeaseHeld(StorageError):
    """Another pod holds the session's lease."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"the session's lease is held by pod {holder}")
        self.holder = holder


class Leases(Protocol):
    """Per-session ownership with a fencing token that only grows (the session's epoch)."""

    async def acquire(self, session_id: str, pod: str, ttl_s: float, floor: int = 0) -> int:
        """Take the lease (free, or already this pod's) and return a new token > every earlier one and > floor.

        Raises LeaseHeld when another pod holds it.
        """
        ...

    async def renew(self, held: Mapping[str, int], pod: str, ttl_s: float) -> set[str]:
        """Extend every lease in `held` (session -> token) in one batch; returns the sessions no longer ours."""
        ...

    async def release(self, session_id: str, pod: str, token: int) -> None:
        """Give the lease up if it is still ours with this token (a no-op otherwise)."""
        ...


class Membership(Protocol):
    async def heartbeat(self, member: Member, ttl_s: float) -> list[Member]:
        """Register (or refresh) `member` for `ttl_s` and return every live member, this one included."""
        ...

    async def leave(self, pod: str) -> None:
        """Drop `pod` from the list at once (a clean exit does not wait for the TTL)."""
        ...


class Subscription(Protocol):
    async def receive(self) -> tuple[list[bytes], bool]:
        """The next messages, and whether some may have been lost before them (a gap: the link must resync)."""
        ...


class PubSub(Protocol):
    """One channel per pod: at-most-once, ordered per publisher (TRAPS: anything relayed needs sequence numbers)."""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send (pod, payload) pairs in this order, in one round trip."""
        ...

    def subscribe(self, pod: str) -> AbstractAsyncContextManager[Subscription]:
        """Receive what is published to `pod` while the context is open."""
        ...


@dataclass(frozen=True, slots=True)
class Storage:
    """The set of backends the composition root hands to the registry and the API."""

    sessions: SessionStore
    snapshots: SnapshotStore
    journal: Journal
    events: EventSink
    health: Sequence[Health] = ()
    # The cluster's coordination (Redis when configured). None: the embedded, single-pod defaults.
    leases: Leases | None = None
    membership: Membership | None = None
    pubsub: PubSub | None = None
    shareable: bool = False  # every store above can be shared by several pods (no embedded journal or file)
