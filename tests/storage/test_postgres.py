"""PostgreSQL storage against the real server on 127.0.0.1:5432 (a fresh database per test, dropped after)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import trio

from storage.bridge import Bridge
from storage.memory import encode_cursor
from storage.ports import SessionRecord, Snapshot, StorageUnavailable
from storage.postgres import PostgresBackend, migrate, migration_files, open_postgres

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

pytestmark = pytest.mark.services


async def _admin(bridge: Bridge, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await bridge.run(run)


@pytest.fixture
async def dsn(bridge: Bridge) -> AsyncIterator[str]:
    name = f"sessiond_test_{uuid.uuid4().hex[:12]}"
    await _admin(bridge, f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        await _admin(bridge, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg(bridge: Bridge, dsn: str) -> AsyncIterator[PostgresBackend]:
    async with open_postgres(bridge, dsn) as backend:
        yield backend


def record(sid: str, owner: str = "alice", created: float = 1000.0, **kw: object) -> SessionRecord:
    base = dict(
        id=sid,
        owner=owner,
        name=f"n-{sid}",
        metadata={"k": [1, "x"]},
        status="active",
        version=0,
        active=None,
        created_at=created,
        updated_at=created,
    )
    base.update(kw)
    return SessionRecord(**base)  # type: ignore[arg-type]


async def test_migrations_idempotent_and_recorded(bridge: Bridge, dsn: str) -> None:
    files = migration_files()
    assert files[0][0] == 1 and files[0][1] == "0001_init.sql"
    assert await migrate(bridge, dsn) == [v for v, _, _ in files]
    assert await migrate(bridge, dsn) == []

    async def concurrent() -> None:  # several pods starting at once: the advisory lock serialises them
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(migrate, bridge, dsn)

    await concurrent()

    async def versions() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            return [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        finally:
            await conn.close()

    assert await bridge.run(versions) == [v for v, _, _ in files]


async def test_session_crud(pg: PostgresBackend) -> None:
    s = pg.sessions
    r = record("s1", created=1700000000.123456789)
    await s.create_session(r)
    assert await s.get_session("s1") == r  # floats and jsonb metadata round-trip exactly
    with pytest.raises(ValueError):
        await s.create_session(r)
    changed = record(
        "s1",
        created=r.created_at,
        status="paused",
        version=7,
        active="phone",
        metadata={"nested": {"a": 1.5}},
        updated_at=1700000100.5,
    )
    await s.update_session(changed)
    assert await s.get_session("s1") == changed
    await s.update_session(record("missing"))
    assert await s.get_session("missing") is None


async def test_listing_keyset_pagination(pg: PostgresBackend) -> None:
    s = pg.sessions
    # Ties on created_at are broken by id (desc), like the memory backend.
    expected = []
    for i in range(7):
        r = record(f"s{i}", created=1000.0 + i // 2)
        await s.create_session(r)
        expected.append(r)
    await s.create_session(record("other", owner="bob"))
    expected.sort(key=lambda r: (r.created_at, r.id), reverse=True)

    seen: list[SessionRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await s.list_sessions("alice", 3, cursor)
        seen += page
        pages += 1
        if cursor is None:
            break
    assert seen == expected
    assert pages == 3
    assert await s.list_sessions("nobody", 10, None) == ([], None)
    page, nxt = await s.list_sessions("alice", 7, None)
    assert len(page) == 7 and nxt is None
    page, _ = await s.list_sessions("alice", 10, encode_cursor(1001.0, "s2"))
    assert [r.id for r in page] == ["s1", "s0"]
    with pytest.raises(ValueError):
        await s.list_sessions("alice", 3, "not-a-cursor!")


async def test_record_user_idempotent(pg: PostgresBackend) -> None:
    await pg.sessions.record_user("alice")
    await pg.sessions.record_user("alice")
    assert await pg.sessions.has_user("alice")
    assert not await pg.sessions.has_user("bob")


async def test_snapshots_newer_wins(pg: PostgresBackend) -> None:
    snaps = pg.snapshots
    assert await snaps.load_snapshot("s1") is None
    v5 = Snapshot("s1", 5, {"big": 1e300, "f": 1.0, "l": [1, {"x": None}]}, "active", "d1", {"d1": [[3, 5]]})
    await snaps.save_snapshot(v5)
    await snaps.save_snapshot(Snapshot("s1", 4, {}, "active", None))
    assert await snaps.load_snapshot("s1") == v5
    v5b = Snapshot("s1", 5, v5.state, "paused", None, v5.acked)
    await snaps.save_snapshot(v5b)
    assert await snaps.load_snapshot("s1") == v5b
    await snaps.save_snapshot(Snapshot("s1", 9, {"n": 9}, "active", None))
    got = await snaps.load_snapshot("s1")
    assert got is not None and got.version == 9
    await snaps.delete_snapshots("s1")
    assert await snaps.load_snapshot("s1") is None


async def test_health_and_concurrent_queries(pg: PostgresBackend) -> None:
    await pg.health.ping()
    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(pg.sessions.create_session, record(f"c{i}", created=float(i)))
    page, _ = await pg.sessions.list_sessions("alice", 100, None)
    assert len(page) == 50


async def test_unreachable_server_is_unavailable_quickly(bridge: Bridge) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = trio.current_time()
    with pytest.raises(StorageUnavailable):
        await migrate(bridge, f"postgresql://postgres@127.0.0.1:{port}/x")
    assert trio.current_time() - t0 < 3.0


# --- the production assembly (PostgreSQL + Redis + the embedded fallbacks) -------------------------------


async def test_layered_snapshots_newest_of_both(bridge: Bridge, pg: PostgresBackend) -> None:
    from storage.production import LayeredSnapshotStore
    from storage.redis_store import open_redis

    prefix = f"sessiond-test-{uuid.uuid4().hex[:10]}:"
    async with open_redis(bridge, "redis://127.0.0.1:6379/0", prefix=prefix) as rd:
        layered = LayeredSnapshotStore(rd.snapshots, pg.snapshots)
        await layered.save_durable(Snapshot("s1", 10, {"from": "pg"}, "paused", None))
        await layered.save_snapshot(Snapshot("s1", 7, {"from": "redis"}, "active", None))
        got = await layered.load_snapshot("s1")
        assert got is not None and got.state == {"from": "pg"}  # Redis lost data: PG is newer
        await layered.save_snapshot(Snapshot("s1", 12, {"from": "redis"}, "active", "d"))
        got = await layered.load_snapshot("s1")
        assert got is not None and got.version == 12
        assert (await pg.snapshots.load_snapshot("s1")).version == 10  # type: ignore[union-attr]
        await layered.delete_snapshots("s1")
        assert await layered.load_snapshot("s1") is None
        assert await pg.snapshots.load_snapshot("s1") is None


async def test_open_production_storage_uses_configured_backends(dsn: str, tmp_path: Path) -> None:
    from api.settings import Settings
    from storage.production import LayeredSnapshotStore, open_production_storage
    from storage.redis_store import RedisJournal

    prefix = f"sessiond-test-{uuid.uuid4().hex[:10]}:"
    settings = Settings(redis_url="redis://127.0.0.1:6379/0", database_url=dsn, data_dir=tmp_path)
    async with open_production_storage(settings, key_prefix=prefix) as storage:
        from storage.batching import BatchingJournal

        assert isinstance(storage.journal, BatchingJournal) and isinstance(storage.journal.inner, RedisJournal)
        assert isinstance(storage.snapshots, LayeredSnapshotStore)
        for h in storage.health:
            await h.ping()
        await storage.sessions.create_session(record("p1"))
        assert await storage.sessions.get_session("p1") == record("p1")
        snap = Snapshot("p1", 3, {"a": 1}, "active", None)
        await storage.journal.append("p1", [])
        await storage.snapshots.save_snapshot(snap)
        await storage.snapshots.save_durable(snap)
        assert await storage.snapshots.load_snapshot("p1") == snap
        await storage.snapshots.delete_snapshots("p1")
        storage.events.publish("session.created", {"type": "session.created"})  # embedded sink: kept in memory


async def test_production_storage_without_services_is_embedded(tmp_path: Path) -> None:
    from api.settings import Settings
    from storage.production import open_production_storage

    async with open_production_storage(Settings(data_dir=tmp_path)) as storage:
        await storage.sessions.create_session(record("e1"))
        assert await storage.sessions.get_session("e1") == record("e1")
        snap = Snapshot("e1", 1, {}, "active", None)
        await storage.snapshots.save_snapshot(snap)
        assert await storage.snapshots.load_snapshot("e1") == snap
