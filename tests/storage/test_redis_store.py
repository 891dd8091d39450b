"""Redis journal + snapshots against the real Redis on 127.0.0.1:6379 (own key prefix per test, cleaned up)."""

from __future__ import annotations

import dataclasses
import functools
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import trio
from redis.exceptions import ResponseError

from storage.bridge import Bridge
from storage.ports import Change, Fenced, Snapshot, StorageUnavailable
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
from tests.support.redis_cluster import find_redis_server
from tests.support.redis_cluster_fixture import redis_cluster_url  # noqa: F401  (a fixture)

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.services


def _prefix() -> str:
    return f"sessiond-test-{uuid.uuid4().hex[:10]}:"


@pytest.fixture(params=["trio", "bridge"])
async def redis_backend(request: pytest.FixtureRequest, bridge: Bridge) -> AsyncIterator[RedisBackend]:
    """The backend `open_redis` makes (its group commit, snapshots and trims on trio connections), and the same with
    all of them on the bridge loop (what rediss:// URLs get)."""
    prefix = _prefix()
    async with open_redis(bridge, REDIS_URL, prefix=prefix, max_entries=50) as backend:
        assert backend.journal._trio is not None and backend.client.side is not None
        if request.param == "trio":
            yield backend
        else:
            journal = RedisJournal(backend.client, max_entries=50)
            side, backend.client.side = backend.client.side, None
            try:
                yield dataclasses.replace(backend, journal=journal)
            finally:
                backend.client.side = side
                await journal.aclose()
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

    async def kill(addr: str | None) -> Any:
        if addr is None:  # on the bridge: the journal's own redis.asyncio connection, made by the first commit
            host, port = j._conn._writer.get_extra_info("sockname")[:2]
            addr = f"{host}:{port}"
        return await rc.client.client_kill_filter(_id=None, addr=addr)

    if j._trio is not None:  # the trio connection, made by the first commit
        assert j._trio._stream is not None
        host, port = j._trio._stream.socket.getsockname()[:2]
        assert await rc.call(kill, f"{host}:{port}") == 1
    else:
        assert await rc.call(kill, None) == 1
    await j.append_many({"a": changes(2, 2), "b": changes(1, 1)})
    await j.append_many({"a": changes(3, 3)})
    assert [c.version for c in await j.read_after("a", 0)] == [1, 2, 3]
    assert [c.version for c in await j.read_after("b", 0)] == [1]


async def test_a_stale_token_is_refused_per_session(redis_backend: RedisBackend) -> None:
    """Fencing inside the script: a writer whose token is older than the session's fence writes nothing, and the
    other sessions of the same group commit are written."""
    j, rc = redis_backend.journal, redis_backend.client
    await rc.call(rc.client.set, rc.fence_key("a"), 5)
    await j.append_many({"a": changes(1, 1), "b": changes(1, 1)}, {"a": 5})
    with pytest.raises(JournalRefused) as info:
        await j.append_many({"a": changes(2, 2), "b": changes(2, 2), "c": changes(1, 1)}, {"a": 4, "c": 9})
    assert set(info.value.errors) == {"a"}
    assert isinstance(info.value.errors["a"], Fenced)
    with pytest.raises(Fenced):
        await j.append("a", changes(2, 2), token=4)
    assert [c.version for c in await j.read_after("a", 0)] == [1]
    assert [c.version for c in await j.read_after("b", 0)] == [1, 2]
    assert [c.version for c in await j.read_after("c", 0)] == [1]


async def test_error_replies_are_the_exceptions_redis_asyncio_gives(bridge: Bridge) -> None:
    """The trio connection turns error replies into the very types (and messages) the bridge connection got, so
    `_map_error` and the refusal types built on it see no difference."""
    commands: list[list[Any]] = [
        ["EVAL", "return redis.error_reply('FENCED token 1 < 2')", 0],
        ["EVAL", "return redis.error_reply('JOURNAL_FULL x')", 0],
        ["EVAL", "return redis.error_reply('READONLY not a primary')", 0],
        ["EVAL", "return redis.call('NO_SUCH_COMMAND')", 0],
        ["EVAL", "return 7", 0],
        ["EVAL", "return {1, 'two'}", 0],
    ]
    async with open_redis(bridge, REDIS_URL, prefix=_prefix()) as backend:
        assert backend.journal._trio is not None
        on_trio = await backend.journal._trio.exchange(commands)
        on_bridge_journal = RedisJournal(backend.client)
        try:
            on_bridge = await backend.client.call(on_bridge_journal._exchange, commands)
        finally:
            await on_bridge_journal.aclose()

    def shape(replies: list[Any]) -> list[Any]:
        return [(type(r), str(r)) if isinstance(r, Exception) else r for r in replies]

    assert shape(on_trio) == shape(on_bridge)
    assert all(isinstance(r, ResponseError) for r in on_trio[:4])
    assert on_trio[4:] == [7, [1, b"two"]]


