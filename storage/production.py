"""Assemble the production Storage from what is configured (DESIGN §1, §5, §9).

- `redis_url`    -> Redis fast snapshots (every handoff / N versions), and the journal with durability `redis`.
- `database_url` -> PostgreSQL sessions, users and durable snapshots (migrations run on start), and the journal
                    with durability `postgres`.
- `amqp_url`     -> RabbitMQ events.
Anything not configured comes from the embedded SQLite storage (sessions, snapshots), the in-memory journal
(durability `memory`) and the in-memory event sink. All asyncio clients share one bridge (one asyncio
thread), owned by this context manager.

Snapshots are always a `LayeredSnapshotStore`: `save_snapshot` writes the fast layer (Redis when configured),
`save_durable` the durable layer (PostgreSQL, else the SQLite file); `load_snapshot` returns the newest of the two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol, cast

import structlog
import trio

from storage.batching import BatchingJournal, ManyJournal
from storage.memory import (
    MemoryEventSink,
    MemoryJournal,
    MemoryLeases,
    MemoryMembership,
    MemoryPubSub,
    VolatileSnapshotStore,
)
from storage.ports import (
    DurabilitySwitchRefused,
    EventSink,
    Health,
    Journal,
    Leases,
    Membership,
    PubSub,
    SessionRecord,
    SessionStore,
    Snapshot,
    SnapshotStore,
    Storage,
    StorageUnavailable,
)

log = structlog.get_logger(__name__)


class ProductionConfig(Protocol):
    """The fields of api.settings.Settings used here (storage must not import api: DESIGN §1 layering)."""

    @property
    def redis_url(self) -> str | None: ...

    @property
    def database_url(self) -> str | None: ...

    @property
    def amqp_url(self) -> str | None: ...

    @property
    def data_dir(self) -> Path: ...


class LayeredSnapshotStore:
    """A fast snapshot layer (Redis) over a durable one (PostgreSQL / SQLite).

    - `save_snapshot`: fast layer only (cheap; called on every handoff and every N versions).
    - `save_durable`: durable layer only (checkpoints every M versions / T s, pause, passivation, shutdown).
      Callers that want both call both; a durable checkpoint never waits on Redis.
    - `load_snapshot`: reads both at once and returns the newer. If only the durable read fails but Redis has a
      snapshot, that one is used (the Redis journal continues from it, so nothing acked is missing); otherwise the
      failure is raised, since an older snapshot could silently lose acked changes.
    - `delete_snapshots`: both layers.
    With a single layer (`fast is durable`) every call goes to it once.

    `fast_optional` (durability=postgres: the durable snapshot plus the PostgreSQL journal are always complete):
    a fast-layer outage is survivable, so a failed fast save writes the durable layer instead and a failed fast
    read falls back to the durable snapshot.
    """

    def __init__(self, fast: SnapshotStore, durable: SnapshotStore, *, fast_optional: bool = False) -> None:
        self.fast = fast
        self.durable = durable
        self.fast_optional = fast_optional and fast is not durable
        # The fast layer is this process's memory (the embedded default): it holds a snapshot only until the
        # durable layer has one as new (`covered`), and dies with the process. (Read on every durable checkpoint.)
        self.volatile = fast is not durable and bool(getattr(fast, "volatile", False))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        try:
            await self.fast.save_snapshot(snapshot)
        except StorageUnavailable as exc:
            if not self.fast_optional:
                raise
            log.warning("fast snapshot store unavailable; saving durably", session=snapshot.session_id, error=str(exc))
            await self.durable.save_snapshot(snapshot)

    async def save_durable(self, snapshot: Snapshot) -> None:
        await self.durable.save_snapshot(snapshot)

    @property
    def tiered(self) -> bool:
        """Two layers: a handoff's snapshot may go to the fast one alone (DESIGN §5.2)."""
        return self.fast is not self.durable

    def covered(self, session_id: str, version: int) -> None:
        """A durable snapshot at `version` is stored, taken after any fast one: a volatile fast layer lets its
        own go (a Redis one keeps it, as other pods read it)."""
        if self.volatile:
            self.fast.forget_upto(session_id, version)  # type: ignore[attr-defined]

    def holds_volatile(self, session_id: str) -> bool:
        """The volatile fast layer holds a snapshot the durable layer has not caught up with."""
        return self.volatile and bool(self.fast.holds(session_id))  # type: ignore[attr-defined]

    @property
    def fast_trims_journal(self) -> bool:
        """The fast layer trims the journal a snapshot covers in the same step (Redis with durability `redis`):
        a separate trim after it would be a second round trip doing nothing."""
        return self.fast is not self.durable and bool(getattr(self.fast, "trim_journal", False))

    def joint_checkpoint_writer(
        self, sessions: SessionStore
    ) -> Callable[[Snapshot, SessionRecord, int], Awaitable[None]] | None:
        """The durable layer's joint snapshot + record write, when it has one for `sessions` (ports)."""
        finder = getattr(self.durable, "joint_checkpoint_writer", None)
        return finder(sessions) if finder is not None else None

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        if self.fast is self.durable:
            return await self.fast.load_snapshot(session_id)
        if self.volatile:  # this process's memory: no I/O to overlap, no tasks to start (every activation reads)
            held = await self.fast.load_snapshot(session_id)
            try:
                stored = await self.durable.load_snapshot(session_id)
            except StorageUnavailable:
                if held is None:
                    raise
                log.warning("durable snapshot store unavailable; using the volatile layer", session=session_id)
                return held
            return stored if held is None or (stored is not None and stored.version > held.version) else held
        found: dict[str, Snapshot | StorageUnavailable | None] = {}

        async def read(name: str, store: SnapshotStore) -> None:
            try:
                found[name] = await store.load_snapshot(session_id)
            except StorageUnavailable as exc:
                found[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "fast", self.fast)
            nursery.start_soon(read, "durable", self.durable)
        fast, durable = found["fast"], found["durable"]
        if isinstance(fast, StorageUnavailable):
            if not self.fast_optional or isinstance(durable, StorageUnavailable):
                raise fast
            log.warning("fast snapshot store unavailable; using the durable layer", session=session_id)
            return durable
        if isinstance(durable, StorageUnavailable):
            if fast is None:
                raise durable
            log.warning("durable snapshot store unavailable; using the fast layer", session=session_id)
            return fast
        if fast is None or (durable is not None and durable.version > fast.version):
            return durable
        return fast

    async def delete_snapshots(self, session_id: str) -> None:
        await self.fast.delete_snapshots(session_id)
        if self.durable is not self.fast:
            await self.durable.delete_snapshots(session_id)


