"""Redis journal + snapshots against the real Redis on 127.0.0.1:6379 (own key prefix per test, cleaned up)."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import trio

from storage.bridge import Bridge, open_bridge
from storage.ports import Change, Snapshot, StorageUnavailable
from storage.redis_store import (
    JournalFull,
    JournalRefused,
    RedisBackend,
    RedisClient,
    RedisJournal,
    RedisSnapshotStore,
    VersionConflict,
    decode_snapshot,
    encode_snapshot,
    open_redis,
)

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.services


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with open_bridge() as b:
        yield b


@pytest.fixture
async def redis_backend(bridge: Bridge) -> AsyncIterator[RedisBackend]:
    prefix = f"sessiond-test-{uuid.uuid4().hex[:10]}:"
    async with open_redis(bridge, REDIS_URL, prefix=prefix, max_entries=50) as backend:
        yield backend
        await _delete_prefix(backend.client, prefix)


async def _delete_prefix(rc: RedisClient, prefix: str) -> None:
    async def wipe() -> None:
        keys = [k async for k in rc.client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await rc.client.delete(*keys)

    await rc.call(wipe)


def changes(first: int, last: int, device: str = "d1") -> list[Change]:
    return [
        Change(version=v, device=device, op_id=v, ops=[{"op": "inc", "path": "/n", "by": 1}])
        for v in range(first, last + 1)
    ]


async def test_append_read_after_in_order(redis_backend: RedisBackend) -> None:
    j = redis_backend.journal
    await j.append("s1", changes(1, 3))
    await j.append("s1", changes(4, 5))
    got = await j.read_after("s1", 0)
    assert [c.version for c in got] == [1, 2, 3, 4, 5]
    assert got[0] == changes(1, 1)[0]
    assert [c.version for c in await j.read_after("s1", 3)] == [4, 5]
    assert await j.read_after("s1", 5) == []
    assert await j.read_after("other", 0) == []


async def test_trim_and_delete(redis_backend: RedisBackend) -> None:
    j = redis_backend.journal
    await j.append("s1", changes(1, 6))
    await j.trim("s1", 4)
    assert [c.version for c in await j.read_after("s1", 0)] == [5, 6]
    await j.append("s1", changes(7, 7))
    assert [c.version for c in await j.read_after("s1", 0)] == [5, 6, 7]
    await j.delete("s1")
    assert await j.read_after("s1", 0) == []


async def test_retried_batch_is_idempotent_but_stale_version_refused(redis_backend: RedisBackend) -> None:
    j = redis_backend.journal
    batch = changes(1, 3)
    await j.append("s1", batch)
    await j.append("s1", batch)  # the same batch again (an ack retried after a timeout): no-op
    assert [c.version for c in await j.read_after("s1", 0)] == [1, 2, 3]
    with pytest.raises(VersionConflict):
        await j.append("s1", changes(3, 4, device="stale"))
    with pytest.raises(VersionConflict):
        await j.append("s1", [*changes(5, 5), *changes(5, 5, device="x")])
    assert [c.version for c in await j.read_after("s1", 0)] == [1, 2, 3]  # nothing of a refused batch landed


async def test_journal_is_bounded(redis_backend: RedisBackend) -> None:
    j = redis_backend.journal  # max_entries=50 in the fixture
    await j.append("s1", changes(1, 50))
    with pytest.raises(JournalFull):
        await j.append("s1", changes(51, 51))
    assert isinstance(JournalFull("x"), StorageUnavailable)
    await redis_backend.snapshots.save_snapshot(Snapshot("s1", 40, {"n": 40}, "active", None))  # trims <= 40
    await j.append("s1", changes(51, 51))
    assert [c.version for c in await j.read_after("s1", 0)] == list(range(41, 52))


async def test_append_many_writes_several_sessions(redis_backend: RedisBackend) -> None:
    j = redis_backend.journal
    await j.append_many({"a": changes(1, 2), "b": changes(1, 1), "c": []})
    assert [c.version for c in await j.read_after("a", 0)] == [1, 2]
    assert [c.version for c in await j.read_after("b", 0)] == [1]
    with pytest.raises(JournalRefused) as info:
        await j.append_many({"a": changes(2, 2, device="stale"), "b": changes(2, 3)})
    assert set(info.value.errors) == {"a"}
    assert isinstance(info.value.errors["a"], VersionConflict)
    assert [c.version for c in await j.read_after("b", 0)] == [1, 2, 3]


async def test_the_group_commit_connection_comes_back_after_redis_drops_it(redis_backend: RedisBackend) -> None:
    """The journal writes on a connection of its own: when Redis drops it (a restart, a proxy, CLIENT KILL), the
    next group commit reconnects and nothing is lost or doubled (the retried script is idempotent)."""
    j = redis_backend.journal
    rc = redis_backend.client
    await j.append_many({"a": changes(1, 1)})

    async def kill_the_journal_connection() -> Any:
        conn = j._conn  # the journal's own connection, made by the first group commit
        host, port = conn._writer.get_extra_info("sockname")[:2]
        return await rc.client.client_kill_filter(_id=None, addr=f"{host}:{port}")

    assert await rc.call(kill_the_journal_connection) == 1
    await j.append_many({"a": changes(2, 2), "b": changes(1, 1)})
    await j.append_many({"a": changes(3, 3)})
    assert [c.version for c in await j.read_after("a", 0)] == [1, 2, 3]
    assert [c.version for c in await j.read_after("b", 0)] == [1]


class CountingConnection(aioredis.Connection):
    """Counts what goes on the wire: one `send_packed_command` is one request (round trip)."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_group_commit_is_one_round_trip(bridge: Bridge) -> None:
    prefix = f"sessiond-test-{uuid.uuid4().hex[:10]}:"

    async def make() -> aioredis.Redis:
        pool = aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
        return aioredis.Redis.from_pool(pool)

    client = await bridge.run(make)
    rc = RedisClient(bridge, client, prefix)
    try:
        journal = RedisJournal(rc)
        await rc.call(client.ping)  # connect (handshake commands) before counting
        CountingConnection.sends = 0
        await journal.append("s1", changes(1, 200))
        assert CountingConnection.sends == 1
        CountingConnection.sends = 0
        await journal.append_many({f"s{i}": changes(1, 20) for i in range(2, 12)})
        assert CountingConnection.sends == 1
        assert len(await journal.read_after("s11", 0)) == 20
    finally:
        await _delete_prefix(rc, prefix)
        await bridge.run(client.aclose)


