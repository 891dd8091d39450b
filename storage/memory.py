"""In-memory storage: tests, and the journal of the embedded default.

The journal lives outside the actor, so a crashed actor restarts from snapshot + journal even
without Redis; only a process crash loses what the last SQLite snapshot did not hold (README).
"""

from __future__ import annotations

import base64
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import orjson
import trio

from protocol.codec import dumps_kept
from storage.ports import (
    JSON,
    MAX_JOURNAL_ENTRIES,
    Change,
    Fenced,
    JournalFull,
    LeaseHeld,
    Member,
    SessionRecord,
    Snapshot,
    Storage,
)

MAX_EVENTS = 10_000
MAX_MEMORY_JOURNAL_BYTES = 64 << 20  # per session: 1000 versions (a checkpoint's interval) of 64 KiB frames fit


class Fences:
    """The per-session fencing tokens of one process's embedded stores (DESIGN §6): `fence` raises one, every
    write checks it. One object is shared by the stores of one Storage, like a database shares its rows."""

    def __init__(self) -> None:
        self._fences: dict[str, int] = {}

    def raise_to(self, session_id: str, token: int) -> int:
        current = max(self._fences.get(session_id, 0), token)
        self._fences[session_id] = current
        return current

    def check(self, session_id: str, token: int) -> None:
        current = self._fences.get(session_id, 0)
        if current > token:
            raise Fenced(f"session {session_id}: token {token} is older than the fence {current}")

    def forget(self, session_id: str) -> None:
        self._fences.pop(session_id, None)


