"""Our own server WebSocket for plain TCP (issue 9): one task per connection, no library reader under it.

trio-websocket gives every connection a reader task, a handler task, a channel between them and a wsproto state
machine whose pure-Python parser unmasks each byte in Python: about a third of the server's CPU under load and
most of an idle device's memory. Here the server's read hub (transport/readhub.py) reads the socket when it turns
readable, or, without a hub, the connection's own task does; either parses frames with transport/wsread.py
(sans-I/O) and hands each message to its taker inline. Frames go out through the
DirectStream (runtime/directstream.py), written by transport/wsframe.py. The handshake stays wsproto's
(its sans-I/O `H11Handshake`, with h11 underneath): the HTTP side is where a library earns its keep.

What trio-websocket guaranteed is kept, and tested (tests/transport/test_wsconn.py): the close handshake in both
directions, pings answered and our own keepalive pings, the message size cap (1009), UTF-8 checks (1007),
protocol violations (1002), and `ConnectionClosed` with the peer's code when the connection ends. TLS connections
and `SESSIOND_WS_FAST_PATH=0` keep trio-websocket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import ConnectionType
from wsproto.events import RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from runtime.directstream import DirectStream
from transport.readhub import ReadHub
from transport.wsframe import OP_CLOSE, OP_PING, OP_PONG, control_frame, data_frame
from transport.wsread import CloseFrame, Event, FrameReader, PingFrame, PongFrame, WsViolation

RECEIVE_BYTES = 65536
NORMAL_CLOSURE = 1000
NO_STATUS = 1005
ABNORMAL_CLOSURE = 1006
MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


_DONE: H11Handshake = H11Handshake(ConnectionType.SERVER)  # stands in for a handshake that is over


_DONE_REQUEST = Request(host="", target="")
# The 101 as wsproto's AcceptConnection writes it (no extensions, no extra headers), byte for byte.
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "


class OwnRequest:
    """An opening handshake read and checked by wsproto, not yet answered (mirrors trio-websocket's request)."""

    __slots__ = ("_event", "_handshake", "_max_message_bytes", "_stream")

    def __init__(self, stream: DirectStream, handshake: H11Handshake, event: Request, max_message_bytes: int) -> None:
        self._stream = stream
        self._handshake = handshake
        self._event = event
        self._max_message_bytes = max_message_bytes

    @property
    def path(self) -> str:
        return self._event.target

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """As trio-websocket gives them: lower-case names; Host, extensions and subprotocols are taken out."""
        return list(self._event.extra_headers)

    @property
    def proposed_subprotocols(self) -> tuple[str, ...]:
        return tuple(self._event.subprotocols)

    async def reject(self, status: int, *, body: bytes = b"") -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        data = self._handshake.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += self._handshake.send(RejectData(data=body, body_finished=True))
        self._stream.write_nowait(data)
        await self._stream.drain()

    async def accept(self, *, subprotocol: str | None) -> OwnWebSocket:
        # wsproto validated the request (version, key, upgrade headers); its AcceptConnection would cost 40 us of
        # the 680 us a connect costs (issue 9: the connect rate), most of it h11 writing a fixed-form response.
        if subprotocol is not None and subprotocol not in self._event.subprotocols:
            raise ValueError(f"subprotocol {subprotocol!r} was not offered")
        key = next(value for name, value in self._event.extra_headers if name == b"sec-websocket-key")
        response = _SWITCHING + generate_accept_token(key)
        if subprotocol is not None:
            response += b"\r\nSec-WebSocket-Protocol: " + subprotocol.encode()
        self._stream.write_nowait(response + b"\r\n\r\n")
        # A client may not send frames before our 101 (RFC 6455 §4.1); any that came with the request anyway
        # are what h11 holds past it.
        h11_connection = getattr(self._handshake, "_h11_connection", None)
        trailing = h11_connection.trailing_data[0] if h11_connection is not None else b""
        # The request object lives as long as the connection (its handler's frame holds it); the handshake's
        # h11 and wsproto state (about 3 KiB) is not needed any more.
        self._handshake = _DONE
        self._event = _DONE_REQUEST
        ws = OwnWebSocket(self._stream, self._max_message_bytes)
        if trailing:
            ws.feed(bytes(trailing))
        await self._stream.drain()
        return ws


async def read_handshake(stream: DirectStream, max_message_bytes: int) -> OwnRequest | None:
    """The client's opening handshake; None when it went away or sent something else (answered 400 then).
    The caller bounds the time it may take."""
    handshake = H11Handshake(ConnectionType.SERVER)
    while True:
        data = await receive(stream)
        if not data:
            return None
        try:
            handshake.receive_data(data)
        except RemoteProtocolError as exc:
            hint = exc.event_hint if isinstance(exc.event_hint, RejectConnection) else RejectConnection()
            stream.write_nowait(handshake.send(hint))
            await stream.drain()
            return None
        for event in handshake.events():
            if isinstance(event, Request):
                return OwnRequest(stream, handshake, event, max_message_bytes)


def read_now(stream: DirectStream) -> bytes | None:
    """What the socket holds now (None: nothing yet); b"" at end of stream or when the peer is gone."""
    try:
        return stream.read_nowait(RECEIVE_BYTES)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def receive(stream: DirectStream) -> bytes:
    """Bytes from the socket, waiting for them if need be; b"" at end of stream or when the peer is gone."""
    while True:
        data = read_now(stream)
        if data is not None:
            return data
        try:
            await stream.wait_readable()
        except trio.ClosedResourceError:
            return b""


class OwnWebSocket:
    """An open WebSocket whose reading is done by whichever task awaits it: `run` (the connection's one task,
    messages handed over inline), or `get_message` / `aclose` before and after that."""

    __slots__ = ("_events", "_peer_closed", "_reader", "_reading", "closed", "on_pong", "stream")

    def __init__(self, stream: DirectStream, max_message_bytes: int) -> None:
        self.stream = stream
        self._reader = FrameReader(max_message_bytes)
        # Parsed, not yet handed over (a read can carry several messages); a list, as it rarely holds more than a
        # few: an empty deque is 760 bytes per connection.
        self._events: list[Event] = []
        self.closed: CloseReason | None = None  # set once a close frame went either way, or the connection died
        self._peer_closed: trio.Event | None = None  # made when someone waits for the peer's close frame
        self._reading = False  # a task is in `run` or `get_message`: `aclose` waits for it to see the close
        self.on_pong: Callable[[], None] | None = None

    # ---- reading ----------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse bytes read off the socket (or left over from the handshake) into pending events."""
        try:
            self._events.extend(self._reader.feed(data))
        except WsViolation as exc:
            self._events.extend(exc.events)  # what came before the violation is still handed over, in order
            self._events.append(CloseFrame(-exc.close_code, exc.reason))  # a negative code: ours, not the peer's

    async def get_message(self) -> str | bytes:
        """The next message; raises `ConnectionClosed` once the connection is closed."""
        self._reading = True
        try:
            while True:
                events = self._events
                while events:
                    event = events.pop(0)
                    if type(event) is str or type(event) is bytes:
                        return event
                    self._control(event)  # type: ignore[arg-type]
                if self.closed is not None and self._peer_closed_seen():
                    raise ConnectionClosed(self.closed)
                data = await receive(self.stream)
                if not data:
                    self._lost()
                    raise ConnectionClosed(self.closed)
                self.feed(data)
        finally:
            self._reading = False

    async def run(
        self, take: Callable[[str | bytes], None], failed: Callable[[Exception], None], hub: ReadHub | None = None
    ) -> None:
        """Read until the connection ends, handing each message to `take` as soon as it is parsed (`failed` gets
        what `take` raised). The hot path: a read, a parse, a call. With a `hub` (transport/readhub.py) its task
        reads whenever the socket is readable and this task only waits for the end; without one this task reads,
        waiting for the socket only when it is empty."""
        self._reading = True
        try:
            if self._hand_over(take, failed):
                return
            if hub is not None:
                await self._run_in(hub, take, failed)
            else:
                await self._read_loop(take, failed)
        finally:
            self._reading = False

    def _hand_over(self, take: Callable[[str | bytes], None], failed: Callable[[Exception], None]) -> bool:
        """Hand the parsed events over (messages to `take`, control frames handled here); True once reading is
        over (the peer's close frame came, the connection died, or we broke off)."""
        events = self._events
        while events:
            event = events.pop(0)
            if type(event) is str or type(event) is bytes:
                try:
                    take(event)
                except Exception as exc:
                    failed(exc)
            else:
                self._control(event)  # type: ignore[arg-type]
        return self.closed is not None and self._peer_closed_seen()

    def _read_once(self, take: Callable[[str | bytes], None], failed: Callable[[Exception], None]) -> bool:
        """One read of what the kernel holds, parsed and handed over; True once reading is over."""
        data = read_now(self.stream)
        if data is None:
            return False  # nothing after all (another read took it)
        if not data:
            self._lost()
            return True
        self.feed(data)
        return self._hand_over(take, failed)

    async def _run_in(
        self, hub: ReadHub, take: Callable[[str | bytes], None], failed: Callable[[Exception], None]
    ) -> None:
        """Let the hub's task read; wait for the end. What the callback raises ends this task with it, as it
        would have ended the reading task."""
        reader = _HubReader(self, hub, take, failed)
        hub.add(reader.fd, reader)
        try:
            await reader.done.wait()
        finally:
            hub.remove(reader.fd, reader)  # cancelled (closed, cut): stop before the socket closes
            error, reader.raised = reader.raised, None
        if error is not None:
            try:
                raise error
            finally:
                del error  # no frame <-> traceback cycle left behind (the server frees connections by refcount)

    async def _read_loop(self, take: Callable[[str | bytes], None], failed: Callable[[Exception], None]) -> None:
        stream = self.stream
        waited = True
        drained = False  # the last read took less than it asked for: the kernel had no more
        while True:
            # After a short read a read now would almost always find nothing: a syscall saved per message.
            data = None if drained else read_now(stream)
            if data is None:
                try:
                    await stream.wait_readable()
                except trio.ClosedResourceError:
                    self._lost()
                    return
                waited = True
                drained = False
                continue
            if not data:
                self._lost()
                return
            if not waited:
                await trio.lowlevel.checkpoint()  # a peer that keeps us busy still lets everyone else run
            waited = False
            drained = len(data) < RECEIVE_BYTES
            self.feed(data)
            if self._hand_over(take, failed):
                return

    def _peer_closed_seen(self) -> bool:
        """Whether reading is over: the peer's close frame came, or the connection died, or we broke off."""
        return self._peer_closed is not None and self._peer_closed.is_set()

    def _control(self, event: PingFrame | PongFrame | CloseFrame) -> None:
        if type(event) is PingFrame:
            if self.closed is None:
                self._write(control_frame(OP_PONG, event.payload))
        elif type(event) is PongFrame:
            if self.on_pong is not None:
                self.on_pong()
        else:
            self._closing(event)  # type: ignore[arg-type]

    def _closing(self, event: CloseFrame) -> None:
        """The peer's close frame (echoed, unless it answers ours), or a violation of ours (negative code)."""
        if event.code is not None and event.code < 0:
            code, reason = -event.code, event.reason
            if self.closed is None:
                self.closed = CloseReason(code, reason)
                self._write(_close_payload(code, reason))
        else:
            code = event.code if event.code is not None else NO_STATUS
            if self.closed is None:
                self.closed = CloseReason(code, event.reason or None)
                self._write(_close_payload(event.code, event.reason))
        self._events.clear()
        self._over()

    def _lost(self) -> None:
        if self.closed is None:
            self.closed = CloseReason(ABNORMAL_CLOSURE, None)
        self._over()

    def _over(self) -> None:
        if self._peer_closed is None:
            self._peer_closed = trio.Event()
        self._peer_closed.set()

    # ---- writing ----------------------------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the reader finds out
            self.stream.write_nowait(frame)

    async def send_message(self, message: str | bytes) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        binary = isinstance(message, bytes)
        payload = message if isinstance(message, bytes) else message.encode()
        try:
            self.stream.write_nowait(data_frame(payload, binary=binary))
            await self.stream.drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()
            raise ConnectionClosed(self.closed) from None

    def ping_nowait(self, payload: bytes = b"") -> None:
        """A keepalive ping; its pong calls `on_pong`."""
        if self.closed is None:
            self._write(control_frame(OP_PING, payload))

    async def aclose(self, code: int = NORMAL_CLOSURE, reason: str | None = None) -> None:
        """Send our close frame and wait for the peer's (the caller bounds the wait), reading it ourselves
        when no task is reading; then close the TCP connection (the server closes first, RFC 6455 §7.1.1)."""
        try:
            if self.closed is None:
                self.closed = CloseReason(code, reason)
                self._write(_close_payload(code, reason or ""))
                if self._peer_closed is None:
                    self._peer_closed = trio.Event()
            await self.stream.drain()
            if self._reading:
                assert self._peer_closed is not None
                await self._peer_closed.wait()
            else:
                while not self._peer_closed_seen():
                    events, self._events = self._events, []
                    for event in events:  # messages after our close are dropped; control frames still count
                        if not isinstance(event, str | bytes):
                            self._control(event)
                    if self._peer_closed_seen():
                        break
                    data = await receive(self.stream)
                    if not data:
                        self._over()
                        break
                    self.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()


class _HubReader:
    """An OwnWebSocket's read callback in a ReadHub: one read, parsed and handed over, per call; at the end it
    leaves the hub and wakes the connection's task. An object rather than a closure: a closure that removes itself
    refers to itself, a cycle the server's connections must not leave behind (issue 9, cyclic garbage)."""

    __slots__ = ("done", "failed", "fd", "hub", "raised", "take", "ws")

    def __init__(
        self, ws: OwnWebSocket, hub: ReadHub, take: Callable[[str | bytes], None], failed: Callable[[Exception], None]
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.take = take
        self.failed = failed
        self.fd = ws.stream.socket.fileno()
        self.done = trio.Event()
        self.raised: BaseException | None = None

    def __call__(self) -> None:
        try:
            over = self.ws._read_once(self.take, self.failed)
        except BaseException as exc:  # re-raised in the connection's task
            self.raised = exc
            over = True
        if over:
            self.hub.remove(self.fd, self)
            self.done.set()


def _close_payload(code: int | None, reason: str) -> bytes:
    """A close frame: the code and a reason cut to what fits (on a character boundary); none for no code."""
    if code is None:
        return control_frame(OP_CLOSE, b"")
    raw = reason.encode()
    if len(raw) > MAX_REASON_BYTES:
        raw = raw[:MAX_REASON_BYTES].decode(errors="ignore").encode()
    return control_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)
