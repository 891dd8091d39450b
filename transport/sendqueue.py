"""One device's bounded send queue as a sans-I/O object: what to keep, drop or resync when it is full.

The rules (DESIGN §5 guarantee 5), decided where the device is connected, whichever pod owns its session:
- a full queue (frames or bytes) drops the queued frames a fresh welcome supersedes (patches, presence,
  handoff, older welcomes) and asks the session for one (`RESYNC`); acks and errors stay queued;
- until that welcome arrives, superseded frames are dropped on arrival;
- the welcome removes whatever superseded frames are still queued in front of it;
- a device that overflows again before that welcome was written cannot keep up: `EVICT`.
`Connection` (the trio side) performs the actions; tests drive this class directly.
"""

from __future__ import annotations

import enum
from collections import deque

# Frames a full welcome makes redundant: the welcome carries the state, presence and active device they tell.
SUPERSEDED = frozenset({"patch", "presence", "handoff", "welcome"})


class Push(enum.Enum):
    QUEUED = "queued"
    DROPPED = "dropped"  # superseded by the welcome that is on its way
    RESYNC = "resync"  # the queue overflowed: ask the session for a fresh welcome
    EVICT = "evict"  # overflowed again before the resync welcome went out: disconnect (slow_consumer)


class SendQueue:
    """Frames waiting for one device's writer, bounded in count and in bytes."""

    __slots__ = ("_awaiting", "_bytes", "_items", "_welcome_left", "max_bytes", "max_frames")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        # (superseded by a welcome?, encoded frame). Made at the first frame: an empty deque is 760 bytes, and
        # most devices are idle most of the time (issue 9: at most 25 KiB per idle device).
        self._items: deque[tuple[bool, str | bytes]] | tuple[()] = ()
        self._bytes = 0
        self._awaiting = False  # a resync welcome was asked for and has not arrived
        self._welcome_left = 0  # frames to take until the queued welcome is out (0: none queued)

    def shrink(self) -> None:
        """Give an empty queue's buffer back (called for idle devices, on their keepalive ping)."""
        if not self._items:
            self._items = ()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def resyncing(self) -> bool:
        """True from an overflow until the welcome that answers it has been taken by the writer."""
        return self._awaiting or self._welcome_left > 0

    def push(self, kind: str, data: str | bytes) -> Push:
        superseded = kind in SUPERSEDED
        if kind == "welcome":
            self._drop_superseded()
            self._append(True, data)
            if self._awaiting or self._welcome_left:  # the answer to our overflow (or its replacement):
                self._awaiting = False  # resyncing until it is out
                self._welcome_left = len(self._items)
            return Push.QUEUED
        if superseded and self._awaiting:
            return Push.DROPPED
        if len(self._items) < self.max_frames and self._bytes + len(data) <= self.max_bytes:
            self._append(superseded, data)
            return Push.QUEUED
        if self.resyncing:
            return Push.EVICT
        self._drop_superseded()
        self._awaiting = True
        if superseded:
            return Push.RESYNC
        if len(self._items) >= self.max_frames or self._bytes + len(data) > self.max_bytes:
            return Push.EVICT  # acks and errors alone fill it: the device does not read at all
        self._append(False, data)
        return Push.RESYNC

    def peek(self) -> list[str | bytes]:
        """Everything queued, oldest first, without taking it (inspection and tests)."""
        return [data for _, data in self._items]

    def push_final(self, data: str | bytes) -> None:
        """Queue a last frame regardless of the bounds (the error frame before a close)."""
        self._append(False, data)

    def take(self, max_frames: int, max_bytes: int) -> list[str | bytes]:
        """The next frames for one write, oldest first (at least one when any is queued)."""
        items = self._items
        batch: list[str | bytes] = []
        size = 0
        while items and len(batch) < max_frames and size < max_bytes:
            data = items.popleft()[1]
            batch.append(data)
            size += len(data)
        self._bytes -= size
        if self._welcome_left:
            self._welcome_left = max(0, self._welcome_left - len(batch))
        return batch

    def _append(self, superseded: bool, data: str | bytes) -> None:
        items = self._items
        if not isinstance(items, deque):
            items = self._items = deque()
        items.append((superseded, data))
        self._bytes += len(data)

    def _drop_superseded(self) -> None:
        if any(s for s, _ in self._items):
            kept = deque(item for item in self._items if not item[0])
            self._bytes = sum(len(d) for _, d in kept)
            self._items = kept
