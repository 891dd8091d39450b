"""Cross-session group commit: concurrent appends share one round trip; failures reach the right callers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import trio
import trio.testing

from storage.batching import BatchingJournal
from storage.memory import MemoryJournal
from storage.ports import Change, StorageUnavailable


class Refused(RuntimeError):
    def __init__(self, errors: Mapping[str, Exception]) -> None:
        super().__init__("refused")
        self.errors = dict(errors)


class CountingJournal(MemoryJournal):
    """A MemoryJournal with append_many that counts round trips and can fail on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None
        self.gate = trio.Event()
        self.gate.set()

    async def append_many(
        self, batches: Mapping[str, Sequence[Change]], tokens: Mapping[str, int] | None = None
    ) -> None:
        self.calls.append(sorted(batches))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        for sid, changes in batches.items():
            await self.append(sid, changes, (tokens or {}).get(sid, 0))


def change(v: int) -> list[Change]:
    return [Change(v, "d", v, [{"op": "set", "path": "/v", "value": v}])]


async def test_waiting_appends_share_one_round_trip(nursery: trio.Nursery) -> None:
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    nursery.start_soon(journal.run)
    inner.gate = trio.Event()  # hold the first flush so the others queue up behind it
    async with trio.open_nursery() as appenders:
        appenders.start_soon(journal.append, "s0", change(1))
        await trio.testing.wait_all_tasks_blocked()  # its flush is in flight, held at the gate
        for i in range(1, 20):
            appenders.start_soon(journal.append, f"s{i}", change(1))
        await trio.testing.wait_all_tasks_blocked()
        inner.gate.set()
    assert len(inner.calls) == 2 and len(inner.calls[0]) == 1 and len(inner.calls[1]) == 19
    assert [c.version for c in await journal.read_after("s7", 0)] == [1]


async def test_appends_made_in_one_scheduling_batch_share_one_round_trip(nursery: trio.Nursery) -> None:
    """Actors woken together (one read-hub round) append before the flusher, which the first of them woke, runs:
    one round trip for all, with no scheduling pass of the flusher's own to wait for them."""
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    nursery.start_soon(journal.run)
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as appenders:
        for i in range(20):
            appenders.start_soon(journal.append, f"s{i}", change(1))
    assert len(inner.calls) == 1 and len(inner.calls[0]) == 20


async def test_refusals_reach_only_their_sessions(nursery: trio.Nursery) -> None:
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    nursery.start_soon(journal.run)
    inner.fail = Refused({"bad": StorageUnavailable("journal full")})
    results: dict[str, str] = {}

    async def append(sid: str) -> None:
        try:
            await journal.append(sid, change(1))
            results[sid] = "ok"
        except StorageUnavailable:
            results[sid] = "refused"

    inner.gate = trio.Event()
    async with trio.open_nursery() as appenders:
        appenders.start_soon(append, "first")
        await trio.testing.wait_all_tasks_blocked()
        appenders.start_soon(append, "bad")
        appenders.start_soon(append, "good")
        await trio.testing.wait_all_tasks_blocked()
        inner.gate.set()
    assert results == {"first": "ok", "bad": "refused", "good": "ok"}


async def test_an_outage_fails_every_waiter_and_the_next_flush_works(nursery: trio.Nursery) -> None:
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    nursery.start_soon(journal.run)
    inner.fail = StorageUnavailable("redis down")
    with pytest.raises(StorageUnavailable):
        await journal.append("s", change(1))
    inner.fail = None
    await journal.append("s", change(1))
    assert [c.version for c in await journal.read_after("s", 0)] == [1]


async def test_an_appender_cancelled_while_waiting_leaves_the_flush_and_the_others_whole(
    nursery: trio.Nursery,
) -> None:
    """The waiting actor goes (its cancel scope, a lease lost); the batch it joined is still written, the other
    waiters get their answers, and the flusher goes on serving."""
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    nursery.start_soon(journal.run)
    inner.gate = trio.Event()
    done: list[str] = []

    async def append(sid: str) -> None:
        await journal.append(sid, change(1))
        done.append(sid)

    async with trio.open_nursery() as appenders:
        with trio.CancelScope() as gone:
            appenders.start_soon(append, "other")
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as mine:
                mine.start_soon(append, "mine")
                await trio.testing.wait_all_tasks_blocked()
                gone.cancel()
        inner.gate.set()
    assert done == ["other"]
    assert [c.version for c in await journal.read_after("mine", 0)] == [1]  # written all the same
    await journal.append("later", change(1))
    assert [c.version for c in await journal.read_after("later", 0)] == [1]


async def test_appends_queued_when_the_flusher_stops_fail_rather_than_hang() -> None:
    """The storage closes (its nursery is cancelled) with a flush in flight and appends queued behind it: every
    waiter gets StorageUnavailable at once."""
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    inner.gate = trio.Event()  # never opened: the first flush hangs in flight
    outcomes: dict[str, str] = {}

    async def append(sid: str) -> None:
        try:
            await journal.append(sid, change(1))
        except StorageUnavailable:
            outcomes[sid] = "unavailable"
        else:
            outcomes[sid] = "written"

    with trio.fail_after(10):  # a waiter left hanging fails here, not by stalling the suite
        async with trio.open_nursery() as appenders:
            with trio.CancelScope() as flusher:
                appenders.start_soon(append, "in-flight")
                async with trio.open_nursery() as storage:
                    storage.start_soon(journal.run)
                    await trio.testing.wait_all_tasks_blocked()
                    appenders.start_soon(append, "queued")
                    await trio.testing.wait_all_tasks_blocked()
                    assert inner.calls == [["in-flight"]]
                    flusher.cancel()
    assert outcomes == {"in-flight": "unavailable", "queued": "unavailable"}
    with pytest.raises(StorageUnavailable):
        await journal.append("later", change(1))  # nobody flushes any more: refused at once


async def test_a_flusher_cancelled_while_idle_can_be_started_again() -> None:
    """Cancelled while it waits for work, the flusher leaves no stale waiter behind: a new one serves appends."""
    inner = CountingJournal()
    journal = BatchingJournal(inner)
    with trio.CancelScope() as first:
        async with trio.open_nursery() as storage:
            storage.start_soon(journal.run)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
    async with trio.open_nursery() as storage:
        storage.start_soon(journal.run)
        await trio.testing.wait_all_tasks_blocked()  # running again: appends are taken again
        await journal.append("s", change(1))
        storage.cancel_scope.cancel()
    assert inner.calls == [["s"]]
    assert [c.version for c in await journal.read_after("s", 0)] == [1]