class HoldingProxy:
    """A loopback proxy in front of the real Redis that can hold Redis's replies back (`hold`)."""

    def __init__(self) -> None:
        self.hold = False
        self.released = trio.Event()
        self.held_request = trio.Event()  # a request went through while holding
        self.connections = 0

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with client, await trio.open_tcp_stream("127.0.0.1", 6379) as upstream, trio.open_nursery() as n:

                async def up() -> None:
                    async for data in client:
                        if self.hold:
                            self.held_request.set()
                        await upstream.send_all(data)
                    n.cancel_scope.cancel()

                async def down() -> None:
                    async for data in upstream:
                        if self.hold:
                            await self.released.wait()
                        await client.send_all(data)
                    n.cancel_scope.cancel()

                n.start_soon(up)
                n.start_soon(down)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away


async def test_a_cancelled_group_commit_leaves_the_journal_usable(bridge: Bridge) -> None:
    """Cancelled while waiting for its reply, the exchange closes its connection: the late reply must never be read
    as the answer to the next exchange. The next append reconnects and works (the cancelled batch may have landed;
    sent again it is accepted unchanged)."""
    proxy = HoldingProxy()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    prefix = _prefix()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
        async with open_redis(bridge, f"redis://127.0.0.1:{port}/0", prefix=prefix, max_entries=50) as backend:
            j = backend.journal
            assert j._trio is not None
            await j.append("s1", changes(1, 1))
            connections = proxy.connections
            proxy.hold = True
            with trio.fail_after(5):
                async with trio.open_nursery() as inner:
                    inner.start_soon(j.append, "s1", changes(2, 3))
                    await proxy.held_request.wait()
                    await trio.sleep(0.05)  # Redis has answered; the proxy holds the reply
                    inner.cancel_scope.cancel()
            assert not j._trio.connected
            proxy.hold = False
            proxy.released.set()  # the held reply goes to the closed socket
            await j.append("s1", changes(2, 4))
            await j.append("s1", changes(5, 5))
            assert [c.version for c in await j.read_after("s1", 0)] == [1, 2, 3, 4, 5]
            assert proxy.connections > connections  # it reconnected
            await _delete_prefix(backend.client, prefix)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback port whose peer accepts and never answers (a hung Redis, a black-holed route)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def accept_and_hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, accept_and_hold, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_the_trio_group_commit_times_out_once_on_a_silent_server(bridge: Bridge) -> None:
    """A peer that accepts and never answers: StorageUnavailable after the socket timeout, once (a fresh connection
    that times out is not retried), and the connection is dropped."""
    async with (
        silent_server() as port,
        open_redis(bridge, f"redis://127.0.0.1:{port}/0", prefix="x:", socket_timeout=0.3) as backend,
    ):
        j = backend.journal
        assert j._trio is not None
        t0 = trio.current_time()
        with pytest.raises(StorageUnavailable, match="TimeoutError"):
            await j.append_many({"a": changes(1, 1), "b": changes(1, 1)})
        assert 0.29 <= trio.current_time() - t0 < 0.6
        assert not j._trio.connected


async def test_the_url_database_is_selected(bridge: Bridge) -> None:
    """redis://host:port/3: the group commit writes into database 3 (SELECT on connect), where the reads look."""
    prefix = _prefix()
    url = "redis://127.0.0.1:6379/3"
    async with open_redis(bridge, url, prefix=prefix) as backend:
        assert backend.journal._trio is not None
        await backend.journal.append("s1", changes(1, 2))
        assert [c.version for c in await backend.journal.read_after("s1", 0)] == [1, 2]
        key = backend.client.journal_key("s1")

        async def xlen(db_url: str) -> int:
            client = aioredis.Redis.from_url(db_url)
            try:
                return int(await client.xlen(key))
            finally:
                await client.aclose()

        assert await bridge.run(xlen, url) == 2
        assert await bridge.run(xlen, REDIS_URL) == 0
        await _delete_prefix(backend.client, prefix)


async def test_the_url_credentials_authenticate(bridge: Bridge) -> None:
    """redis://user:password@...: the trio connection sends AUTH user password first; a wrong password is an
    outage (StorageUnavailable), not a script error. Uses a throwaway ACL user limited to its own key prefix."""
    prefix = _prefix()
    user, password = prefix.rstrip(":"), uuid.uuid4().hex

    async def acl(*args: Any) -> Any:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await client.execute_command("ACL", *args)
        finally:
            await client.aclose()

    await bridge.run(acl, "SETUSER", user, "on", f">{password}", f"~{prefix}*", "+@all")
    try:
        url = f"redis://{user}:{password}@127.0.0.1:6379/0"
        async with open_redis(bridge, url, prefix=prefix) as backend:
            assert backend.journal._trio is not None
            await backend.journal.append("s1", changes(1, 2))
            assert [c.version for c in await backend.journal.read_after("s1", 0)] == [1, 2]
            await _delete_prefix(backend.client, prefix)
        wrong = f"redis://{user}:not-{password}@127.0.0.1:6379/0"
        async with open_redis(bridge, wrong, prefix=prefix, socket_timeout=0.5) as backend:
            assert backend.journal._trio is not None
            with pytest.raises(StorageUnavailable, match="AuthenticationError"):
                await backend.journal.append("s1", changes(3, 3))
    finally:
        await bridge.run(acl, "DELUSER", user)


