"""The trio Redis command queue (storage/redis_trio.py) against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio
import trio.testing
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from storage.redis_trio import TrioCommandQueue, TrioRedisConnection, pack

pytestmark = pytest.mark.services

REDIS_URL = "redis://127.0.0.1:6379/0"


class CountingConnection(TrioRedisConnection):
    """Counts exchanges (one write and its replies: one round trip) and their sizes."""

    def __init__(self) -> None:
        super().__init__(REDIS_URL, 2.0)
        self.sizes: list[int] = []

    async def exchange(self, commands: Any) -> list[Any]:
        self.sizes.append(len(commands))
        return await super().exchange(commands)


@pytest.fixture
def counted(nursery: trio.Nursery) -> tuple[CountingConnection, TrioCommandQueue]:
    """A running command queue over a connection that counts its exchanges."""
    conn = CountingConnection()
    queue = TrioCommandQueue(conn)
    nursery.start_soon(queue.run)
    return conn, queue


async def test_what_waits_during_an_exchange_goes_in_the_next_one(
    counted: tuple[CountingConnection, TrioCommandQueue],
) -> None:
    conn, queue = counted
    key = f"sessiond-test-{uuid.uuid4().hex[:10]}:n"
    replies: list[Any] = []

    async def incr() -> None:
        replies.append(await queue.call("INCR", key))

    async with trio.open_nursery() as callers:
        for _ in range(50):
            callers.start_soon(incr)
    assert sorted(replies) == list(range(1, 51))  # each got its own reply
    assert sum(conn.sizes) == 50 and len(conn.sizes) < 50  # in fewer round trips than commands
    error = await queue.call("HGET", key, "f")  # WRONGTYPE: an error reply comes back as its exception
    assert isinstance(error, ResponseError)
    assert await queue.call("DEL", key) == 1


async def test_call_many_sends_its_commands_in_one_exchange_with_other_callers(
    counted: tuple[CountingConnection, TrioCommandQueue],
) -> None:
    conn, queue = counted
    key = f"sessiond-test-{uuid.uuid4().hex[:10]}:n"
    many: list[Any] = []
    one: list[Any] = []

    async def twenty() -> None:
        many.extend(await queue.call_many([("INCR", key)] * 19 + [("HGET", key, "f")]))

    async def single() -> None:
        one.append(await queue.call("SET", f"{key}:other", "x"))

    async with trio.open_nursery() as callers:
        callers.start_soon(twenty)
        callers.start_soon(single)
    assert conn.sizes == [21]  # both callers' commands, one round trip
    assert many[:19] == list(range(1, 20)) and isinstance(many[19], ResponseError)  # its replies, in order
    assert one == [b"OK"]
    assert await queue.call_many([]) == []
    assert await queue.call_many([("DEL", key), ("DEL", f"{key}:other")]) == [1, 1]


async def test_a_cancelled_caller_leaves_the_queue_serving(nursery: trio.Nursery) -> None:
    queue = TrioCommandQueue(TrioRedisConnection(REDIS_URL, 2.0))
    nursery.start_soon(queue.run)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.call("PING")
    assert await queue.call("PING") == b"PONG"


async def test_once_stopped_the_queue_fails_calls_and_closes_its_connection() -> None:
    conn = TrioRedisConnection(REDIS_URL, 2.0)
    queue = TrioCommandQueue(conn)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run)
        assert await queue.call("PING") == b"PONG"
        assert conn.connected
        nursery.cancel_scope.cancel()
    assert not conn.connected
    with pytest.raises(RedisConnectionError):
        await queue.call("PING")


async def test_a_call_waiting_when_the_queue_stops_fails_rather_than_hangs() -> None:
    queue = TrioCommandQueue(TrioRedisConnection(REDIS_URL, 2.0))
    failed: list[BaseException] = []

    async def caller() -> None:
        try:
            await queue.call("PING")
        except RedisConnectionError as exc:
            failed.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            outer.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()  # queued; no sender has run yet
            async with trio.open_nursery() as sender:
                sender.start_soon(queue.run)
                sender.cancel_scope.cancel()  # stops before its first pass
    assert len(failed) == 1


async def _silent_server(nursery: trio.Nursery, *, read: bool) -> int:
    """A loopback 'Redis' that accepts and never answers (reading its input, or not even that)."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            if read:
                async for _ in stream:
                    pass
            else:
                await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, hold, listeners)
    return int(listeners[0].socket.getsockname()[1])


