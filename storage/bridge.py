"""A batched trio -> asyncio bridge: one asyncio loop in a helper thread (DESIGN §1, notes/stack-spike.md §3).

redis.asyncio, asyncpg and pika's AsyncioConnection only run on asyncio. They all live on one dedicated loop
owned by `open_bridge()`; trio reaches it through `Bridge.run`. Wakeups are coalesced in both directions (a deque
plus a pending flag, one `call_soon_threadsafe` / `run_sync_soon` per burst): that is what keeps concurrent calls
cheap (67k calls/s vs 18k for one wakeup per call in the spike). Only messages cross: the asyncio side never
touches trio objects except through `reschedule` on the trio thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import outcome
import trio

from storage.metrics import BRIDGE_CALL_SECONDS
from storage.ports import StorageUnavailable

T = TypeVar("T")


class BridgeClosed(StorageUnavailable):
    """The bridge is shut down (or its loop cancelled the call while stopping)."""


class _Call:
    """One `Bridge.run` in flight: created on trio, started and finished on asyncio."""

    __slots__ = (
        "args",
        "cancel_requested",
        "cancelled",
        "context",
        "fn",
        "raise_cancel",
        "result",
        "task",
        "trio_task",
    )

    def __init__(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...], trio_task: trio.lowlevel.Task
    ) -> None:
        self.fn = fn
        self.args = args
        self.context = contextvars.copy_context()  # structlog etc. follow the call, per call
        self.trio_task = trio_task
        self.task: asyncio.Task[Any] | None = None
        self.cancel_requested = False  # set on trio, read on asyncio
        self.raise_cancel: trio.lowlevel.RaiseCancelT | None = None
        self.cancelled = False  # the asyncio side stopped because trio asked
        self.result: outcome.Outcome[Any] | None = None


class Bridge:
    """Handle to the asyncio loop; use `open_bridge()` to get one.

    `run` and `call_soon` must be called from the trio thread that opened the bridge. `loop` is for code that
    must create asyncio objects on the bridge thread (via `run`/`call_soon`, never directly from trio).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self.loop = loop
        self._token = token
        self._to_aio: deque[_Call | tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._aio_pending = False
        self._to_trio: deque[_Call] = deque()
        self._trio_pending = False
        self._closed = False
        # asyncio keeps only weak references to tasks: hold ours until they finish (asyncio side only).
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- trio side -------------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run `await fn(*args)` on the asyncio loop and return its result here.

        Exceptions re-raise in trio; trio cancellation cancels the asyncio task and waits for it to end,
        so nothing keeps running on the other side after this returns.
        """
        if self._closed:
            raise BridgeClosed("bridge is closed")
        started = time.perf_counter()
        call = _Call(fn, args, trio.lowlevel.current_task())
        self._send(call)

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Ask asyncio to cancel, then keep waiting: the task reports back when it has really stopped.
            call.raise_cancel = raise_cancel
            call.cancel_requested = True
            try:
                self.loop.call_soon_threadsafe(self._cancel_call, call)
            except RuntimeError:  # loop already closed: nothing runs there any more
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:  # once per call (calls carry whole batches), failed ones included
            BRIDGE_CALL_SECONDS.observe(time.perf_counter() - started)
        return result

    def stream(self, max_items: int, max_bytes: int) -> BridgeStream:
        """A bounded asyncio -> trio stream for a producer running on this bridge's loop."""
        return BridgeStream(self._token, max_items, max_bytes)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the plain callable `fn(*args)` on the asyncio loop soon (batched; never blocks trio)."""
        if self._closed:
            raise BridgeClosed("bridge is closed")
        self._send((fn, args))

    def _send(self, item: _Call | tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        self._to_aio.append(item)
        if not self._aio_pending:
            self._aio_pending = True
            self.loop.call_soon_threadsafe(self._drain_aio)

    def _drain_trio(self) -> None:
        self._trio_pending = False
        while self._to_trio:
            call = self._to_trio.popleft()
            if call.cancelled:
                assert call.raise_cancel is not None
                trio.lowlevel.reschedule(call.trio_task, outcome.capture(call.raise_cancel))
            else:
                assert call.result is not None
                trio.lowlevel.reschedule(call.trio_task, call.result)

    # -- asyncio side ----------------------------------------------------------------------------------

    def _drain_aio(self) -> None:
        self._aio_pending = False
        while self._to_aio:
            item = self._to_aio.popleft()
            if isinstance(item, tuple):
                fn, args = item
                try:
                    fn(*args)
                except Exception as exc:  # a callback's bug must not stop the drain
                    self.loop.call_exception_handler({"message": "bridge callback failed", "exception": exc})
                continue
            if item.cancel_requested:
                self._finish(item, None)
                continue
            task: asyncio.Task[Any] = self.loop.create_task(item.fn(*item.args), context=item.context)
            item.task = task
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finish, item))

    def _cancel_call(self, call: _Call) -> None:
        if call.task is not None:
            call.task.cancel()
        # Not started yet: _drain_aio sees cancel_requested and finishes it without starting.

    def _finish(self, call: _Call, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)
        if task is None or task.cancelled():
            if call.cancel_requested:
                call.cancelled = True  # trio raises Cancelled itself, on its own thread
            else:
                call.result = outcome.Error(BridgeClosed("asyncio loop cancelled the call (shutting down)"))
        else:
            exc = task.exception()
            call.result = outcome.Error(exc) if exc is not None else outcome.Value(task.result())
        self._to_trio.append(call)
        if not self._trio_pending:
            self._trio_pending = True
            try:
                self._token.run_sync_soon(self._drain_trio)
            except trio.RunFinishedError:  # trio is gone; nobody is waiting any more
                self._to_trio.clear()

    async def _shutdown(self) -> None:
        """Cancel what is still running on the loop and wait for it, then stop the loop."""
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()


class BridgeStream:
    """A bounded asyncio -> trio stream (pub/sub subscriptions): the asyncio side `push`es, trio `receive`s.

    Bounded in items and bytes: when trio falls behind, what does not fit is dropped and the next `receive`
    reports a gap, so the consumer resyncs instead of the process growing without limit (notes/stack-spike.md
    §5). Wakeups are coalesced: one `run_sync_soon` per burst, like the bridge's calls.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, max_items: int, max_bytes: int) -> None:
        self._token = token
        self.max_items = max_items
        self.max_bytes = max_bytes
        # Shared by both threads: deque appends and pops are atomic; every counter has a single writer.
        self._items: deque[bytes] = deque()
        self._pushed_bytes = 0  # asyncio side
        self._taken_bytes = 0  # trio side
        self._gaps = 0  # asyncio side
        self._gaps_seen = 0  # trio side
        self._wake_pending = False
        self._waiter: trio.lowlevel.Task | None = None
        self.dropped = 0  # asyncio side
        self.closed = False

    # -- asyncio side ----------------------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        if len(self._items) >= self.max_items or self._pushed_bytes - self._taken_bytes + len(data) > self.max_bytes:
            self._gaps += 1
            self.dropped += 1
        else:
            self._pushed_bytes += len(data)
            self._items.append(data)
        self._notify()

    def mark_gap(self) -> None:
        """Messages may have been lost upstream (the subscription's connection dropped)."""
        self._gaps += 1
        self._notify()

    def _notify(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake)

    # -- trio side -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wake_pending = False
        task, self._waiter = self._waiter, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def receive(self) -> tuple[list[bytes], bool]:
        """Everything queued (waiting for at least one message or a gap), and whether a gap came first."""
        while not self._items and self._gaps == self._gaps_seen:
            if self.closed:
                raise trio.EndOfChannel
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        gaps = self._gaps
        gap, self._gaps_seen = gaps != self._gaps_seen, gaps
        items = []
        taken = 0
        while self._items:
            data = self._items.popleft()
            taken += len(data)
            items.append(data)
        self._taken_bytes += taken
        return items, gap


@asynccontextmanager
async def open_bridge() -> AsyncIterator[Bridge]:
    """Start the asyncio thread, yield the bridge, and on exit cancel leftovers and join the thread."""
    loop = asyncio.new_event_loop()
    bridge = Bridge(loop, trio.lowlevel.current_trio_token())
    stopped = threading.Event()

    def thread_main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()
            stopped.set()

    thread = threading.Thread(target=thread_main, name="sessiond-asyncio", daemon=True)
    thread.start()
    try:
        yield bridge
    finally:
        bridge._closed = True

        async def stop() -> None:
            try:
                await bridge._shutdown()
            finally:
                loop.stop()

        bridge._send((lambda: loop.create_task(stop()), ()))
        # Joining blocks: do it in a worker thread. Uncancellable on purpose: the thread must be gone.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
            # Outcomes of cancelled calls may still be queued for trio: let them drain.
            await trio.lowlevel.checkpoint()