class MemorySessionStore:
    def __init__(self, fences: Fences | None = None) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self.users: set[str] = set()
        self.markers: dict[str, str] = {}
        self.fences = fences or Fences()

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

    async def count_sessions(self, owner: str) -> int:
        return sum(1 for r in self._sessions.values() if r.owner == owner and r.status != "ended")

    async def update_session(self, record: SessionRecord, token: int = 0) -> None:
        if record.id in self._sessions:
            self.fences.check(record.id, token)
            self._sessions[record.id] = record

    async def fence(self, session_id: str, token: int) -> int:
        return self.fences.raise_to(session_id, token)

    async def record_user(self, subject: str) -> None:
        self.users.add(subject)

    async def get_marker(self, key: str) -> str | None:
        return self.markers.get(key)

    async def set_marker(self, key: str, value: str) -> None:
        self.markers[key] = value


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
    def __init__(self, fences: Fences | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self.fences = fences or Fences()

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self.fences.check(snapshot.session_id, snapshot.epoch)
        old = self._snapshots.get(snapshot.session_id)
        if old is None or old.version <= snapshot.version:
            self._snapshots[snapshot.session_id] = snapshot

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        return self._snapshots.get(session_id)

    async def delete_snapshots(self, session_id: str) -> None:
        self._snapshots.pop(session_id, None)


class VolatileSnapshotStore(MemorySnapshotStore):
    """Snapshots in this process's memory: the fast tier of the embedded default (durability `memory`), where a
    handoff's snapshot must survive an actor crash as the in-process journal does, and needs no thread hop to the
    SQLite file. It survives nothing more than that journal does; the durable tier catches up within a checkpoint
    period, and `forget_upto` then lets each snapshot go (DESIGN §5.2, §5.5)."""

    volatile = True

    def forget_upto(self, session_id: str, version: int) -> None:
        """A durable snapshot at `version`, taken after this one, is stored: this one is no longer needed."""
        held = self._snapshots.get(session_id)
        if held is not None and held.version <= version:
            del self._snapshots[session_id]

    def holds(self, session_id: str) -> bool:
        return session_id in self._snapshots


class _Held:
    """One session's journal entries as parallel lists of atomic values (versions, each change encoded, sizes):
    ints and bytes are not tracked by the cyclic GC."""

    __slots__ = ("entries", "sizes", "total", "versions")

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.entries: list[bytes] = []  # [device, op id, ops] as JSON
        self.sizes: list[int] = []
        self.total = 0

    def drop_upto(self, version: int) -> None:
        kept = [i for i, v in enumerate(self.versions) if v > version]
        if len(kept) == len(self.versions):
            return
        self.versions = [self.versions[i] for i in kept]
        self.entries = [self.entries[i] for i in kept]
        self.sizes = [self.sizes[i] for i in kept]
        self.total = sum(self.sizes)


class MemoryJournal:
    """Bounded like the others (`max_entries` per session), and in bytes too (`max_bytes` per session, since
    its entries are this process's memory): while checkpoints fail it must not grow for good. `session_bytes`
    lets the memory budget count a session's entries with its actor.

    Entries are kept encoded (`_Held`): thousands of held Change objects with their ops lists and dicts made the
    cyclic GC's young collections long and frequent, the pauses behind the delivery tail (issue 9).
    """

    def __init__(
        self,
        fences: Fences | None = None,
        max_entries: int = MAX_JOURNAL_ENTRIES,
        max_bytes: int = MAX_MEMORY_JOURNAL_BYTES,
    ) -> None:
        self._held: dict[str, _Held] = {}
        self.fences = fences or Fences()
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    @property
    def held_bytes(self) -> int:
        return sum(held.total for held in self._held.values())

    def session_bytes(self, session_id: str) -> int:
        held = self._held.get(session_id)
        return held.total if held is not None else 0

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        self.fences.check(session_id, token)
        held = self._held.get(session_id)
        if held is None:
            held = self._held[session_id] = _Held()
        if len(held.versions) + len(changes) > self.max_entries:
            raise JournalFull(f"in-memory journal of {session_id} is full (checkpoints are failing)")
        # The actor's changes carry their ops' size (from the frame); others (tests, tools) are measured here.
        sizes = [change.size or len(orjson.dumps(change.ops)) for change in changes]
        if held.total + sum(sizes) > self.max_bytes:
            raise JournalFull(
                f"in-memory journal of {session_id} would hold more than {self.max_bytes} bytes "
                "(checkpoints are failing)"
            )
        for change, size in zip(changes, sizes, strict=True):
            held.versions.append(change.version)
            held.entries.append(dumps_kept([change.device, change.op_id, change.ops]))  # exact-size bytes
            held.sizes.append(size)
            held.total += size

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        held = self._held.get(session_id)
        if held is None:
            return []
        changes = []
        for v, entry, size in zip(held.versions, held.entries, held.sizes, strict=True):
            if v > version:
                device, op_id, ops = orjson.loads(entry)
                changes.append(Change(v, device, op_id, ops, size))
        return changes

    in_process = True  # no I/O: a checkpoint trims inline rather than in a task of its own

    async def trim(self, session_id: str, upto_version: int) -> None:
        held = self._held.get(session_id)
        if held is None:
            return
        held.drop_upto(upto_version)
        if not held.versions:
            del self._held[session_id]

    async def delete(self, session_id: str) -> None:
        self._held.pop(session_id, None)
        self.fences.forget(session_id)  # the session ended: nothing may write for it any more (the soak's churn)

    async def holds_changes(self) -> bool:
        return any(held.versions for held in self._held.values())


class MemoryEventSink:
    """Keeps the latest events (bounded) so tests can look at them."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self.events: deque[tuple[str, dict[str, JSON]]] = deque(maxlen=limit)

    def publish(self, routing_key: str, body: dict[str, JSON]) -> None:
        self.events.append((routing_key, body))


def memory_storage() -> Storage:
    fences = Fences()
    return Storage(
        sessions=MemorySessionStore(fences),
        snapshots=MemorySnapshotStore(fences),
        journal=MemoryJournal(fences),
        events=MemoryEventSink(),
        leases=MemoryLeases(),
        membership=MemoryMembership(),
        pubsub=MemoryPubSub(),
        shareable=True,  # shared within one process: several pods of a test share one Storage
    )


# ---- the cluster in one process: the embedded pod's own (a cluster of one), and tests of several pods ----------


class MemoryLeases:
    """Session leases with expiry on the trio clock; tokens grow per session (Leases port).

    The counters live in this process only, so a restarted process starts them above the wall clock in µs at its
    start (`base`): a session's token, which is also its wire epoch, never repeats across restarts. Starting at 1
    again gave a session restored after a crash the epoch of its previous life, and a device resuming with that
    epoch got a replay of versions whose contents had changed (the lost tail), with no error (found by the
    TypeScript SDK's restart test).
    """

    def __init__(self, base: int | None = None) -> None:
        self._leases: dict[str, tuple[str, int, float]] = {}  # session -> (pod, token, expires at)
        # One counter for all sessions: tokens still grow per session, and nothing is kept per session once its
        # lease is gone (a per-session map grew by one entry per session ever seen).
        self._last = time.time_ns() // 1000 if base is None else base

    async def acquire(self, session_id: str, pod: str, ttl_s: float, floor: int = 0) -> int:
        now = trio.current_time()
        held = self._leases.get(session_id)
        if held is not None and held[0] != pod and held[2] > now:
            raise LeaseHeld(held[0])
        token = self._last = max(self._last + 1, floor + 1)
        self._leases[session_id] = (pod, token, now + ttl_s)
        return token

    async def renew(self, held: Mapping[str, int], pod: str, ttl_s: float) -> set[str]:
        now = trio.current_time()
        lost = set()
        for session_id, token in held.items():
            current = self._leases.get(session_id)
            if current is None or current[:2] != (pod, token) or current[2] <= now:
                lost.add(session_id)
            else:
                self._leases[session_id] = (pod, token, now + ttl_s)
        return lost

    async def release(self, session_id: str, pod: str, token: int) -> None:
        current = self._leases.get(session_id)
        if current is not None and current[:2] == (pod, token):
            del self._leases[session_id]


class MemoryMembership:
    def __init__(self) -> None:
        self._members: dict[str, tuple[Member, float]] = {}

    async def heartbeat(self, member: Member, ttl_s: float) -> list[Member]:
        now = trio.current_time()
        self._members[member.pod] = (member, now + ttl_s)
        self._members = {pod: entry for pod, entry in self._members.items() if entry[1] > now}
        return [entry[0] for entry in self._members.values()]

    async def leave(self, pod: str) -> None:
        self._members.pop(pod, None)


class _MemorySubscription:
    def __init__(self, limit: int) -> None:
        self.messages: deque[bytes] = deque()
        self.limit = limit
        self.gap = False
        self.wake = trio.Event()

    def push(self, data: bytes) -> None:
        if len(self.messages) >= self.limit:
            self.gap = True  # a subscriber that falls behind loses messages, as with Redis (TRAPS)
        else:
            self.messages.append(data)
        self.wake.set()

    async def receive(self) -> tuple[list[bytes], bool]:
        while not self.messages and not self.gap:
            await self.wake.wait()
            self.wake = trio.Event()
        items = list(self.messages)
        self.messages.clear()
        gap, self.gap = self.gap, False
        return items, gap


class MemoryPubSub:
    """One in-process channel per pod: at-most-once like Redis pub/sub (nobody subscribed: dropped)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._subscribers: dict[str, _MemorySubscription] = {}
        self._limit = limit

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for pod, payload in messages:
            subscriber = self._subscribers.get(pod)
            if subscriber is not None:
                subscriber.push(payload)
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def subscribe(self, pod: str) -> AsyncIterator[_MemorySubscription]:
        subscription = self._subscribers[pod] = _MemorySubscription(self._limit)
        try:
            yield subscription
        finally:
            if self._subscribers.get(pod) is subscription:
                del self._subscribers[pod]