def _memory_layered(durable: SnapshotStore, journal: Journal, mode: str) -> LayeredSnapshotStore:
    """Without Redis: with the in-process journal (durability `memory`), a volatile fast layer in this process's
    memory over the durable one, so a handoff's snapshot is as safe as the journal beside it without a trip to the
    durable store; otherwise (`postgres`: every handoff is durable) the durable layer alone."""
    if mode == "memory" and isinstance(journal, MemoryJournal):
        return LayeredSnapshotStore(VolatileSnapshotStore(journal.fences), durable)
    return LayeredSnapshotStore(durable, durable)


DURABILITY_MODES = ("memory", "redis", "postgres")
DURABILITY_MARKER = "durability"


class ChangeHolder(Protocol):
    async def holds_changes(self) -> bool: ...


async def check_durability_switch(
    sessions: SessionStore, mode: str, journals: dict[str, ChangeHolder], *, allow: bool = False
) -> None:
    """Refuse to start in a durability mode other than the last one while that one's journal may still hold
    acked changes: recovery reads only the journal of the current mode, so they would silently vanish.

    A clean stop (SIGTERM) checkpoints every session durably and trims its journal, after which switching is safe.
    `allow` (SESSIOND_ALLOW_DURABILITY_SWITCH) switches anyway, with a warning.
    """
    previous = await sessions.get_marker(DURABILITY_MARKER)
    if previous is not None and previous != mode and previous != "memory":
        old = journals.get(previous)
        if old is None:
            why = f"its journal ({previous}) is not configured now, so it cannot be checked"
        elif await old.holds_changes():
            why = f"the {previous} journal still holds changes that no durable snapshot covers"
        else:
            why = None
        if why is not None:
            message = (
                f"the last start used SESSIOND_DURABILITY={previous}, this one {mode}, and {why}. Start once more "
                f"with SESSIOND_DURABILITY={previous} and stop with SIGTERM (it checkpoints and trims the journal), "
                f"or set SESSIOND_ALLOW_DURABILITY_SWITCH=1 to switch anyway and lose them"
            )
            if not allow:
                raise DurabilitySwitchRefused(message)
            log.warning("durability switched anyway", problem=message)
    if previous != mode:
        await sessions.set_marker(DURABILITY_MARKER, mode)


def resolve_durability(settings: ProductionConfig, durability: str | None = None) -> str:
    """The journal mode: the argument, else `settings.durability`, else redis with Redis configured, else memory.

    Raises ValueError for an unknown mode or one whose backend is not configured.
    """
    mode = durability if durability is not None else getattr(settings, "durability", None)
    if mode is None:
        return "redis" if settings.redis_url else "memory"
    if mode not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, not {mode!r}")
    if mode == "redis" and not settings.redis_url:
        raise ValueError("durability 'redis' needs a Redis URL (SESSIOND_REDIS_URL)")
    if mode == "postgres" and not settings.database_url:
        raise ValueError("durability 'postgres' needs a database URL (SESSIOND_DATABASE_URL)")
    return mode