@pytest.mark.parametrize("watched", [True, False], ids=["watchdog", "cancel-scope"])
@pytest.mark.parametrize("big", [False, True], ids=["no-reply", "no-read"])
async def test_an_exchange_with_no_answer_times_out(nursery: trio.Nursery, watched: bool, big: bool) -> None:
    """A hung Redis: the reply never comes, or (big) the request never leaves our buffers. Either way the
    exchange ends near its timeout with redis-py's TimeoutError and the connection closed, with `watch()`
    bounding it or a cancel scope of its own."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    port = await _silent_server(nursery, read=not big)
    conn = TrioRedisConnection(f"redis://127.0.0.1:{port}/0", 0.3)
    if watched:
        nursery.start_soon(conn.watch)
        await trio.testing.wait_all_tasks_blocked()
    command = ["SET", "k", b"x" * (32 << 20)] if big else ["PING"]
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(RedisTimeoutError):
        await conn.exchange([command])
    took = trio.current_time() - started
    assert 0.3 <= took < 2.0, took
    assert not conn.connected


async def test_partial_writes_and_reads_carry_a_large_value_whole(nursery: trio.Nursery) -> None:
    """A request and a reply many socket buffers long: the writes that the kernel takes in parts and the reads
    that arrive in chunks make one exchange, and the connection stays in step for the next."""
    conn = TrioRedisConnection(REDIS_URL, 5.0)
    nursery.start_soon(conn.watch)
    key = f"sessiond-test-{uuid.uuid4().hex[:10]}:big"
    value = bytes(range(256)) * (24 << 12)  # 24 MiB
    try:
        assert await conn.exchange([["SET", key, value], ["GET", key], ["STRLEN", key]]) == [b"OK", value, len(value)]
        assert await conn.exchange([["PING"]]) == [b"PONG"]
    finally:
        await conn.exchange([["DEL", key]])
        conn.close()


async def test_an_exchange_of_no_commands_answers_at_once_and_the_next_one_works(nursery: trio.Nursery) -> None:
    """The reply is awaited before the first read, but only when something was sent: nothing sent, nothing to
    wait for (it would wait until the timeout)."""
    conn = TrioRedisConnection(REDIS_URL, 5.0)
    nursery.start_soon(conn.watch)
    try:
        with trio.fail_after(1):
            assert await conn.exchange([["PING"]]) == [b"PONG"]
            assert await conn.exchange([]) == []
            assert await conn.exchange([["PING"], ["ECHO", "x"]]) == [b"PONG", b"x"]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "command",
    [
        (b"EVAL", b"return 1", 2, "p:{s}:j", "p:{s}:epoch", 100000, 0, 5, b'{"v":5}'),  # hiredis directly
        ["EVAL", "return 1", 0],  # a list: redis-py's packer
        ("SCRIPT LOAD", "return 1"),  # a two-word name, split by redis-py
        (b"SCRIPT LOAD", b"return 1"),  # the same in bytes: still split
        (b"SET", b"k", bytearray(b"v")),  # hiredis refuses a bytearray, redis-py copies it
        (b"SET", b"k", memoryview(b"v")),
        ("SET", "k", 1.5),
    ],
)
def test_pack_writes_what_redis_py_writes(command: Any) -> None:
    assert pack(HiredisRespSerializer(), command) == b"".join(HiredisRespSerializer().pack(*command))


def test_pack_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(DataError):
        pack(HiredisRespSerializer(), (b"SET", b"k", object()))
    with pytest.raises(DataError):
        pack(HiredisRespSerializer(), ("SET", "k", object()))
