"""One device's WebSocket as its session's actor sees it: a bounded send queue and the task that drains it.

The actor (on this pod, or relayed from the owner pod) calls `deliver` synchronously; the frame is encoded right
then (once per format, shared through `Outgoing.encoded`), so a welcome always shows the state of its version.
What a full queue means is decided here, where the device is (transport/sendqueue.py): drop what a welcome
supersedes and ask the actor for one, or evict a device that still cannot keep up. Everything queued goes out as
one message (an array) per write: fewer writes per frame is where the transport's speed comes from.

The fast path (issue 9): on a plain TCP connection (runtime/directstream.py) nothing wakes the connection's own
task. `deliver` only queues and marks the connection for the server's `Flusher`, whose single task runs once the
actor's turn has yielded and writes each marked connection's queue as one complete WebSocket frame, straight to
the socket. Only what the kernel does not take wakes the connection's writer task, which waits for the socket;
the queue keeps bounding what a slow device holds, so it never stalls its session or its neighbours.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from actors.messages import Outgoing
from protocol import codec, codes
from runtime.directstream import DirectStream
from runtime.sleeper import Sleeper
from transport import metrics
from transport.sendqueue import Push, SendQueue
from transport.wsconn import OwnWebSocket
from transport.wsframe import data_frame

MAX_BATCH_FRAMES = 256
MAX_BATCH_BYTES = 256 * 1024
CLOSE_GRACE_S = 2.0
DEFAULT_QUEUE_BYTES = 8 << 20
MAX_AWAITED_ACKS = 1024  # requests timed for the ack latency metric per connection (oldest forgotten beyond)

_ids = itertools.count(1)
log = structlog.get_logger("sessiond.ws")


def encode_for(out: Outgoing, subprotocol: str) -> bytes:
    """Encode once per format, however many devices receive the frame: the payload bytes (JSON as UTF-8)."""
    data = out.encoded.get(subprotocol)
    if data is None:
        data = out.encoded[subprotocol] = codec.encode_bytes(out.frame, subprotocol)
    return data


class Flusher:
    """Writes what the actors' turns queued for connections whose writer sleeps: one task for the whole server,
    woken at most once per scheduler pass however many devices and sessions got frames (the fast path)."""

    def __init__(self) -> None:
        self._marked: list[Connection] = []
        self._sleeper = Sleeper()

    def mark(self, conn: Connection) -> None:
        self._marked.append(conn)
        self._sleeper.wake()

    async def run(self) -> None:
        while True:
            if not self._marked:
                await self._sleeper.sleep()
            marked, self._marked = self._marked, []
            for conn in marked:
                try:
                    conn.flush()
                except Exception as exc:  # one connection's bug must not end every connection's sends
                    log.error("flushing a connection failed", exc_info=exc)
                    conn.close(codes.INTERNAL_ERROR, "internal error")


class Connection:
    """Implements actors.messages.DeviceLink for one accepted WebSocket."""

    def __init__(
        self,
        ws: WebSocketConnection | OwnWebSocket,
        device: str,
        subprotocol: str,
        queue_limit: int,
        *,
        pod: str = "",
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        flusher: Flusher | None = None,
    ) -> None:
        self.ws = ws
        self._device = device
        self.subprotocol = subprotocol
        self._binary = subprotocol != codec.JSON_SUBPROTOCOL
        # The fast path needs both: our stream under trio-websocket (plain TCP), and a flusher to write for us.
        stream = ws.stream if isinstance(ws, OwnWebSocket) else None
        self._direct: DirectStream | None = stream if flusher is not None and isinstance(stream, DirectStream) else None
        self._flusher = flusher
        self._marked = False  # waiting in the flusher's list
        self.conn_id = next(_ids)
        self._link_id = f"{pod}/{self.conn_id}"
        self.queue = SendQueue(queue_limit, queue_bytes)
        self._writer = Sleeper()  # the resident writer (trio-websocket's path), while it waits for frames
        self._writing = False  # fast path: a writer task is running (it takes the queue before it ends)
        self.tasks: trio.Nursery | None = None  # the connection's nursery (set by `start`)
        self.on_resync: Callable[[], None] | None = None  # asks the session for a fresh welcome (set on attach)
        self.close_request: tuple[int, str] | None = None
        self.closed = trio.Event()
        self.cancel_scope = trio.CancelScope()
        # Latency metrics: requests sent to the actor (op id -> wall clock when decoded, ACK_KINDS index), and
        # the `born` of the oldest patch not yet taken by the writer (0.0: none).
        self._awaited: dict[int, tuple[float, int]] = {}
        self._patch_born = 0.0

    # ---- DeviceLink ---------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def link_id(self) -> str:
        return self._link_id

    @property
    def fast(self) -> bool:
        """On the fast path: frames written by the flusher, messages taken inline (transport/server.py)."""
        return self._direct is not None

    @property
    def queued_bytes(self) -> int:
        # Kept up to date by the queue itself (nothing added per frame), plus a half-written frame's rest.
        direct = self._direct
        return self.queue.queued_bytes + (direct.pending_bytes if direct is not None else 0)

    def deliver(self, out: Outgoing) -> None:
        if self.close_request is not None:
            return  # closing: frames are dropped, the device resumes elsewhere
        kind = out.frame["t"]
        if (kind == "ack" or kind == "error") and self._awaited:
            awaited = self._awaited.pop(out.frame.get("id", -1), None)  # an error without an id pops nothing
            if awaited is not None and kind == "ack":
                metrics.ACK_LATENCY[awaited[1]].observe(time.time() - awaited[0])
        outcome = self.queue.push(kind, encode_for(out, self.subprotocol))
        if outcome is Push.QUEUED:
            if kind == "patch" and not self._patch_born:
                self._patch_born = out.born  # a dropped patch (superseded by a welcome) is not timed
            self._kick()
        elif outcome is Push.RESYNC:
            metrics.SLOW_CONSUMERS.labels("resync").inc()
            self._kick()
            if self.on_resync is not None:
                self.on_resync()
        elif outcome is Push.EVICT:
            self.evict()

    def evict(self) -> None:
        """The device cannot keep up: tell it why, then close 4008 (it resumes when it can)."""
        metrics.SLOW_CONSUMERS.labels("disconnect").inc()
        metrics.CLOSES.labels(str(codes.SLOW_CONSUMER)).inc()
        error = codec.error_frame(codes.E_SLOW_CONSUMER, "could not keep up; resume when ready")
        self.queue.push_final(codec.encode_bytes(error.frame, self.subprotocol))
        self.close(codes.SLOW_CONSUMER, "slow_consumer")

    def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with `code`. A peer that does not read (its writes block) is cut
        anyway after CLOSE_GRACE_S: the deadline cancels the connection's tasks, reader included."""
        if self.close_request is None:
            self.close_request = (code, reason)
            self.cancel_scope.deadline = min(self.cancel_scope.deadline, trio.current_time() + CLOSE_GRACE_S)
            self._wake()

    def await_ack(self, op_id: int, kind: int, decoded_at: float) -> None:
        """Time a request handed to the actor until its ack comes back (`kind`: index in metrics.ACK_KINDS)."""
        awaited = self._awaited
        if len(awaited) >= MAX_AWAITED_ACKS:  # answers that never come (a lost relay link closes us anyway)
            del awaited[next(iter(awaited))]
        awaited[op_id] = (decoded_at, kind)

    def shrink(self) -> None:
        """An idle device gives its empty buffers back (a deque is 760 bytes; issue 9: 25 KiB per idle device)."""
        self.queue.shrink()
        if self._direct is not None:
            self._direct.shrink()

    # ---- the writer task ----------------------------------------------------------------------

    def send_nowait(self, frame: codec.Encoded) -> None:
        """A connection-level frame (error, authed) from the reader; never superseded, bounded like the rest."""
        if self.close_request is None:
            if self.queue.push(frame.frame["t"], codec.encode_bytes(frame.frame, self.subprotocol)) is Push.EVICT:
                self.evict()
            self._kick()

    def _kick(self) -> None:
        """Get queued frames moving: the flusher writes them after this turn (fast path), else the writer."""
        if self._direct is None or self._writing:
            self._wake()  # no fast path, or a fast-path writer is running and takes the queue when done
        elif not self._marked:
            self._marked = True
            self._flusher.mark(self)  # type: ignore[union-attr]  # set whenever _direct is

    def flush(self) -> None:
        """The fast path, called by the flusher: write the queue now, as whole frames, while the kernel takes
        them; start a writer task for whatever remains (it waits for the socket)."""
        self._marked = False
        stream = self._direct
        queue = self.queue
        if stream is None or self._writing or not queue:
            return  # a writer is running (it takes the queue) or nothing is left
        if self.close_request is not None or self.ws.closed is not None or stream.pending_bytes:
            self._wake()  # closing, or a frame is half written: the writer's job
            return
        try:
            while queue and not stream.pending_bytes:
                self._write_batch(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: the writer finds out and ends the connection
        if queue or stream.pending_bytes or not stream.usable:
            self._wake()

    def _write_batch(self, stream: DirectStream) -> None:
        payload, frames, born = self._next_message()
        stream.write_nowait(data_frame(payload, binary=self._binary))
        self._sent(frames, born)

    def _next_message(self) -> tuple[bytes, int, float]:
        """The next write: queued frames joined into one message, how many, and the `born` of its oldest patch
        (one latency observation per write, cheaper than one per frame)."""
        born = self._patch_born
        self._patch_born = 0.0
        batch = self.queue.take(MAX_BATCH_FRAMES, MAX_BATCH_BYTES)
        return codec.join_batch(batch, self.subprotocol), len(batch), born  # type: ignore[return-value]  # bytes in, bytes out

    @staticmethod
    def _sent(frames: int, born: float) -> None:
        hot = metrics.HOT
        hot.frames_out += frames
        hot.messages_out += 1
        if born:
            age = time.time() - born
            metrics.DELIVERY_LATENCY.observe(age if age > 0.0 else 0.0)  # relayed: two pods' clocks may disagree

    def _wake(self) -> None:
        if self._direct is not None:
            # The fast path has no resident writer (a task less per idle device): one is started when the
            # socket is full, a frame is half written, or a close is due, and it ends once that is done.
            tasks = self.tasks
            if not self._writing and tasks is not None and not self.closed.is_set():
                self._writing = True
                try:
                    tasks.start_soon(self._fast_writer)
                except RuntimeError:  # the connection's nursery is closing: it is over, nothing to write
                    self._writing = False
                    self.tasks = None
            return
        self._writer.wake()

    def start(self, tasks: trio.Nursery) -> None:
        """Serve the connection's sends from `tasks` (the connection's nursery): the resident writer on
        trio-websocket's path; on the fast path only a writer started when needed (the welcome may be waiting)."""
        self.tasks = tasks
        direct = self._direct
        if direct is None:
            tasks.start_soon(self.run_writer)
        elif self.queue or direct.pending_bytes or self.close_request is not None:
            self._wake()

    async def _fast_writer(self) -> None:
        """Waits for the socket until the queue and the stream are empty, then ends; closes when asked."""
        direct = self._direct
        assert direct is not None
        queue = self.queue
        done = True
        try:
            while True:
                await direct.drain()
                if self.ws.closed is not None:
                    return  # closed under us (the peer's close frame): no data frame may follow it
                if queue:
                    self._write_batch(direct)
                    continue
                if self.close_request is not None:
                    code, reason = self.close_request
                    with trio.move_on_after(2):
                        await self.ws.aclose(code, reason)
                    return
                done = False  # all written: the connection goes on without a writer
                return
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._writing = False
            if done:
                self._finish(direct)

    async def run_writer(self) -> None:
        """trio-websocket's path: drains the queue until a close is requested; then flushes and closes."""
        queue = self.queue
        try:
            while True:
                if not queue and self.close_request is None:
                    await self._writer.sleep()
                while queue:
                    payload, frames, born = self._next_message()
                    await self.ws.send_message(payload if self._binary else payload.decode())
                    self._sent(frames, born)
                if self.close_request is not None:
                    code, reason = self.close_request
                    with trio.move_on_after(2):
                        await self.ws.aclose(code, reason)
                    return
        except ConnectionClosed:
            return
        finally:
            self._finish(None)

    def _finish(self, direct: DirectStream | None) -> None:
        """The connection is over (closed by us or the peer, or cut): stop its tasks."""
        if direct is not None and direct.pending_bytes and self.close_request is not None:
            # Cut by the close grace while the peer does not read: reset the connection. Left to
            # trio-websocket, its own close (1000, "normal") would wait behind our bytes and tell a device
            # that was evicted that all was well.
            direct.abort()
        self.closed.set()
        self.cancel_scope.cancel()
