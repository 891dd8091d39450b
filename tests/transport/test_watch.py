"""Each connection's pings, idle cut-off and token expiry (`Watch`), timed by the server's one `TimerHeap`.

Driven on trio's MockClock (autojump), with a stand-in connection that records what the watch asked of it: the
real Connection needs a socket, and the wiring to real sockets is covered by tests/integration/test_attacks.py
(idle and expired-token closes) and tests/transport/test_wsconn.py (pongs).
"""

from __future__ import annotations

import itertools
import time

import pytest
import trio
import trio.testing

from protocol import codes
from protocol.codec import Encoded
from runtime.timers import TimerHeap
from transport.watch import Watch


class RecordingConnection:
    """What a Watch uses of a Connection: `close_request`, `closed`, `close`, `send_nowait`."""

    def __init__(self) -> None:
        self.close_request: tuple[int, str] | None = None
        self.closed = trio.Event()
        self.sent: list[Encoded] = []
        self.shrunk = 0

    def shrink(self) -> None:
        self.shrunk += 1

    def close(self, code: int, reason: str) -> None:
        self.close_request = (code, reason)

    def send_nowait(self, frame: Encoded) -> None:
        self.sent.append(frame)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def make_watch(conn: RecordingConnection, pings: list[float], *, exp_in: float = 3600.0) -> Watch:
    return Watch(
        conn,  # type: ignore[arg-type]
        time.time() + exp_in,
        "alice",
        lambda: pings.append(trio.current_time()),
        ping_interval_s=20.0,
        idle_timeout_s=60.0,
    )


def add(timers: TimerHeap, watch: Watch) -> Watch:
    timers.schedule(watch, watch.next_due())
    return watch


async def test_pings_every_interval_and_closes_a_silent_connection_at_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = TimerHeap()
    conn = RecordingConnection()
    pings: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        add(timers, make_watch(conn, pings))
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert conn.close_request == (codes.GOING_AWAY, "idle timeout")
    assert pings, "the watch never pinged"
    assert pings[0] - start <= 20.0  # a random phase within the first interval
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(abs(gap - 20.0) < 1e-6 for gap in gaps)
    assert pings[-1] - start < 60.0 + 20.0  # closed at the first ping due after 60 s of silence


async def test_a_connection_seen_alive_keeps_being_pinged(autojump_clock: trio.testing.MockClock) -> None:
    timers = TimerHeap()
    conn = RecordingConnection()
    pings: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        watch = make_watch(conn, pings)

        def ping_answered() -> None:
            pings.append(trio.current_time())
            watch.seen()

        watch.ping = ping_answered
        add(timers, watch)
        await trio.sleep(300)
        nursery.cancel_scope.cancel()
    assert conn.close_request is None
    assert len(pings) >= 14
    assert conn.shrunk == len(pings)  # an idle device gives its empty buffers back at each ping


async def test_expiry_sends_an_error_and_closes_4001_and_a_refresh_moves_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Expiry is wall-clock (the token's `exp`): the test gives the watch an expiry in the past to fire it, after
    a refresh proved that the old, earlier deadline left in the heap is skipped."""
    timers = TimerHeap()
    conn = RecordingConnection()
    pings: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        watch = make_watch(conn, pings, exp_in=3600.0)
        add(timers, watch)
        await trio.sleep(1)
        assert conn.close_request is None
        watch.extend(time.time() - 0.001)
        timers.schedule(watch, watch.next_due())
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert conn.close_request == (codes.UNAUTHORIZED, "token expired")
    assert [frame.frame["code"] for frame in conn.sent] == [codes.E_UNAUTHORIZED]


async def test_a_closed_connection_is_dropped_and_never_fired_again(autojump_clock: trio.testing.MockClock) -> None:
    timers = TimerHeap()
    closed, open_ = RecordingConnection(), RecordingConnection()
    closed_pings: list[float] = []
    open_pings: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        add(timers, make_watch(closed, closed_pings))
        add(timers, make_watch(open_, open_pings))
        closed.closed.set()
        await trio.sleep(50)
        nursery.cancel_scope.cancel()
    assert closed_pings == []
    assert len(open_pings) >= 2
