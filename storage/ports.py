"""The narrow storage interfaces the actors and the API need (DESIGN §1, §5).

Every backend (memory, SQLite, Redis, PostgreSQL) implements these Protocols, and one conformance
suite in tests/storage runs against each of them. Records are plain frozen dataclasses so they
cross the asyncio bridge and thread boundaries as data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

JSON = Any


class StorageUnavailable(RuntimeError):
    """A backend cannot be reached right now; the caller may retry later."""


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
    # Idempotency table: device id -> list of [op id, version] most recent last (bounded by the actor).
    acked: dict[str, list[list[int]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Change:
    """One accepted change, as journaled: the ops that took the session from version-1 to version."""

    version: int
    device: str
    op_id: int | None
    ops: list[dict[str, JSON]]
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

    async def update_session(self, record: SessionRecord) -> None: ...

    async def record_user(self, subject: str) -> None:
        """Note a JWT `sub` on first sight (idempotent)."""
        ...


class SnapshotStore(Protocol):
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep the snapshot unless a newer version is already stored."""
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


class Journal(Protocol):
    """The per-session change log. Implementations bound their own I/O time (socket / command timeouts) and
    raise StorageUnavailable when it runs out: the actor awaits `append` on every turn without a timeout of its own."""

    async def append(self, session_id: str, changes: Sequence[Change]) -> None:
        """Durably add changes in order (one round trip for the whole batch)."""
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


@dataclass(frozen=True, slots=True)
class Storage:
    """The set of backends the composition root hands to the registry and the API."""

    sessions: SessionStore
    snapshots: SnapshotStore
    journal: Journal
    events: EventSink
    health: Sequence[Health] = ()