async def test_snapshot_newer_wins_equal_replaces(redis_backend: RedisBackend) -> None:
    s = redis_backend.snapshots
    assert await s.load_snapshot("s1") is None
    snap5 = Snapshot("s1", 5, {"a": [1, 2]}, "active", "phone", {"phone": [[1, 5]]})
    await s.save_snapshot(snap5)
    await s.save_snapshot(Snapshot("s1", 3, {"old": True}, "active", None))
    assert await s.load_snapshot("s1") == snap5
    paused = Snapshot("s1", 5, {"a": [1, 2]}, "paused", None, {"phone": [[1, 5]]})
    await s.save_snapshot(paused)  # handoff: same version, new status/active
    assert await s.load_snapshot("s1") == paused
    await s.delete_snapshots("s1")
    assert await s.load_snapshot("s1") is None


async def test_snapshot_trims_journal_it_covers(redis_backend: RedisBackend) -> None:
    await redis_backend.journal.append("s1", changes(1, 10))
    await redis_backend.snapshots.save_snapshot(Snapshot("s1", 7, {}, "active", None))
    assert [c.version for c in await redis_backend.journal.read_after("s1", 0)] == [8, 9, 10]
    keep = RedisSnapshotStore(redis_backend.client, trim_journal=False)
    await keep.save_snapshot(Snapshot("s1", 9, {}, "active", None))
    assert await redis_backend.journal.length("s1") == 3


async def test_health_ping(redis_backend: RedisBackend) -> None:
    await redis_backend.health.ping()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_closed_port_raises_storage_unavailable_quickly(bridge: Bridge) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    async with open_redis(bridge, url, prefix="x:", socket_timeout=0.5) as backend:
        t0 = trio.current_time()
        with pytest.raises(StorageUnavailable):
            await backend.journal.append("s1", changes(1, 1))
        with pytest.raises(StorageUnavailable):
            await backend.health.ping()
        with pytest.raises(StorageUnavailable):
            await backend.snapshots.load_snapshot("s1")
        assert trio.current_time() - t0 < 3.0


async def test_silent_server_times_out_as_unavailable(bridge: Bridge) -> None:
    """A peer that accepts but never answers (a hung Redis, a black-holed route) must not hang the caller."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def accept_and_hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, accept_and_hold, listeners)
        async with open_redis(bridge, f"redis://127.0.0.1:{port}/0", prefix="x:", socket_timeout=0.3) as backend:
            t0 = trio.current_time()
            with pytest.raises(StorageUnavailable):
                await backend.journal.append("s1", changes(1, 1))
            assert trio.current_time() - t0 < 3.0
        nursery.cancel_scope.cancel()


def test_snapshot_encoding_is_unchanged_and_round_trips() -> None:
    """Snapshots stored by earlier versions (encoded through dataclasses.asdict) and new ones are the same bytes."""
    snap = Snapshot("s1", 7, {"a": {"b": [1, 2, {"c": None}]}, "x": 1.5}, "paused", None, {"a": [[1, 7]]}, epoch=3)
    assert encode_snapshot(snap) == orjson.dumps(dataclasses.asdict(snap))
    assert decode_snapshot(encode_snapshot(snap)) == snap
