"""An actor's bounded mailbox: a deque and one sleeping reader.

A trio memory channel per actor costs about 2.5 KiB (its state, two channel objects, a statistics-capable
waiter table, a parking lot); an idle actor's whole budget is 6 KiB (issue 9). The actor needs less: one reader,
non-blocking senders, a bound, and a close that lets the reader drain what is left. The exceptions are the
channel's, so callers read the same.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio

from runtime.sleeper import Sleeper

T = TypeVar("T")


class Mailbox(Generic[T]):
    __slots__ = ("_closed", "_items", "_limit", "_reader")

    def __init__(self, limit: int) -> None:
        self._items: deque[T] | None = None  # made at the first message: an empty deque is 600+ bytes
        self._limit = limit
        self._closed = False
        self._reader = Sleeper()

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def put_nowait(self, item: T) -> None:
        """Raises `trio.ClosedResourceError` once closed, `trio.WouldBlock` when full."""
        if self._closed:
            raise trio.ClosedResourceError("the mailbox is closed")
        items = self._items
        if items is None:
            items = self._items = deque()
        elif len(items) >= self._limit:
            raise trio.WouldBlock
        items.append(item)
        self._reader.wake()

    def get_nowait(self) -> T:
        """Raises `trio.WouldBlock` when empty, `trio.EndOfChannel` when empty and closed."""
        items = self._items
        if items:
            return items.popleft()
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def get(self) -> T:
        """The next message, waiting for one (one reader at a time); `trio.EndOfChannel` once closed and empty."""
        slept = False
        while True:
            items = self._items
            if items:
                if slept:
                    # The sleep was this call's checkpoint (it could be cancelled and it yielded): a second one
                    # here cost every idle-then-woken actor a pass through trio's run queue per turn.
                    return items.popleft()
                await trio.lowlevel.checkpoint_if_cancelled()
                item = items.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()  # as a channel does: a busy actor still yields
                return item
            if self._closed:
                raise trio.EndOfChannel
            await self._reader.sleep()
            slept = True

    def shrink(self) -> None:
        """Give the empty buffer back (an actor going dormant): the next message makes a new one."""
        if not self._items:
            self._items = None

    def close(self) -> None:
        """No more messages in; what is queued can still be taken."""
        self._closed = True
        self._reader.wake()