async def test_the_trio_group_commit_over_a_unix_socket(bridge: Bridge, tmp_path: Path) -> None:
    """unix:// URLs take the trio connection too (a private redis-server: the shared one has no socket)."""
    sock = tmp_path / "redis.sock"
    argv = [find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"]
    async with trio.open_nursery() as nursery:
        run = functools.partial(trio.run_process, argv, stdout=subprocess.DEVNULL, check=False)
        proc: trio.Process = await nursery.start(run)
        try:
            with trio.fail_after(5):
                while not sock.exists():
                    await trio.sleep(0.02)
            async with open_redis(bridge, f"unix://{sock}?db=2", prefix="x:") as backend:
                assert backend.journal._trio is not None
                await backend.journal.append_many({"a": changes(1, 2), "b": changes(1, 1)})
                assert backend.journal._trio.connected
                assert [c.version for c in await backend.journal.read_after("a", 0)] == [1, 2]
                assert [c.version for c in await backend.journal.read_after("b", 0)] == [1]
        finally:
            proc.terminate()


async def test_a_redis_cluster_keeps_the_bridge_pipeline(bridge: Bridge, redis_cluster_url: str) -> None:  # noqa: F811
    """On a Redis Cluster the sessions of one group commit live on several nodes: the journal has no trio connection
    and redis.asyncio's cluster pipeline sends each node its share."""
    prefix = _prefix()
    async with open_redis(bridge, redis_cluster_url, prefix=prefix, max_entries=50) as backend:
        assert backend.client.cluster and backend.journal._trio is None
        sessions = [f"s{i}" for i in range(12)]
        await backend.journal.append_many({s: changes(1, 2) for s in sessions})
        for s in sessions:
            assert [c.version for c in await backend.journal.read_after(s, 0)] == [1, 2]


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


async def test_a_stale_snapshot_writer_is_fenced(redis_backend: RedisBackend) -> None:
    rc = redis_backend.client
    await rc.call(rc.client.set, rc.fence_key("s1"), 5)
    with pytest.raises(Fenced):
        await redis_backend.snapshots.save_snapshot(Snapshot("s1", 1, {}, "active", None, epoch=4))
    assert await redis_backend.snapshots.load_snapshot("s1") is None
    await redis_backend.snapshots.save_snapshot(Snapshot("s1", 1, {}, "active", None, epoch=5))


async def test_snapshots_and_trims_come_back_after_redis_drops_their_connection(redis_backend: RedisBackend) -> None:
    """On trio they share a connection of their own: when Redis drops it, the next call reconnects once."""
    rc, journal, snapshots = redis_backend.client, redis_backend.journal, redis_backend.snapshots
    await journal.append("s1", changes(1, 6))
    await snapshots.save_snapshot(Snapshot("s1", 2, {}, "active", None))
    if rc.side is not None:
        assert rc.side.conn._stream is not None
        host, port = rc.side.conn._stream.socket.getsockname()[:2]
        assert await rc.call(rc.client.client_kill_filter, None, None, f"{host}:{port}") == 1
    await snapshots.save_snapshot(Snapshot("s1", 3, {}, "active", "b"))
    loaded = await snapshots.load_snapshot("s1")
    assert loaded is not None and (loaded.version, loaded.active) == (3, "b")
    if rc.side is not None:
        host, port = rc.side.conn._stream.socket.getsockname()[:2]  # type: ignore[union-attr]
        assert await rc.call(rc.client.client_kill_filter, None, None, f"{host}:{port}") == 1
    await journal.trim("s1", 4)
    assert [c.version for c in await journal.read_after("s1", 0)] == [5, 6]


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
        with pytest.raises(StorageUnavailable):
            await backend.snapshots.save_snapshot(Snapshot("s1", 1, {}, "active", None))
        with pytest.raises(StorageUnavailable):
            await backend.journal.trim("s1", 1)
        assert trio.current_time() - t0 < 3.0


async def test_silent_server_times_out_as_unavailable(bridge: Bridge) -> None:
    """A peer that accepts but never answers (a hung Redis, a black-holed route) must not hang the caller."""
    async with (
        silent_server() as port,
        open_redis(bridge, f"redis://127.0.0.1:{port}/0", prefix="x:", socket_timeout=0.3) as backend,
    ):
        t0 = trio.current_time()
        with pytest.raises(StorageUnavailable):
            await backend.journal.append("s1", changes(1, 1))
        with pytest.raises(StorageUnavailable):
            await backend.snapshots.save_snapshot(Snapshot("s1", 1, {}, "active", None))
        assert trio.current_time() - t0 < 3.0


def test_snapshot_encoding_is_unchanged_and_round_trips() -> None:
    """Snapshots stored by earlier versions (encoded through dataclasses.asdict) and new ones are the same bytes."""
    snap = Snapshot("s1", 7, {"a": {"b": [1, 2, {"c": None}]}, "x": 1.5}, "paused", None, {"a": [[1, 7]]}, epoch=3)
    assert encode_snapshot(snap) == orjson.dumps(dataclasses.asdict(snap))
    assert decode_snapshot(encode_snapshot(snap)) == snap
