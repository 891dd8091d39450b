"""One task asleep until woken: the cheapest wait trio has.

A `trio.Event` per wake-up costs an object, a parking lot and a set of waiters each time; this is one slot. The
flusher, a connection's writer, an actor's mailbox and the timer heaps all sleep this way.
"""

from __future__ import annotations

import trio


class Sleeper:
    """At most one sleeping task; `wake` reschedules it (a no-op when nobody sleeps). Cancellation works as for
    any trio wait."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def sleep(self) -> None:
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
