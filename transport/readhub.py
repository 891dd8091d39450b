"""One task reads every plain-TCP WebSocket: the read side of the fast path (issue 9).

trio waits for a socket with a one-shot epoll registration per wait: each incoming client message cost an
`epoll_ctl`, a wake-up of that connection's reader task and its resumption (py-spy at 26k msgs/s: `wait_readable`
and `epoll_ctl` alone were 14 % of the trio thread). asyncio's selector loop shows the cheaper way, and `ReadHub`
takes it for trio: the sockets sit in an epoll set of our own, registered once (level-triggered) for as long as
their connection reads; one task waits for that set's own descriptor to turn readable (one trio wait per round,
however many sockets are ready) and calls each ready socket's callback synchronously. A callback reads what the
socket holds, parses it and hands the messages on, as the reader task did (transport/wsconn.py). Level-triggered:
a socket not drained in one round is reported in the next, so a flooding peer gets one read per round like
everyone else.

Linux only (epoll), like the rest of the fast path's deployments; elsewhere `available()` is False and every
connection keeps its own reader task.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable

import structlog
import trio

MAX_EVENTS = 128  # ready sockets per round: more wait for the next, after a checkpoint

log = structlog.get_logger("sessiond.ws")


def available() -> bool:
    return hasattr(select, "epoll")


class ReadHub:
    """Calls `on_readable()` of each registered socket while it has bytes (or EOF, or an error) to read.

    A callback must not raise (the caller keeps its own errors: one connection's bug must not end the hub) and
    must `remove` its socket once it stops reading (at EOF especially: level-triggered, EOF is reported forever).
    `run()` lives in the server's nursery, longer than any connection that registers.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Start calling `on_readable` when `fd` is readable. A descriptor number reused by a new socket (the old
        one closed without `remove`) is taken over."""
        self._callbacks[fd] = on_readable
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)

    def remove(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Stop calling `on_readable` for `fd`; nothing when `fd` is now someone else's (or nobody's)."""
        if fd < 0 or self._callbacks.get(fd) is not on_readable:
            return
        del self._callbacks[fd]
        with contextlib.suppress(OSError, ValueError):  # closed already: the kernel dropped it from the set
            self._epoll.unregister(fd)

    def __len__(self) -> int:
        return len(self._callbacks)

    async def run(self) -> None:
        epoll = self._epoll
        callbacks = self._callbacks
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                while True:
                    events = epoll.poll(0, MAX_EVENTS)
                    for fd, _flags in events:
                        on_readable = callbacks.get(fd)
                        if on_readable is not None:
                            try:
                                on_readable()
                            except Exception as exc:  # a callback's bug: that socket stops, the others go on
                                log.error("a socket's read callback failed", exc_info=exc)
                                self.remove(fd, on_readable)
                    if len(events) < MAX_EVENTS:
                        break
                    await trio.lowlevel.checkpoint()  # more are ready: let the actors and writers run first
        finally:
            epoll.close()
