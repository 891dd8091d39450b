"""Keepalive pings, the idle cut-off and token expiry of a connection, timed by the server's one timer heap.

A task per connection that sleeps for 20 s at a time costs a task's memory on every idle device (issue 9: at most
25 KiB per idle device). The server keeps one `TimerHeap` (runtime/timers.py) instead; each connection's `Watch`
says when it is due and does what is due.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import trio

from protocol import codec, codes
from runtime.timers import Entry
from transport import metrics
from transport.connection import Connection


class Watch:
    """One connection's timers: a ping every `ping_interval_s` (by `ping`, which must not block), a close
    after `idle_timeout_s` without a message or pong, and a close when the token expires."""

    __slots__ = (
        "_exp", "_next_ping", "conn", "idle_timeout_s", "last_seen", "ping", "ping_interval_s", "sub", "timer_entry",
    )

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
        self.timer_entry: Entry | None = None  # our place in the server's timer heap (runtime/timers.py)

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

    def expire(self, now: float) -> float:
        """Do what is due; the next deadline, or math.inf once the connection is over."""
        if self.over:
            return math.inf
        if self._exp <= time.time():
            metrics.CLOSES.labels(str(codes.UNAUTHORIZED)).inc()
            self.conn.send_nowait(codec.error_frame(codes.E_UNAUTHORIZED, "token expired"))
            self.conn.close(codes.UNAUTHORIZED, "token expired")
            return math.inf
        if now >= self._next_ping:
            if now - self.last_seen >= self.idle_timeout_s:
                metrics.CLOSES.labels(str(codes.GOING_AWAY)).inc()
                self.conn.close(codes.GOING_AWAY, "idle timeout")
                return math.inf
            self.ping()
            self.conn.shrink()
            self._next_ping = now + self.ping_interval_s
        return self.next_due()
