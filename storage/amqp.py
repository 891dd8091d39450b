"""Lifecycle events to RabbitMQ (DESIGN §7): pika's AsyncioConnection on the bridge loop, publisher confirms.

`publish()` is called on the trio thread and never blocks or raises: it JSON-encodes the body and appends it to a
bounded buffer shared with the asyncio side (one batched wakeup per burst through the bridge). A pump task on the
bridge loop publishes persistent messages (delivery_mode 2) to the durable topic exchange `sessiond.events` and
keeps each one until the broker confirms it. When RabbitMQ is away (or nacks), unconfirmed messages go back to the
front of the buffer and the pump reconnects with jittered exponential backoff: delivery is at-least-once, in order
per connection. When buffer + unconfirmed reach `buffer_size`, the oldest buffered event is dropped and counted
(`dropped`); `published` counts confirmed messages, `buffered` what is waiting (for metrics, wired elsewhere).
Why the asyncio connection: BlockingConnection manages ~3k confirmed msgs/s and misses heartbeats (TRAPS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pika
import structlog
import trio
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.exceptions import AMQPError
from pika.spec import Basic

from protocol.codec import dumps_kept
from storage.bridge import Bridge, BridgeClosed
from storage.metrics import EVENTS_BUFFERED, EVENTS_DROPPED, EVENTS_PUBLISHED, STORAGE_ERRORS
from storage.ports import JSON

EXCHANGE = "sessiond.events"
BUFFER_SIZE = 10_000
CONFIRM_WINDOW = 1_000  # unconfirmed messages in flight at most
CONNECT_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0

log = structlog.get_logger(__name__)

_Message = tuple[str, bytes]


class _Disconnected(Exception):
    """The connection or channel went away; the pump reconnects."""


class AmqpEventSink:
    """EventSink port. Create with `open_amqp_events()`; counters are plain ints read from any thread."""

    def __init__(self, bridge: Bridge, url: str, *, exchange: str = EXCHANGE, buffer_size: int = BUFFER_SIZE) -> None:
        self._bridge = bridge
        self._params = pika.URLParameters(url)
        self._params.socket_timeout = CONNECT_TIMEOUT_S
        self._params.connection_attempts = 1  # we run our own backoff loop
        self.exchange = exchange
        self.buffer_size = buffer_size
        self.published = 0
        self.dropped = 0
        self.connected = False
        # Shared between threads: deque append/popleft/appendleft are atomic.
        self._buffer: deque[_Message] = deque()
        self._inflight: dict[int, _Message] = {}  # asyncio side only (len() read from trio)
        self._wake_pending = False
        self._closing = False
        # asyncio side
        self._wakeup: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None  # set when nothing is left unconfirmed (shutdown flush)
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncioConnection | None = None
        self._conn_closed: asyncio.Future[Any] | None = None
        self._next_tag = 0

    @property
    def buffered(self) -> int:
        """Events not yet confirmed by the broker (buffered plus in flight)."""
        return len(self._buffer) + len(self._inflight)

    # -- trio side -------------------------------------------------------------------------------------

    def publish(self, routing_key: str, body: dict[str, JSON]) -> None:
        """Queue one event; never blocks, never raises (an unencodable body is dropped and counted)."""
        try:
            payload = dumps_kept(body)  # it may wait in the buffer while the broker is away
        except TypeError:
            self._drop("unencodable", routing_key)
            return
        if self._closing:
            self._drop("closed", routing_key)
            return
        while self.buffered >= self.buffer_size:
            try:
                old_key, _ = self._buffer.popleft()
            except IndexError:  # everything is in flight: drop the new one instead
                self._drop("buffer_full", routing_key)
                return
            self._drop("buffer_full", old_key)
        self._buffer.append((routing_key, payload))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._bridge.call_soon(self._wake)
            except (BridgeClosed, RuntimeError):  # bridge or its loop closed: the event stays buffered, lost on exit
                self._wake_pending = False

    def _drop(self, reason: str, routing_key: str) -> None:
        """`reason` is one of the bounded metric labels: buffer_full, unencodable, closed."""
        self.dropped += 1
        EVENTS_DROPPED.labels(reason).inc()
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("event dropped", reason=reason, routing_key=routing_key, dropped_total=self.dropped)

    # -- asyncio side ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wake_pending = False
        if self._wakeup is not None:
            self._wakeup.set()

    async def _start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sessiond-amqp")

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            conn: AsyncioConnection | None = None
            try:
                conn, channel, closed = await self._connect()
                self.connected = True
                backoff = BACKOFF_MIN_S
                await self._pump(channel, closed)
            except (_Disconnected, AMQPError, OSError, TimeoutError) as exc:
                STORAGE_ERRORS.labels("amqp", "unavailable").inc()
                log.warning("rabbitmq unavailable", error=repr(exc), buffered=self.buffered, retry_in=backoff)
            finally:
                self.connected = False
                self._requeue_inflight()
                if conn is not None and not (conn.is_closed or conn.is_closing):
                    conn.close()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connect(self) -> tuple[AsyncioConnection, Channel, asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[Any] = loop.create_future()

        def on_open(_conn: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_conn: Any, err: BaseException) -> None:
            if not opened.done():
                opened.set_exception(_Disconnected(f"connect failed: {err!r}"))

        def on_close(_conn: Any, reason: BaseException) -> None:
            if not closed.done():
                closed.set_result(reason)

        conn = AsyncioConnection(
            self._params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        self._conn, self._conn_closed = conn, closed
        try:
            await asyncio.wait_for(opened, CONNECT_TIMEOUT_S)
            channel_open: asyncio.Future[Channel] = loop.create_future()
            conn.channel(on_open_callback=channel_open.set_result)
            channel = await self._until(channel_open, closed)
            channel.add_on_close_callback(lambda _ch, reason: conn.is_open and conn.close())
            declared: asyncio.Future[Any] = loop.create_future()
            channel.exchange_declare(self.exchange, "topic", durable=True, callback=declared.set_result)
            await self._until(declared, closed)
            confirming: asyncio.Future[Any] = loop.create_future()
            channel.confirm_delivery(self._on_confirm, callback=confirming.set_result)
            await self._until(confirming, closed)
        except BaseException:
            if not (conn.is_closed or conn.is_closing):
                conn.close()
            raise
        self._next_tag = 0
        return conn, channel, closed

    @staticmethod
    async def _until(fut: asyncio.Future[Any], closed: asyncio.Future[Any]) -> Any:
        done, _ = await asyncio.wait({fut, closed}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        raise _Disconnected(f"closed while opening: {closed.result() if closed.done() else 'timeout'}")

    async def _pump(self, channel: Channel, closed: asyncio.Future[Any]) -> None:
        assert self._wakeup is not None
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        while True:
            while self._buffer and len(self._inflight) < CONFIRM_WINDOW:
                if closed.done() or not channel.is_open:
                    raise _Disconnected(str(closed.result() if closed.done() else "channel closed"))
                try:
                    msg = self._buffer.popleft()
                except IndexError:
                    break
                self._next_tag += 1
                self._inflight[self._next_tag] = msg
                channel.basic_publish(self.exchange, msg[0], msg[1], properties=props)
            self._wakeup.clear()
            if self._buffer and len(self._inflight) < CONFIRM_WINDOW:
                continue  # more arrived meanwhile
            waiter = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if closed.done():
                raise _Disconnected(f"connection closed: {closed.result()!r}")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        tags = [t for t in self._inflight if t <= tag] if method.multiple else [tag]
        if isinstance(method, Basic.Ack):
            confirmed = 0
            for t in tags:
                if self._inflight.pop(t, None) is not None:
                    confirmed += 1
            self.published += confirmed
            EVENTS_PUBLISHED.inc(confirmed)  # once per confirm frame (they often cover many messages)
        else:  # nack: the broker lost them; publish again (at-least-once)
            retry = [self._inflight.pop(t) for t in sorted(tags) if t in self._inflight]
            self._buffer.extendleft(reversed(retry))
            log.warning("events nacked, retrying", count=len(retry))
        if self._wakeup is not None:
            self._wakeup.set()  # the confirm window has room again
        if self._drained is not None and not self.buffered:
            self._drained.set()

    def _requeue_inflight(self) -> None:
        """Unconfirmed messages go back to the front, in order, to be published again after reconnecting."""
        if self._inflight:
            retry = [self._inflight[t] for t in sorted(self._inflight)]
            self._inflight.clear()
            self._buffer.extendleft(reversed(retry))

    async def _stop(self, grace: float) -> None:
        """Give the pump `grace` seconds to flush what is buffered, then stop it."""
        if self.buffered and self.connected:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, closed = self._conn, self._conn_closed
        if conn is not None and closed is not None and conn.is_open:
            conn.close()
        if closed is not None and conn is not None and not conn.is_closed:
            # Let pika finish the close handshake so the transport is not left dangling.
            await asyncio.wait({closed}, timeout=1.0)
        if self.buffered:
            log.warning("events not delivered at shutdown", count=self.buffered)


@asynccontextmanager
async def open_amqp_events(
    bridge: Bridge,
    url: str,
    *,
    exchange: str = EXCHANGE,
    buffer_size: int = BUFFER_SIZE,
    flush_timeout: float = 2.0,
) -> AsyncIterator[AmqpEventSink]:
    """Start the publisher on the bridge loop (connecting in the background); on exit flush briefly and stop."""
    sink = AmqpEventSink(bridge, url, exchange=exchange, buffer_size=buffer_size)
    await bridge.run(sink._start)
    EVENTS_BUFFERED.set_function(lambda: sink.buffered)  # read at scrape time: nothing on the publish path
    try:
        yield sink
    finally:
        sink._closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(flush_timeout + 2.0):
            await bridge.run(sink._stop, flush_timeout)
        EVENTS_DROPPED.labels("closed").inc(sink.buffered)  # not delivered at shutdown: lost with the process
        EVENTS_BUFFERED.set_function(lambda: 0)