@asynccontextmanager
async def open_production_storage(
    settings: ProductionConfig, *, key_prefix: str = "sessiond:", durability: str | None = None
) -> AsyncIterator[Storage]:
    """The Storage for `settings`; opens (and on exit closes) every backend and the shared bridge.

    `durability` (else `settings.durability`) picks the journal, i.e. when an op is acked: `redis` (the Redis
    stream), `postgres` (committed in PostgreSQL; Redis, if configured, only holds fast snapshots, and the
    PostgreSQL journal is trimmed no further than the durable snapshot) or `memory` (in process).
    """
    mode = resolve_durability(settings, durability)
    async with AsyncExitStack() as stack:
        uses_bridge = bool(settings.redis_url or settings.database_url or settings.amqp_url)
        embedded: Storage | None = None
        if not settings.database_url:
            from storage.sqlite import open_sqlite_storage  # lazily: only when something falls back to it

            embedded = await stack.enter_async_context(open_sqlite_storage(settings.data_dir))
        allow_switch = bool(getattr(settings, "allow_durability_switch", False))
        if not uses_bridge:
            assert embedded is not None
            await check_durability_switch(embedded.sessions, mode, {}, allow=allow_switch)
            yield Storage(
                sessions=embedded.sessions,
                snapshots=_memory_layered(embedded.snapshots, embedded.journal, mode),
                journal=embedded.journal,
                events=embedded.events,
                health=embedded.health,
                leases=embedded.leases,
                membership=embedded.membership,
                pubsub=embedded.pubsub,
                shareable=False,
            )
            return

        from storage.bridge import open_bridge

        bridge = await stack.enter_async_context(open_bridge())
        health: list[Health] = []
        sessions: SessionStore
        durable: SnapshotStore
        journal: Journal = embedded.journal if embedded is not None else MemoryJournal()
        events: EventSink
        leases: Leases = MemoryLeases()
        membership: Membership = MemoryMembership()
        pubsub: PubSub = MemoryPubSub()
        if settings.database_url:
            from storage.postgres import open_postgres

            pg = await stack.enter_async_context(
                open_postgres(bridge, settings.database_url, clamp_journal_trim=bool(settings.redis_url))
            )
            sessions, durable = pg.sessions, pg.snapshots
            health.append(pg.health)
            if mode == "postgres":
                journal = pg.journal
            elif isinstance(journal, MemoryJournal):
                pg.sessions.mirror = journal.fences  # the in-process journal is fenced like the rest
        else:
            assert embedded is not None
            sessions, durable = embedded.sessions, embedded.snapshots
            health.extend(embedded.health)
        if settings.redis_url:
            from storage.redis_store import open_redis

            rd = await stack.enter_async_context(
                open_redis(bridge, settings.redis_url, prefix=key_prefix, trim_journal_on_snapshot=mode == "redis")
            )
            snapshots = LayeredSnapshotStore(rd.snapshots, durable, fast_optional=mode == "postgres")
            if mode != "postgres":  # there Redis only holds optional fast snapshots: not a readiness condition
                health.append(rd.health)
            if mode == "redis":
                journal = rd.journal
            # With Redis every pod is a member of the cluster, even alone (DESIGN §6: one code path).
            from storage.redis_cluster import RedisLeases, RedisMembership, RedisPubSub

            leases, membership, pubsub = RedisLeases(rd.client), RedisMembership(rd.client), RedisPubSub(rd.client)
        else:
            snapshots = _memory_layered(durable, journal, mode)
        if settings.amqp_url:
            from storage.amqp import open_amqp_events

            events = await stack.enter_async_context(open_amqp_events(bridge, settings.amqp_url))
        else:
            events = embedded.events if embedded is not None else MemoryEventSink()
        journals: dict[str, ChangeHolder] = {}
        if settings.database_url:
            journals["postgres"] = pg.journal
        if settings.redis_url:
            journals["redis"] = rd.journal
        await check_durability_switch(sessions, mode, journals, allow=allow_switch)
        if mode in ("redis", "postgres"):
            # Cross-session group commit: one round trip for every actor waiting (storage/batching.py).
            batching = BatchingJournal(cast(ManyJournal, journal))
            tasks = await stack.enter_async_context(trio.open_nursery())
            stack.callback(tasks.cancel_scope.cancel)  # runs first on exit: stop the flusher, then close the nursery
            tasks.start_soon(batching.run)
            journal = batching
        # Shareable by several pods: nothing embedded (the SQLite file, the in-memory journal) holds session data.
        shareable = bool(settings.database_url) and mode in ("redis", "postgres")
        yield Storage(
            sessions=sessions,
            snapshots=snapshots,
            journal=journal,
            events=events,
            health=tuple(health),
            leases=leases,
            membership=membership,
            pubsub=pubsub,
            shareable=shareable,
        )
