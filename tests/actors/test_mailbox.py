"""The actor's mailbox: bounded, one reader, closed for senders while the reader drains what is left."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.mailbox import Mailbox


async def test_holds_exactly_its_limit_and_keeps_order() -> None:
    box: Mailbox[int] = Mailbox(3)
    for n in range(3):
        box.put_nowait(n)
    with pytest.raises(trio.WouldBlock):
        box.put_nowait(3)
    assert len(box) == 3
    assert [await box.get(), box.get_nowait(), await box.get()] == [0, 1, 2]
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()


async def test_a_waiting_reader_is_woken_by_a_put() -> None:
    box: Mailbox[str] = Mailbox(1)
    got: list[str] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            got.append(await box.get())

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.put_nowait("hello")
    assert got == ["hello"]


async def test_close_refuses_senders_and_lets_the_reader_drain_then_end() -> None:
    box: Mailbox[int] = Mailbox(4)
    box.put_nowait(1)
    box.put_nowait(2)
    box.close()
    with pytest.raises(trio.ClosedResourceError):
        box.put_nowait(3)
    assert await box.get() == 1
    assert box.get_nowait() == 2
    with pytest.raises(trio.EndOfChannel):
        box.get_nowait()
    with pytest.raises(trio.EndOfChannel):
        await box.get()


async def test_close_wakes_a_waiting_reader_with_end_of_channel() -> None:
    box: Mailbox[int] = Mailbox(1)
    ended = trio.Event()
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            with pytest.raises(trio.EndOfChannel):
                await box.get()
            ended.set()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert ended.is_set()


async def test_a_waiting_reader_can_be_cancelled_and_a_later_reader_still_gets_mail() -> None:
    box: Mailbox[int] = Mailbox(1)
    with trio.move_on_after(0.01) as scope:
        await box.get()
    assert scope.cancelled_caught
    box.put_nowait(7)
    assert await box.get() == 7


async def test_a_reader_with_mail_waiting_still_yields_to_others() -> None:
    """Like a channel: taking a message that is already there is a schedule point, so a busy actor cannot starve
    the rest of the server."""
    box: Mailbox[int] = Mailbox(1000)
    for n in range(1000):
        box.put_nowait(n)
    other_ran = 0

    async def other() -> None:
        nonlocal other_ran
        while True:
            other_ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(1000):
            await box.get()
        nursery.cancel_scope.cancel()
    assert other_ran >= 100


async def test_a_reader_woken_by_mail_takes_it_in_one_task_step() -> None:
    """The sleep was the reader's schedule point: woken, it returns the message at once rather than queueing for
    one more pass through trio's run queue (one per turn of every idle-then-woken actor)."""
    box: Mailbox[int] = Mailbox(10)
    got: list[int] = []
    steps: list[trio.lowlevel.Task] = []

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps.append(task)

    async def reader(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        task_status.started(trio.lowlevel.current_task())
        got.append(await box.get())

    async with trio.open_nursery() as nursery:
        task = await nursery.start(reader)
        await trio.testing.wait_all_tasks_blocked()  # asleep in get()
        instrument = Steps()
        trio.lowlevel.add_instrument(instrument)
        try:
            box.put_nowait(7)
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(instrument)
    assert got == [7]
    assert steps.count(task) == 1
