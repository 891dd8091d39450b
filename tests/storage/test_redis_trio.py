"""The trio Redis command queue (storage/redis_trio.py) against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio
import trio.testing
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from storage.redis_trio import TrioCommandQueue, TrioRedisConnection

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


async def test_what_waits_during_an_exchange_goes_in_the_next_one(nursery: trio.Nursery) -> None:
    conn = CountingConnection()
    queue = TrioCommandQueue(conn)
    nursery.start_soon(queue.run)
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
