"""What only the SQLite file store promises: durability across reopen, big states, serialised access."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from storage.ports import Fenced, SessionRecord, Snapshot, StorageUnavailable, save_durable_checkpoint
from storage.sqlite import DB_FILE, MIGRATIONS, SqliteDatabase, open_sqlite_storage


def record(session_id: str, owner: str = "alice", created_at: float = 1_700_000_000.25) -> SessionRecord:
    return SessionRecord(
        id=session_id,
        owner=owner,
        name="n",
        metadata={"k": "v"},
        status="active",
        version=0,
        active=None,
        created_at=created_at,
        updated_at=created_at,
    )


def query(path: Path, sql: str) -> list[Any]:
    """Read the file directly (in a thread: sqlite blocks)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_data_survives_reopen(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    snap = Snapshot("s1", 12, {"a": {"b": [1, 2]}}, "paused", "tablet", {"tablet": [[5, 12]]})
    async with open_sqlite_storage(data_dir) as storage:
        await storage.sessions.create_session(record("s1"))
        await storage.sessions.create_session(record("s2", created_at=1_700_000_001.0))
        await storage.sessions.record_user("alice")
        await storage.snapshots.save_snapshot(snap)

    async with open_sqlite_storage(data_dir) as storage:
        assert await storage.sessions.get_session("s1") == record("s1")
        page, nxt = await storage.sessions.list_sessions("alice", 10, None)
        assert [r.id for r in page] == ["s2", "s1"] and nxt is None
        assert await storage.snapshots.load_snapshot("s1") == snap
        await storage.sessions.record_user("alice")  # still idempotent after reopen

    db = data_dir / DB_FILE
    assert await trio.to_thread.run_sync(query, db, "SELECT subject FROM users") == [("alice",)]
    assert await trio.to_thread.run_sync(query, db, "SELECT version FROM schema_version") == [
        (len(MIGRATIONS),)
    ]


async def test_file_layout_and_pragmas(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    async with open_sqlite_storage(data_dir) as storage:
        await storage.sessions.record_user("bob")
        for probe in storage.health:
            await probe.ping()
        db = data_dir / DB_FILE
        assert await trio.to_thread.run_sync(query, db, "PRAGMA journal_mode") == [("wal",)]
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    tables = await trio.to_thread.run_sync(query, db, "SELECT name FROM sqlite_master WHERE type='table'")
    assert {"users", "sessions", "snapshots", "schema_version"} <= {t for (t,) in tables}


async def test_one_mib_state_round_trips_without_holding_trio(tmp_path: Path) -> None:
    state = {f"key{i:06d}": "x" * 1000 + str(i) for i in range(1100)}  # a little over 1 MiB of JSON
    snap = Snapshot("big", 1, state, "active", None, {})
    ticks = 0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with open_sqlite_storage(tmp_path) as storage, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await storage.snapshots.save_snapshot(snap)
        loaded = await storage.snapshots.load_snapshot("big")
        done.set()
    assert loaded == snap
    assert ticks > 0  # other tasks ran while the save/load worked in the thread


async def test_many_tasks_are_serialised(tmp_path: Path) -> None:
    versions = list(range(1, 41))
    random.Random(7).shuffle(versions)
    async with open_sqlite_storage(tmp_path) as storage:

        async def writer(n: int) -> None:
            await storage.sessions.record_user("carol")
            await storage.sessions.create_session(record(f"c{n:03d}", "carol", 1_000.0 + n))
            await storage.snapshots.save_snapshot(
                Snapshot("shared", versions[n], {"v": versions[n]}, "active", None)
            )
            got = await storage.sessions.get_session(f"c{n:03d}")
            assert got is not None and got.id == f"c{n:03d}"

        async with trio.open_nursery() as nursery:
            for n in range(len(versions)):
                nursery.start_soon(writer, n)

        page, nxt = await storage.sessions.list_sessions("carol", 100, None)
        assert [r.id for r in page] == [f"c{n:03d}" for n in reversed(range(len(versions)))]
        assert nxt is None
        final = await storage.snapshots.load_snapshot("shared")
        assert final is not None and final.version == max(versions) and final.state == {"v": max(versions)}
    users = await trio.to_thread.run_sync(query, tmp_path / DB_FILE, "SELECT count(*) FROM users")
    assert users == [(1,)]


async def test_cancelled_caller_leaves_store_usable(tmp_path: Path) -> None:
    async with open_sqlite_storage(tmp_path) as storage:
        with trio.move_on_after(0):
            await storage.sessions.create_session(record("x"))
        await storage.sessions.create_session(record("y"))
        assert await storage.sessions.get_session("y") == record("y")


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    async with open_sqlite_storage(tmp_path) as storage:
        pass
    with pytest.raises(StorageUnavailable):
        await storage.sessions.get_session("s1")
    for probe in storage.health:
        with pytest.raises(StorageUnavailable):
            await probe.ping()


async def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).mkdir()  # a directory where the database file should be
    with pytest.raises(StorageUnavailable):
        async with open_sqlite_storage(tmp_path):
            pass


async def test_corrupt_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(StorageUnavailable):
        async with open_sqlite_storage(tmp_path):
            pass


async def test_durable_checkpoint_is_one_transaction_in_one_thread_hop(tmp_path: Path) -> None:
    """A pause waits for its durable checkpoint: snapshot and session record go in one write (issue 9)."""
    async with open_sqlite_storage(tmp_path / "data") as storage:
        await storage.sessions.create_session(record("s1"))
        await storage.sessions.fence("s1", 3)
        db = storage.sessions.db  # type: ignore[attr-defined]
        hops = 0
        hop = db._hop

        async def counting(fn: Any) -> Any:
            nonlocal hops
            hops += 1
            return await hop(fn)

        db._hop = counting
        snap = Snapshot("s1", 7, {"n": 7}, "paused", None, {"a": [[4, 7]]}, epoch=3)
        paused = dataclasses.replace(record("s1"), status="paused", version=7)
        await save_durable_checkpoint(storage, snap, paused, 3)
        assert hops == 1
        assert await storage.snapshots.load_snapshot("s1") == snap
        assert await storage.sessions.get_session("s1") == paused

        # A writer whose token is older than the fence writes neither the snapshot nor the record.
        await storage.sessions.fence("s1", 5)
        stale = Snapshot("s1", 9, {"n": 9}, "active", "b", epoch=5)  # the snapshot alone would pass the fence
        with pytest.raises(Fenced):
            await save_durable_checkpoint(storage, stale, dataclasses.replace(paused, version=9), 3)
        assert await storage.snapshots.load_snapshot("s1") == snap
        assert await storage.sessions.get_session("s1") == paused


async def test_close_waits_for_the_batch_in_the_thread(tmp_path: Path) -> None:
    """The batch hop holds no limiter: close must still never take the connection from under a running batch."""
    db = SqliteDatabase(tmp_path / "x.db")
    await db.open()
    started, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> int:
        started.set()
        release.wait(10)
        return int(conn.execute("SELECT 1").fetchone()[0])

    results: list[int] = []
    closed = trio.Event()
    async with trio.open_nursery() as nursery:

        async def call() -> None:
            results.append(await db.run(slow))

        async def close() -> None:
            await db.close()
            closed.set()

        nursery.start_soon(call)
        await trio.to_thread.run_sync(started.wait, 10)
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed.is_set()  # the batch still has the connection
        release.set()
    assert results == [1]
    with pytest.raises(StorageUnavailable):
        await db.run(lambda conn: conn.execute("SELECT 1"))
