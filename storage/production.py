"""Assemble the production Storage from what is configured (DESIGN §1, §5, §9).

- `redis_url`    -> Redis journal + fast snapshots (every handoff / N versions).
- `database_url` -> PostgreSQL sessions, users and durable snapshots (migrations run on start).
- `amqp_url`     -> RabbitMQ events.
Anything not configured comes from the embedded SQLite storage (sessions, snapshots) and its in-memory journal
and event sink. All asyncio clients share one bridge (one asyncio thread), owned by this context manager.

Snapshots are always a `LayeredSnapshotStore`: `save_snapshot` writes the fast layer (Redis when configured),
`save_durable` the durable layer (PostgreSQL, else the SQLite file); `load_snapshot` returns the newest of the two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol

import structlog
import trio

from storage.ports import (
    EventSink,
    Health,
    Journal,
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
    """

    def __init__(self, fast: SnapshotStore, durable: SnapshotStore) -> None:
        self.fast = fast
        self.durable = durable

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.fast.save_snapshot(snapshot)

    async def save_durable(self, snapshot: Snapshot) -> None:
        await self.durable.save_snapshot(snapshot)

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        if self.fast is self.durable:
            return await self.fast.load_snapshot(session_id)
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
            raise fast
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


@asynccontextmanager
async def open_production_storage(
    settings: ProductionConfig, *, key_prefix: str = "sessiond:"
) -> AsyncIterator[Storage]:
    """The Storage for `settings`; opens (and on exit closes) every backend and the shared bridge."""
    async with AsyncExitStack() as stack:
        uses_bridge = bool(settings.redis_url or settings.database_url or settings.amqp_url)
        embedded: Storage | None = None
        if not settings.database_url or not settings.redis_url or not settings.amqp_url:
            from storage.sqlite import open_sqlite_storage  # lazily: only when something falls back to it

            embedded = await stack.enter_async_context(open_sqlite_storage(settings.data_dir))
        if not uses_bridge:
            assert embedded is not None
            yield Storage(
                sessions=embedded.sessions,
                snapshots=LayeredSnapshotStore(embedded.snapshots, embedded.snapshots),
                journal=embedded.journal,
                events=embedded.events,
                health=embedded.health,
            )
            return

        from storage.bridge import open_bridge

        bridge = await stack.enter_async_context(open_bridge())
        health: list[Health] = []
        sessions: SessionStore
        durable: SnapshotStore
        journal: Journal
        events: EventSink
        if settings.database_url:
            from storage.postgres import open_postgres

            pg = await stack.enter_async_context(open_postgres(bridge, settings.database_url))
            sessions, durable = pg.sessions, pg.snapshots
            health.append(pg.health)
        else:
            assert embedded is not None
            sessions, durable = embedded.sessions, embedded.snapshots
            health.extend(embedded.health)
        if settings.redis_url:
            from storage.redis_store import open_redis

            rd = await stack.enter_async_context(open_redis(bridge, settings.redis_url, prefix=key_prefix))
            snapshots = LayeredSnapshotStore(rd.snapshots, durable)
            journal = rd.journal
            health.append(rd.health)
        else:
            assert embedded is not None
            snapshots = LayeredSnapshotStore(durable, durable)
            journal = embedded.journal
        if settings.amqp_url:
            from storage.amqp import open_amqp_events

            events = await stack.enter_async_context(open_amqp_events(bridge, settings.amqp_url))
        else:
            assert embedded is not None
            events = embedded.events
        yield Storage(sessions=sessions, snapshots=snapshots, journal=journal, events=events, health=tuple(health))
