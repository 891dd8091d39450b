"""A loopback TCP proxy that a test can cut and restore, to simulate a service outage without stopping
the shared real server (the other tests keep using it)."""

from __future__ import annotations

import socket

import trio

from bench.pods import splice


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._scope: trio.CancelScope | None = None
        self._down = trio.Event()
        self.up = False

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen on the same port every time (so clients reconnect to it after an outage)."""
        await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._down = trio.Event()
        listeners: list[trio.SocketListener] = []
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.up = True
                task_status.started()
                async with trio.open_nursery() as conns:
                    for listener in listeners:
                        conns.start_soon(trio.serve_listeners, self._relay, [listener])
        finally:
            for listener in listeners:
                listener.socket.close()  # now, not when collected: the port refuses connections from here on
            self.up = False
            self._down.set()

    def cut(self) -> None:
        """Drop the listener and every relayed connection, like a dead server."""
        if self._scope is not None:
            self._scope.cancel()

    async def cut_and_wait(self, timeout_s: float = 5.0) -> None:
        """`cut`, and return once the listener is closed and the relayed connections are torn down."""
        self.cut()
        with trio.fail_after(timeout_s):
            await self._down.wait()

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        await splice(client, upstream)
