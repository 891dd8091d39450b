"""Many deadlines, one task: a heap of entries, woken for the earliest.

A task per timer that sleeps most of its life costs a task's memory on every idle actor and every idle device
(issue 9: at most 6 KiB per idle actor, 25 KiB per idle device). Used for each session actor's checkpoint and
passivation alarm (actors/registry.py) and each connection's pings, idle cut-off and token expiry
(transport/watch.py).

Moving or cancelling a deadline empties the item's current entry instead of searching the heap (the heapq
documentation's "removed entry" pattern): the empty entry is skipped when its time comes, and it holds no
reference to the item, so a stopped actor or a closed connection is freed at once, not at its old deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Protocol

import trio

from runtime.sleeper import Sleeper

# An entry: [deadline, order, item or None]. A list, so that it can be emptied in place.
Entry = list[Any]


class Timed(Protocol):
    timer_entry: Entry | None  # the item's live entry in a heap; None when not scheduled

    def expire(self, now: float) -> float:
        """Do what is due; return the next deadline (math.inf: none)."""
        ...


class TimerHeap:
    """Fires each scheduled item once its deadline has passed, in deadline order, from one task (`run`)."""

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._order = itertools.count()  # ties never compare two items
        self._sleeper = Sleeper()

    def __len__(self) -> int:
        """Heap entries, emptied ones included (they leave when their deadline comes)."""
        return len(self._heap)

    def schedule(self, item: Timed, deadline: float) -> None:
        """Fire `item` at `deadline` (trio clock), instead of any earlier schedule; math.inf cancels."""
        self.cancel(item)
        if deadline == math.inf:
            return
        heap = self._heap
        earliest = heap[0][0] if heap else math.inf
        entry: Entry = [deadline, next(self._order), item]
        item.timer_entry = entry
        heapq.heappush(heap, entry)
        if deadline < earliest:
            self._sleeper.wake()

    @staticmethod
    def cancel(item: Timed) -> None:
        entry = item.timer_entry
        if entry is not None:
            entry[2] = None
            item.timer_entry = None

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                await self._sleeper.sleep()
                continue
            with trio.move_on_at(heap[0][0]):
                await self._sleeper.sleep()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                item = heapq.heappop(heap)[2]
                if item is None:
                    continue  # moved or cancelled since
                item.timer_entry = None
                self.schedule(item, item.expire(now))
