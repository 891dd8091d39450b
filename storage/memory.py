"""In-memory storage: tests, and the journal of the embedded default.

The journal lives outside the actor, so a crashed actor restarts from snapshot + journal even
without Redis; only a process crash loses what the last SQLite snapshot did not hold (README).
"""

from __future__ import annotations

import base64
from collections import defaultdict, deque
from collections.abc import Sequence

from storage.ports import JSON, Change, SessionRecord, Snapshot, Storage

MAX_EVENTS = 10_000


class MemorySessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self.users: set[str] = set()

    async def create_session(self, record: SessionRecord) -> None:
        if record.id in self._sessions:
            raise ValueError(f"session {record.id} exists")
        self._sessions[record.id] = record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    async def list_sessions(
        self, owner: str, limit: int, cursor: str | None
    ) -> tuple[list[SessionRecord], str | None]:
        mine = sorted(
            (r for r in self._sessions.values() if r.owner == owner),
            key=lambda r: (r.created_at, r.id),
            reverse=True,
        )
        if cursor is not None:
            after = decode_cursor(cursor)
            mine = [r for r in mine if (r.created_at, r.id) < after]
        page = mine[:limit]
        more = len(mine) > limit
        return page, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None

    async def update_session(self, record: SessionRecord) -> None:
        if record.id in self._sessions:
            self._sessions[record.id] = record

    async def record_user(self, subject: str) -> None:
        self.users.add(subject)


def encode_cursor(created_at: float, session_id: str) -> str:
    """Opaque keyset cursor shared by every SessionStore backend."""
    return base64.urlsafe_b64encode(f"{created_at!r}|{session_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises ValueError on a cursor we did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, session_id = raw.partition("|")
        return float(created), session_id
    except Exception as exc:
        raise ValueError("bad cursor") from exc


class MemorySnapshotStore:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        old = self._snapshots.get(snapshot.session_id)
        if old is None or old.version <= snapshot.version:
            self._snapshots[snapshot.session_id] = snapshot

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        return self._snapshots.get(session_id)

    async def delete_snapshots(self, session_id: str) -> None:
        self._snapshots.pop(session_id, None)


class MemoryJournal:
    def __init__(self) -> None:
        self._changes: dict[str, list[Change]] = defaultdict(list)

    async def append(self, session_id: str, changes: Sequence[Change]) -> None:
        self._changes[session_id].extend(changes)

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        return [c for c in self._changes.get(session_id, ()) if c.version > version]

    async def trim(self, session_id: str, upto_version: int) -> None:
        kept = [c for c in self._changes.get(session_id, ()) if c.version > upto_version]
        if kept:
            self._changes[session_id] = kept
        else:
            self._changes.pop(session_id, None)

    async def delete(self, session_id: str) -> None:
        self._changes.pop(session_id, None)


class MemoryEventSink:
    """Keeps the latest events (bounded) so tests can look at them."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self.events: deque[tuple[str, dict[str, JSON]]] = deque(maxlen=limit)

    def publish(self, routing_key: str, body: dict[str, JSON]) -> None:
        self.events.append((routing_key, body))


def memory_storage() -> Storage:
    return Storage(
        sessions=MemorySessionStore(),
        snapshots=MemorySnapshotStore(),
        journal=MemoryJournal(),
        events=MemoryEventSink(),
    )
