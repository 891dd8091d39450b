"""One device's WebSocket as the actor sees it: a bounded send queue and the task that drains it.

The actor calls `deliver` synchronously during its turn; the frame is encoded right then (once per
format, shared through `Outgoing.encoded`), so a welcome always shows the state of its version.
The writer sends everything queued as one message (an array) per wake-up: fewer writes per frame is
where the transport's speed comes from (TRAPS).
"""

from __future__ import annotations

from collections import deque

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from actors.messages import Outgoing
from transport import codec, metrics

MAX_BATCH_FRAMES = 256
MAX_BATCH_BYTES = 256 * 1024
CLOSE_GRACE_S = 2.0


def encode_for(out: Outgoing, subprotocol: str) -> str | bytes:
    """Encode once per format, however many devices receive the frame."""
    data = out.encoded.get(subprotocol)
    if data is None:
        data = out.encoded[subprotocol] = codec.encode(out.frame, subprotocol)
    return data


class Connection:
    """Implements actors.messages.DeviceLink for one accepted WebSocket."""

    def __init__(self, ws: WebSocketConnection, device: str, subprotocol: str, queue_limit: int) -> None:
        self.ws = ws
        self._device = device
        self.subprotocol = subprotocol
        self._queue: deque[str | bytes] = deque()
        self._limit = queue_limit
        self._parked: trio.lowlevel.Task | None = None  # the writer, while it waits for frames
        self._resync_seq = 0  # bumped by resync(); the writer clears `resyncing` once it wrote that welcome
        self._resyncing = False
        self.close_request: tuple[int, str] | None = None
        self.closed = trio.Event()
        self.cancel_scope = trio.CancelScope()

    # ---- DeviceLink ---------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def resyncing(self) -> bool:
        return self._resyncing

    def deliver(self, out: Outgoing) -> bool:
        if self.close_request is not None:
            return True  # closing: frames are dropped, the device resumes elsewhere
        if len(self._queue) >= self._limit:
            return False
        self._queue.append(encode_for(out, self.subprotocol))
        self._wake()
        return True

    def resync(self, out: Outgoing) -> None:
        self._queue.clear()
        self._queue.append(encode_for(out, self.subprotocol))
        self._resync_seq += 1
        self._resyncing = True
        self._wake()

    def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with `code`. A peer that does not read (its writes block) is cut
        anyway after CLOSE_GRACE_S: the deadline cancels the connection's tasks, reader included."""
        if self.close_request is None:
            self.close_request = (code, reason)
            self.cancel_scope.deadline = min(self.cancel_scope.deadline, trio.current_time() + CLOSE_GRACE_S)
            self._wake()

    # ---- the writer task ----------------------------------------------------------------------

    def send_nowait(self, frame: codec.Encoded) -> None:
        """A connection-level frame (error, authed) from the reader; dropped if the queue is full."""
        if self.close_request is None and len(self._queue) < self._limit:
            self._queue.append(frame.for_subprotocol(self.subprotocol))
            self._wake()

    def _wake(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    async def _park(self) -> None:
        """Sleep until `_wake`: the cheapest wait trio has (an Event per wake-up costs more per message)."""
        self._parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run_writer(self) -> None:
        """Drains the queue until a close is requested; then flushes and closes with that code."""
        hot = metrics.HOT
        try:
            while True:
                if not self._queue and self.close_request is None:
                    await self._park()
                while self._queue:
                    seq = self._resync_seq
                    batch = self._take_batch()
                    await self.ws.send_message(codec.join_batch(batch, self.subprotocol))
                    hot.frames_out += len(batch)
                    hot.messages_out += 1
                    if seq == self._resync_seq:
                        # No resync happened while we wrote: any pending welcome went out in this batch.
                        self._resyncing = False
                if self.close_request is not None:
                    code, reason = self.close_request
                    with trio.move_on_after(2):
                        await self.ws.aclose(code, reason)
                    return
        except ConnectionClosed:
            return
        finally:
            self.closed.set()
            self.cancel_scope.cancel()

    def _take_batch(self) -> list[str | bytes]:
        batch: list[str | bytes] = []
        size = 0
        queue = self._queue
        while queue and len(batch) < MAX_BATCH_FRAMES and size < MAX_BATCH_BYTES:
            item = queue.popleft()
            batch.append(item)
            size += len(item)
        return batch
