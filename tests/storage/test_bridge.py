"""The trio -> asyncio bridge: results, errors, cancellation both ways, concurrency, context, timeouts."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest
import trio

from storage.bridge import Bridge, BridgeClosed, open_bridge

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_result_and_thread() -> None:
    async def work(a: int, b: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return a + b, threading.current_thread().name

    async with open_bridge() as bridge:
        total, thread = await bridge.run(work, 2, 3)
    assert total == 5
    assert thread == "sessiond-asyncio"
    assert thread != threading.current_thread().name


async def test_exception_reraises_in_trio() -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise KeyError("missing")

    async with open_bridge() as bridge:
        with pytest.raises(KeyError, match="missing"):
            await bridge.run(boom)
        assert await bridge.run(asyncio.sleep, 0, "still works") == "still works"  # type: ignore[func-returns-value]


async def test_trio_cancel_cancels_asyncio_task_and_waits() -> None:
    started = threading.Event()
    saw: list[str] = []

    async def long() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that the trio side must wait for
            saw.append("cancelled-and-cleaned")
            raise

    async with open_bridge() as bridge:
        with trio.move_on_after(0.1) as scope:
            await bridge.run(long)
        assert scope.cancelled_caught
        assert started.is_set()
        assert saw == ["cancelled-and-cleaned"]  # finished before run() returned


async def test_timeout_via_move_on_after_is_prompt() -> None:
    async with open_bridge() as bridge:
        t0 = trio.current_time()
        with trio.move_on_after(0.05):
            await bridge.run(asyncio.sleep, 10)
        assert trio.current_time() - t0 < 1.0


async def test_asyncio_side_cancellation_is_bridge_closed() -> None:
    async def cancel_self() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    async with open_bridge() as bridge:
        with pytest.raises(BridgeClosed):
            await bridge.run(cancel_self)


async def test_asyncio_timeout_error_crosses() -> None:
    async def slow() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    async with open_bridge() as bridge:
        with pytest.raises(TimeoutError):
            await bridge.run(slow)


async def test_thousand_concurrent_calls() -> None:
    results: dict[int, int] = {}

    async def square(i: int) -> int:
        await asyncio.sleep(0.001 * (i % 7))
        return i * i

    async def one(bridge: Bridge, i: int) -> None:
        results[i] = await bridge.run(square, i)

    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        for i in range(1000):
            nursery.start_soon(one, bridge, i)
    assert results == {i: i * i for i in range(1000)}


async def test_contextvars_follow_each_call() -> None:
    async def read_var() -> str:
        await asyncio.sleep(0.01)
        return request_id.get()

    seen: dict[str, str] = {}

    async def caller(bridge: Bridge, rid: str) -> None:
        request_id.set(rid)
        seen[rid] = await bridge.run(read_var)

    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(caller, bridge, f"r{i}")
    assert seen == {f"r{i}": f"r{i}" for i in range(5)}


async def test_call_soon_runs_on_loop() -> None:
    done = threading.Event()
    names: list[str] = []

    def cb(tag: str) -> None:
        names.append(f"{tag}@{threading.current_thread().name}")
        done.set()

    async with open_bridge() as bridge:
        bridge.call_soon(cb, "x")
        await trio.to_thread.run_sync(done.wait, 2.0)
    assert names == ["x@sessiond-asyncio"]


async def test_shutdown_cancels_leftover_tasks_and_joins_thread() -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with open_bridge() as bridge:
        bridge.loop.call_soon_threadsafe(lambda: bridge.loop.create_task(forever()))
        await bridge.run(asyncio.sleep, 0.01)
    assert cancelled.is_set()
    assert bridge.loop.is_closed()
    assert not any(t.name == "sessiond-asyncio" for t in threading.enumerate())
    with pytest.raises(BridgeClosed):
        await bridge.run(asyncio.sleep, 0)


async def test_caller_waiting_at_shutdown_gets_bridge_closed() -> None:
    errors: list[BaseException] = []
    token = trio.lowlevel.current_trio_token()
    running = trio.Event()

    async def long_call() -> None:
        token.run_sync_soon(running.set)  # tells the trio side the call is under way on the asyncio loop
        await asyncio.sleep(30)

    async def waiter(bridge: Bridge, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await bridge.run(long_call)
        except BridgeClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, open_bridge() as bridge:
        await nursery.start(waiter, bridge)
        with trio.fail_after(5):
            await running.wait()
    assert len(errors) == 1


# ---- the bounded asyncio -> trio stream (pub/sub subscriptions) -------------------------------------------


async def test_stream_delivers_in_order_from_the_asyncio_side() -> None:
    async with open_bridge() as bridge:
        stream = bridge.stream(max_items=100, max_bytes=1 << 20)

        def produce() -> None:
            for i in range(50):
                stream.push(str(i).encode())

        bridge.call_soon(produce)
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < 50:
                items, gap = await stream.receive()
                assert not gap
                got.extend(items)
        assert got == [str(i).encode() for i in range(50)]


async def test_stream_is_bounded_and_reports_what_it_dropped_as_a_gap() -> None:
    """A consumer that falls behind does not grow the process: past the bounds messages are dropped, and the next
    receive says so (the relay then resyncs its links instead of silently missing frames)."""
    async with open_bridge() as bridge:
        stream = bridge.stream(max_items=10, max_bytes=1 << 20)
        by_bytes = bridge.stream(max_items=1000, max_bytes=100)
        done = trio.Event()

        def produce() -> None:
            for i in range(25):
                stream.push(b"%d" % i)
            for _ in range(5):
                by_bytes.push(b"x" * 40)  # the third one would pass 100 bytes
            bridge._token.run_sync_soon(done.set)

        bridge.call_soon(produce)
        with trio.fail_after(5):
            await done.wait()
            items, gap = await stream.receive()
            assert gap and items == [b"%d" % i for i in range(10)] and stream.dropped == 15
            items, gap = await by_bytes.receive()
            assert gap and len(items) == 2
        bridge.call_soon(stream.push, b"later")  # room again once taken
        with trio.fail_after(5):
            assert await stream.receive() == ([b"later"], False)


async def test_stream_gap_marker_alone_wakes_the_consumer() -> None:
    async with open_bridge() as bridge:
        stream = bridge.stream(max_items=10, max_bytes=1000)
        bridge.call_soon(stream.mark_gap)
        with trio.fail_after(5):
            assert await stream.receive() == ([], True)
