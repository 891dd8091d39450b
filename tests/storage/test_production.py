"""The production assembly's durability modes, the PostgreSQL journal, and a Redis outage (real servers)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import trio

from storage.bridge import Bridge
from storage.memory import Fences, MemoryJournal, MemorySnapshotStore, VolatileSnapshotStore
from storage.ports import Change, Snapshot, StorageUnavailable
from storage.postgres import PostgresBackend, PostgresJournal, migrate_url, open_postgres
from storage.production import LayeredSnapshotStore, open_production_storage, resolve_durability
from storage.redis_store import JournalFull, JournalRefused, RedisJournal, VersionConflict, open_redis
from tests.support.proxy import TcpProxy


@dataclass(frozen=True)
class Config:
    """What open_production_storage reads (api.settings.Settings has these fields)."""

    data_dir: Path
    redis_url: str | None = None
    database_url: str | None = None
    amqp_url: str | None = None
    durability: str | None = None
    # The test run shares one database between modes: the guard against a switch is tested on its own database.
    allow_durability_switch: bool = True


@dataclass(frozen=True)
class OldConfig:
    """Settings from before the `durability` field: the default rule applies."""

    data_dir: Path
    redis_url: str | None = None
    database_url: str | None = None
    amqp_url: str | None = None


def sid() -> str:
    return f"s-{uuid.uuid4().hex}"


def changes(first: int, last: int, device: str = "d1") -> list[Change]:
    return [
        Change(version=v, device=device, op_id=v, ops=[{"op": "set", "path": f"/k{v}", "value": v}])
        for v in range(first, last + 1)
    ]


@pytest.fixture
async def pg(bridge: Bridge, pg_url: str) -> AsyncIterator[PostgresBackend]:
    # One connection, so a query logger on it sees every statement the journal sends.
    async with open_postgres(bridge, pg_url, min_size=1, max_size=1, max_journal_entries=20) as backend:
        yield backend


# --- durability choice ----------------------------------------------------------------------------


def test_durability_defaults_and_refusals(tmp_path: Path) -> None:
    redis, pgdsn = "redis://127.0.0.1:6379/0", "postgresql://postgres@127.0.0.1/x"
    assert resolve_durability(Config(tmp_path)) == "memory"
    assert resolve_durability(Config(tmp_path, database_url=pgdsn)) == "memory"
    assert resolve_durability(Config(tmp_path, redis_url=redis, database_url=pgdsn)) == "redis"
    assert resolve_durability(OldConfig(tmp_path, redis_url=redis)) == "redis"
    assert resolve_durability(Config(tmp_path, redis_url=redis, durability="memory")) == "memory"
    assert resolve_durability(Config(tmp_path, database_url=pgdsn, durability="postgres")) == "postgres"
    assert resolve_durability(Config(tmp_path, database_url=pgdsn), "postgres") == "postgres"  # argument wins
    with pytest.raises(ValueError, match="database URL"):
        resolve_durability(Config(tmp_path, redis_url=redis, durability="postgres"))
    with pytest.raises(ValueError, match="Redis URL"):
        resolve_durability(Config(tmp_path, database_url=pgdsn), "redis")
    with pytest.raises(ValueError, match="durability must be"):
        resolve_durability(Config(tmp_path, redis_url=redis, durability="disk"))


async def test_bad_combination_refused_before_opening_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database URL"):
        async with open_production_storage(Config(tmp_path / "x"), durability="postgres"):
            pass  # pragma: no cover
    assert not (tmp_path / "x").exists()


def unbatched(journal: object) -> object:
    """The journal behind the cross-session batcher (redis and postgres modes)."""
    from storage.batching import BatchingJournal

    return journal.inner if isinstance(journal, BatchingJournal) else journal


@pytest.mark.parametrize(
    ("redis", "postgres", "durability", "journal", "fast"),
    [
        (True, True, None, RedisJournal, "redis"),
        (True, True, "redis", RedisJournal, "redis"),
        (True, True, "postgres", PostgresJournal, "redis"),
        (False, True, "postgres", PostgresJournal, None),  # every handoff is durable: the PostgreSQL layer alone
        (True, True, "memory", MemoryJournal, "redis"),
        (False, True, None, MemoryJournal, "volatile"),  # in-process journal, PostgreSQL snapshots
        (False, False, None, MemoryJournal, "volatile"),  # the embedded default: memory over the SQLite file
    ],
)
async def test_each_mode_picks_its_journal_and_snapshot_layers(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    pg_url: str,
    redis: bool,
    postgres: bool,
    durability: str | None,
    journal: type,
    fast: str | None,
) -> None:
    config = Config(tmp_path, redis_url=redis_url if redis else None, database_url=pg_url if postgres else None)
    async with open_production_storage(config, key_prefix=redis_prefix, durability=durability) as storage:
        assert type(unbatched(storage.journal)) is journal
        s = sid()
        await storage.journal.append(s, changes(1, 2))
        assert await storage.journal.read_after(s, 1) == changes(2, 2)
        for probe in storage.health:
            await probe.ping()
        layered = storage.snapshots
        assert isinstance(layered, LayeredSnapshotStore)
        assert layered.tiered is (fast is not None)
        assert layered.volatile is (fast == "volatile")
        if fast == "volatile":
            assert isinstance(layered.fast, VolatileSnapshotStore)
            assert layered.fast.fences is unbatched(storage.journal).fences  # fenced as the journal beside it
            s = sid()
            await layered.save_snapshot(Snapshot(session_id=s, version=3, state={}, status="active", active="b"))
            await layered.save_durable(Snapshot(session_id=s, version=3, state={}, status="paused", active=None))
            loaded = await layered.load_snapshot(s)  # same version: the fast one is the newer write
            assert loaded is not None and loaded.active == "b" and layered.holds_volatile(s)
            layered.covered(s, 2)
            assert layered.holds_volatile(s)  # an older durable snapshot does not cover it
            layered.covered(s, 3)
            assert not layered.holds_volatile(s)
            await layered.delete_snapshots(s)
    # The field on the settings object is read as well.
    config = Config(tmp_path, redis_url=redis_url, database_url=pg_url, durability="postgres")
    async with open_production_storage(config, key_prefix=redis_prefix) as storage:
        assert isinstance(unbatched(storage.journal), PostgresJournal)


# --- the PostgreSQL journal -----------------------------------------------------------------------


async def _log_queries(bridge: Bridge, pool: asyncpg.Pool) -> list[str]:
    seen: list[str] = []

    async def attach() -> None:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda q: seen.append(q.query))

    await bridge.run(attach)
    return seen


async def test_pg_append_is_one_round_trip(bridge: Bridge, pg: PostgresBackend) -> None:
    queries = await _log_queries(bridge, pg.pool)
    await pg.journal.append(sid(), changes(1, 1))  # asyncpg introspects the array types once per connection
    queries.clear()
    s = sid()
    await pg.journal.append(s, changes(1, 8))
    assert len(queries) == 1 and "sessiond_journal_append" in queries[0]
    queries.clear()
    others = [sid() for _ in range(5)]
    await pg.journal.append_many({o: changes(1, 3, device=o) for o in others})  # several sessions, still one
    assert len(queries) == 1
    assert await pg.journal.read_after(s, 0) == changes(1, 8)
    for o in others:
        assert await pg.journal.read_after(o, 1) == changes(2, 3, device=o)


async def test_pg_idempotent_retry_and_strict_order(pg: PostgresBackend) -> None:
    j, s = pg.journal, sid()
    await j.append(s, changes(1, 3))
    await j.append(s, changes(1, 3))  # a retried ack that already landed: accepted, not doubled
    await j.append(s, changes(2, 5))  # overlapping retry plus new changes
    assert await j.read_after(s, 0) == changes(1, 5)
    assert await j.length(s) == 5
    with pytest.raises(VersionConflict):  # a stale writer: same version, different change
        await j.append(s, changes(5, 6, device="stale"))
    with pytest.raises(VersionConflict):  # not increasing inside the batch
        await j.append(s, [*changes(7, 7), *changes(6, 6)])
    with pytest.raises(VersionConflict):  # duplicate inside the batch
        await j.append(s, [*changes(6, 6), *changes(6, 6)])
    assert await j.read_after(s, 0) == changes(1, 5)  # refused batches wrote nothing
    await j.append(s, changes(8, 8))  # gaps are the actor's business; only order is enforced here
    assert [c.version for c in await j.read_after(s, 0)] == [1, 2, 3, 4, 5, 8]


async def test_pg_trim_delete_and_cap(pg: PostgresBackend) -> None:
    j, s = pg.journal, sid()
    await j.append(s, changes(1, 20))  # the fixture's cap is 20
    with pytest.raises(JournalFull) as info:
        await j.append(s, changes(21, 21))
    assert isinstance(info.value, StorageUnavailable)
    await j.append(s, changes(20, 20))  # a retry adds nothing, so it is not refused at the cap
    await j.trim(s, 15)
    assert await j.length(s) == 5
    await j.append(s, changes(21, 35))
    assert [c.version for c in await j.read_after(s, 30)] == [31, 32, 33, 34, 35]
    with pytest.raises(VersionConflict):  # trimmed versions stay taken
        await j.append(s, changes(3, 3, device="x"))
    await j.delete(s)
    assert await j.read_after(s, 0) == [] and await j.length(s) == 0
    await j.append(s, changes(1, 1))  # a deleted journal starts over
    assert await j.read_after(s, 0) == changes(1, 1)


async def test_pg_append_many_refuses_per_session(pg: PostgresBackend) -> None:
    j, ok, bad = pg.journal, sid(), sid()
    await j.append(bad, changes(1, 2))
    with pytest.raises(JournalRefused) as info:
        await j.append_many({ok: changes(1, 2), bad: changes(2, 3, device="other")})
    assert set(info.value.errors) == {bad}
    assert isinstance(info.value.errors[bad], VersionConflict)
    assert await j.read_after(ok, 0) == changes(1, 2)
    assert await j.read_after(bad, 0) == changes(1, 2)


async def test_pg_concurrent_appends_keep_order(pg: PostgresBackend) -> None:
    s = sid()
    refused = 0

    async def write(v: int) -> None:
        nonlocal refused
        try:
            await pg.journal.append(s, changes(v, v))
        except VersionConflict:
            refused += 1

    async with trio.open_nursery() as n:
        for v in range(1, 11):
            n.start_soon(write, v)
    # Concurrent writers of one session serialise on its head row; late lower versions are refused, but
    # whatever landed is strictly increasing.
    got = [c.version for c in await pg.journal.read_after(s, 0)]
    assert got == sorted(set(got)) and got
    assert len(got) + refused == 10


# --- postgres durability with Redis fast snapshots --------------------------------------------------


async def test_postgres_mode_survives_losing_redis(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_url: str
) -> None:
    """A fast (Redis) snapshot must not trim what only it covers: Redis may come back empty."""
    config = Config(tmp_path, redis_url=redis_url, database_url=pg_url, durability="postgres")
    s = sid()
    async with open_production_storage(config, key_prefix=redis_prefix) as storage:
        assert isinstance(storage.snapshots, LayeredSnapshotStore)
        await storage.journal.append(s, changes(1, 10))
        await storage.snapshots.save_durable(Snapshot(s, 4, {"at": 4}, "active", None))
        await storage.journal.trim(s, 4)
        await storage.snapshots.save_snapshot(Snapshot(s, 8, {"at": 8}, "active", None))  # Redis only
        await storage.journal.trim(s, 8)  # what the actor does after a fast snapshot: clamped to 4
        snap = await storage.snapshots.load_snapshot(s)
        assert snap is not None and snap.version == 8
        assert await storage.journal.read_after(s, 8) == changes(9, 10)
        fast = storage.snapshots.fast
        await fast.delete_snapshots(s)  # Redis restarted empty
        snap = await storage.snapshots.load_snapshot(s)
        assert snap is not None and snap.version == 4
        assert await storage.journal.read_after(s, snap.version) == changes(5, 10)  # nothing acked is lost


# --- a Redis outage through a TCP proxy --------------------------------------------------------------


async def test_redis_journal_outage_and_recovery(bridge: Bridge, redis_prefix: str) -> None:
    proxy = TcpProxy(6379)
    s = sid()
    async with trio.open_nursery() as nursery:
        await proxy.start(nursery)
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with open_redis(bridge, url, prefix=redis_prefix, socket_timeout=1.0) as rd:
            await rd.journal.append(s, changes(1, 2))
            await proxy.cut_and_wait()  # the port refuses connections from here on
            for v in (3, 3):  # a refused connection, then again: each fails fast, nothing hangs
                with trio.fail_after(3):
                    with pytest.raises(StorageUnavailable):
                        await rd.journal.append(s, changes(v, v))
            with pytest.raises(StorageUnavailable):
                await rd.health.ping()
            await proxy.start(nursery)  # back on the same port: the same store works again, no reopen
            with trio.fail_after(5):
                await rd.journal.append(s, changes(3, 4))
            assert await rd.journal.read_after(s, 0) == changes(1, 4)
            await rd.journal.delete(s)
        proxy.cut()


async def test_migrate_url_opens_its_own_bridge(pg_url: str) -> None:
    assert await migrate_url(pg_url) in ([], [1, 2])  # a shared test database may be migrated already
    assert await migrate_url(pg_url) == []


async def test_postgres_mode_serves_through_a_redis_outage(tmp_path: Path, redis_prefix: str, pg_url: str) -> None:
    """With durability=postgres Redis only speeds snapshots up: without it they go to PostgreSQL."""
    proxy = TcpProxy(6379)
    s = sid()
    async with trio.open_nursery() as nursery:
        await proxy.start(nursery)
        config = Config(
            tmp_path, redis_url=f"redis://127.0.0.1:{proxy.port}/0", database_url=pg_url, durability="postgres"
        )
        async with open_production_storage(config, key_prefix=redis_prefix) as storage:
            await storage.journal.append(s, changes(1, 3))
            await storage.snapshots.save_snapshot(Snapshot(s, 2, {"at": 2}, "active", None))
            proxy.cut()
            await storage.journal.append(s, changes(4, 5))  # acks do not need Redis
            with trio.fail_after(5):
                await storage.snapshots.save_snapshot(Snapshot(s, 5, {"at": 5}, "active", "d"))  # falls back
                snap = await storage.snapshots.load_snapshot(s)
            assert snap is not None and snap.version == 5
            assert await storage.journal.read_after(s, 5) == []
            await proxy.start(nursery)
        proxy.cut()


def test_only_a_fast_layer_that_trims_the_journal_itself_saves_the_checkpointer_its_trim() -> None:
    """Redis (durability `redis`) trims the journal in the fast snapshot's own script; with any other layering the
    checkpointer must still trim after the snapshot."""
    from storage.redis_store import RedisSnapshotStore

    durable = MemorySnapshotStore()
    trimming = RedisSnapshotStore(None, trim_journal=True)  # type: ignore[arg-type]  # never called here
    keeping = RedisSnapshotStore(None, trim_journal=False)  # type: ignore[arg-type]
    assert LayeredSnapshotStore(trimming, durable).fast_trims_journal
    assert not LayeredSnapshotStore(keeping, durable).fast_trims_journal
    assert not LayeredSnapshotStore(durable, durable).fast_trims_journal


class DownStore(MemorySnapshotStore):
    """A durable layer whose reads fail (an outage)."""

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        raise StorageUnavailable("down")


async def test_a_volatile_layer_is_read_first_and_the_newer_snapshot_wins() -> None:
    fences = Fences()
    durable = MemorySnapshotStore(fences)
    layered = LayeredSnapshotStore(VolatileSnapshotStore(fences), durable)
    s = sid()
    assert await layered.load_snapshot(s) is None
    await layered.save_durable(Snapshot(session_id=s, version=2, state={}, status="paused", active=None))
    await layered.save_snapshot(Snapshot(session_id=s, version=1, state={}, status="active", active="old"))
    loaded = await layered.load_snapshot(s)
    assert loaded is not None and loaded.version == 2  # the durable one is newer
    await layered.save_snapshot(Snapshot(session_id=s, version=2, state={}, status="active", active="b"))
    loaded = await layered.load_snapshot(s)
    assert loaded is not None and loaded.active == "b"  # same version: the handoff after it

    # A durable outage: the volatile snapshot (the in-process journal continues from it) serves; none, it raises.
    down = LayeredSnapshotStore(layered.fast, DownStore(fences))
    loaded = await down.load_snapshot(s)
    assert loaded is not None and loaded.active == "b"
    with pytest.raises(StorageUnavailable):
        await down.load_snapshot(sid())
