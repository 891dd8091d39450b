"""Keepalive pings, the idle cut-off and token expiry of every connection, timed by one task for the server.

A task per connection that sleeps for 20 s at a time costs a task's memory on every idle device (issue 9: at most
25 KiB per idle device). The `Watchman` keeps one heap of deadlines instead and wakes for the earliest; each
connection's `Watch` says what is due and does it.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable

import trio

from protocol import codec, codes
from transport import metrics
from transport.connection import Connection, Sleeper


class Watch:
    """One connection's timers: a ping every `ping_interval_s` (by `ping`, which must not block), a close
    after `idle_timeout_s` without a message or pong, and a close when the token expires."""

    __slots__ = ("_exp", "_next_ping", "conn", "due", "idle_timeout_s", "last_seen", "ping", "ping_interval_s", "sub")

    def __init__(
        self,
        conn: Connection,
        exp: float,
        sub: str,
        ping: Callable[[], None],
        ping_interval_s: float,
        idle_timeout_s: float,
    ) -> None:
        self.conn = conn
        self.sub = sub
        self.ping = ping
        self.ping_interval_s = ping_interval_s
        self.idle_timeout_s = idle_timeout_s
        now = trio.current_time()
        self.last_seen = now
        self._exp = exp
        # A random phase per connection: devices that connected together are not all pinged in one burst.
        self._next_ping = now + random.uniform(0, ping_interval_s)
        self.due = 0.0  # when the watchman calls `fire` next (0.0: not scheduled yet)

    @property
    def over(self) -> bool:
        return self.conn.close_request is not None or self.conn.closed.is_set()

    def seen(self) -> None:
        """The peer showed it is alive (a pong)."""
        self.last_seen = trio.current_time()

    def next_due(self) -> float:
        return min(self._next_ping, trio.current_time() + (self._exp - time.time()))

    def extend(self, exp: float) -> None:
        self._exp = exp

    def fire(self, now: float) -> None:
        """Do what is due; the watchman reschedules at `next_due()` unless the connection is over."""
        if self._exp <= time.time():
            metrics.CLOSES.labels(str(codes.UNAUTHORIZED)).inc()
            self.conn.send_nowait(codec.error_frame(codes.E_UNAUTHORIZED, "token expired"))
            self.conn.close(codes.UNAUTHORIZED, "token expired")
            return
        if now >= self._next_ping:
            if now - self.last_seen >= self.idle_timeout_s:
                metrics.CLOSES.labels(str(codes.GOING_AWAY)).inc()
                self.conn.close(codes.GOING_AWAY, "idle timeout")
                return
            self.ping()
            self._next_ping = now + self.ping_interval_s


class Watchman:
    """The one task that fires every connection's `Watch` when it is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()  # ties never compare two Watches
        self._sleeper = Sleeper()

    def add(self, watch: Watch) -> None:
        self._schedule(watch, watch.next_due())

    def reschedule(self, watch: Watch) -> None:
        """The watch's deadline moved (a refreshed token): the old heap entry goes stale and is skipped."""
        self._schedule(watch, watch.next_due())

    def _schedule(self, watch: Watch, due: float) -> None:
        watch.due = due
        heap = self._heap
        earliest = heap[0][0] if heap else None
        heapq.heappush(heap, (due, next(self._order), watch))
        if earliest is None or due < earliest:
            self._sleeper.wake()

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
                due, _, watch = heapq.heappop(heap)
                if due != watch.due or watch.over:
                    continue  # stale (rescheduled) or its connection is over
                watch.fire(now)
                if not watch.over:
                    self._schedule(watch, watch.next_due())
