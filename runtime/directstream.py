"""A TCP stream that can also be written without a task switch: the send fast path (issue 9).

trio's `SocketStream.send_all` must be awaited, so every frame to a device cost a wake-up of that connection's
writer task, a lock, wsproto's framing and a checkpoint. asyncio's `transport.write` shows the cheaper way: write
straight to the socket while the kernel buffer has room and keep only the remainder. `DirectStream` does that for
trio: `write_nowait` writes what the kernel takes now and keeps the rest, in order, for `drain`; `send_all` (what
trio-websocket uses for the handshake, pongs and close frames) goes through the same buffer, so bytes from both
never interleave. What is pending here is at most one partial write plus trio-websocket's control frames: frames
that cannot be written yet stay in the connection's bounded send queue (transport/sendqueue.py), which keeps
deciding what a slow device loses.

Only plain TCP gets this; TLS streams keep trio's path (their bytes are produced by the SSL object). The trio Redis
connections (storage/redis_trio.py) read and write their sockets through it too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections import deque

import trio

# A write that fails with one of these means the peer is gone (reset, closed), not a bug of ours.
_LINGER_ZERO = struct.pack("ii", 1, 0)  # close with a reset, not a FIN behind unsent data
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EBADF})


class DirectStream(trio.abc.HalfCloseableStream):
    """Wraps an accepted `trio.SocketStream`; reads are the inner stream's, writes are ours."""

    __slots__ = ("_closed", "_drain_lock", "_error", "_pending", "_pending_bytes", "inner", "socket")

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._pending: deque[memoryview] | tuple[()] = ()  # made when the kernel first refuses bytes: 760 B saved
        self._pending_bytes = 0
        self._closed = False
        self._error: OSError | None = None
        self._drain_lock = trio.Lock()  # one task at a time waits for the socket to be writable

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet taken by the kernel."""
        return self._pending_bytes

    @property
    def usable(self) -> bool:
        """Neither closed nor broken: a write may be attempted."""
        return not self._closed and self._error is None

    def write_nowait(self, data: bytes) -> None:
        """Write now what the kernel accepts; keep the rest for `drain`, after anything already pending.

        Raises `trio.ClosedResourceError` after `aclose`, `trio.BrokenResourceError` once the peer is gone.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._error is not None:
            raise trio.BrokenResourceError(f"connection lost: {self._error}") from self._error
        if self._pending:
            self._keep(memoryview(data))
            return
        written = self._write(data)
        if written < len(data):
            self._keep(memoryview(data)[written:])

    async def drain(self) -> None:
        """Wait until every pending byte is with the kernel (a checkpoint even when nothing is pending)."""
        async with self._drain_lock:
            while self._pending:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                await trio.lowlevel.wait_writable(self.socket)
                self._write_pending()
            if self._error is not None:
                raise trio.BrokenResourceError(f"connection lost: {self._error}") from self._error

    def read_nowait(self, max_bytes: int) -> bytes | None:
        """What the kernel holds now, without a checkpoint: None when nothing (wait with `wait_readable`), b""
        at end of stream. Raises `trio.ClosedResourceError` after `aclose`, `trio.BrokenResourceError` when the
        peer reset the connection. The reader of our own WebSocket (transport/wsconn.py) reads this way."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        try:
            return os.read(self.socket.fileno(), max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    async def wait_readable(self) -> None:
        """Until the socket has bytes (or EOF, or an error) to read."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        await trio.lowlevel.wait_readable(self.socket)

    # ---- trio.abc.HalfCloseableStream ---------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.write_nowait(bytes(data))
        await self.drain()

    async def wait_send_all_might_not_block(self) -> None:
        await self.drain()
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.drain()
        await self.inner.send_eof()

    async def aclose(self) -> None:
        # Closed first, synchronously: once the fd is closed its number can be reused by another connection,
        # and no later write_nowait may reach it.
        self._closed = True
        self._pending = ()
        self._pending_bytes = 0
        await self.inner.aclose()

    def abort(self) -> None:
        """Cut the connection now, with a reset: for a peer that stopped reading (its pending bytes and the
        kernel's are dropped, no close frame can reach it). Tasks waiting on the socket get ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._pending = ()
        self._pending_bytes = 0
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        self.socket.close()

    # ---- the socket ---------------------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> int:
        """One non-blocking write; 0 when the kernel buffer is full; a lost peer is remembered as `_error`."""
        try:
            return os.write(self.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self._error = exc
            self._pending = ()
            self._pending_bytes = 0
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    def _write_pending(self) -> None:
        pending = self._pending
        while pending:
            chunk = pending[0]
            written = self._write(chunk)
            self._pending_bytes -= written
            if written < len(chunk):
                pending[0] = chunk[written:]
                return
            pending.popleft()

    def shrink(self) -> None:
        """Give an empty pending buffer back (called for idle devices, on their keepalive ping)."""
        if not self._pending:
            self._pending = ()

    def _keep(self, view: memoryview) -> None:
        pending = self._pending
        if not isinstance(pending, deque):
            pending = self._pending = deque()
        pending.append(view)
        self._pending_bytes += len(view)


class DirectListener(trio.abc.Listener[DirectStream]):
    """Hands out accepted TCP connections as `DirectStream`s (for trio-websocket's `WebSocketServer`)."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner
        self.socket = inner.socket

    async def accept(self) -> DirectStream:
        return DirectStream(await self.inner.accept())

    async def aclose(self) -> None:
        await self.inner.aclose()
