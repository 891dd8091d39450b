"""The timer heap: many deadlines, one task; rescheduled and cancelled entries are skipped (MockClock)."""

from __future__ import annotations

import math
import weakref

import pytest
import trio
import trio.testing

from runtime.timers import Entry, TimerHeap


class Alarm:
    """Fires at its deadline and records when; `every` makes it periodic."""

    def __init__(self, every: float = math.inf) -> None:
        self.timer_entry: Entry | None = None
        self.every = every
        self.fired: list[float] = []

    def expire(self, now: float) -> float:
        self.fired.append(now)
        return now + self.every


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_items_fire_in_deadline_order_once_each(autojump_clock: trio.testing.MockClock) -> None:
    timers = TimerHeap()
    alarms = {name: Alarm() for name in "abc"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        for name, delay in (("a", 30.0), ("b", 10.0), ("c", 20.0)):
            timers.schedule(alarms[name], start + delay)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert {name: [t - start for t in alarm.fired] for name, alarm in alarms.items()} == {
        "a": [30.0], "b": [10.0], "c": [20.0]
    }


async def test_an_earlier_deadline_wakes_the_sleeping_heap(autojump_clock: trio.testing.MockClock) -> None:
    timers = TimerHeap()
    late, early = Alarm(), Alarm()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.schedule(late, start + 1000)
        await trio.sleep(1)
        timers.schedule(early, start + 5)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [t - start for t in early.fired] == [5.0]
    assert late.fired == []


async def test_rescheduled_and_cancelled_items_skip_their_stale_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = TimerHeap()
    moved, cancelled = Alarm(), Alarm()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.schedule(moved, start + 10)
        timers.schedule(cancelled, start + 10)
        timers.schedule(moved, start + 50)  # the entry at +10 is stale now
        TimerHeap.cancel(cancelled)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert [t - start for t in moved.fired] == [50.0]
    assert cancelled.fired == []
    assert len(timers) == 0  # stale entries leave when their time comes


async def test_a_periodic_item_is_rescheduled_by_what_expire_returns(autojump_clock: trio.testing.MockClock) -> None:
    timers = TimerHeap()
    tick = Alarm(every=7.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.schedule(tick, start + 7.0)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert [t - start for t in tick.fired] == [7.0, 14.0, 21.0, 28.0]


async def test_a_cancelled_or_moved_item_is_not_kept_alive_by_its_old_entry() -> None:
    """A stopped actor (or a closed connection) must be freed at once, not at its old deadline: the heap kept
    every churned session's actor, state and replay patches for up to the passivation delay (300 s)."""
    timers = TimerHeap()
    cancelled, moved = Alarm(), Alarm()
    timers.schedule(cancelled, trio.current_time() + 300)
    timers.schedule(moved, trio.current_time() + 300)
    timers.schedule(moved, trio.current_time() + 600)
    TimerHeap.cancel(cancelled)
    gone = weakref.ref(cancelled)
    del cancelled
    assert gone() is None
    assert len(timers) == 3  # the emptied entries wait for their time; they hold nothing
    assert sum(entry[2] is moved for entry in timers._heap) == 1
