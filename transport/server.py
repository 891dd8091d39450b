"""The WebSocket shell around the sans-I/O codec: handshake, hello, auth, and frame pumping. Plain TCP runs on
our own WebSocket (transport/wsconn.py); TLS, or `SESSIOND_WS_FAST_PATH=0`, on trio-websocket.

Every connection runs in its own nursery under `handle`, which never lets an exception escape:
one failing handler would otherwise tear down `serve_websocket` and every other device (TRAPS).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from actors.messages import (
    ActorRef,
    ActorUnavailable,
    ChangeRequest,
    ClaimRequest,
    Detach,
    Overloaded,
    PauseRequest,
    Resync,
    SessionNotFound,
)
from actors.router import Router
from protocol import codec, codes
from protocol.frames import Auth, Claim, Hello, Op, Pause, ProtocolError
from runtime.directstream import DirectListener, DirectStream
from runtime.timers import TimerHeap
from transport import metrics, readhub
from transport.connection import Connection, Flusher
from transport.ratelimit import TokenBucket
from transport.watch import Watch
from transport.wsconn import OwnRequest, OwnWebSocket, read_handshake

log = structlog.get_logger("sessiond.ws")

AnyRequest = WebSocketRequest | OwnRequest  # trio-websocket (TLS, fast path off) or our own (plain TCP)
AnyWebSocket = WebSocketConnection | OwnWebSocket

WS_PATH = "/v1/ws"
MAX_ERRORS_IN_A_ROW = 100  # a peer that only sends garbage is cut instead of being answered forever
CHEAP_ID_MAX_BYTES = 1024  # a rate-limited frame is decoded for its id only when it is this small
_HANDLED: Any = object()
# Request type -> index of its ack latency histogram (transport.metrics.ACK_KINDS: op, pause, claim).
_ACK_KIND: dict[type, int] = {ChangeRequest: 0, PauseRequest: 1, ClaimRequest: 2}


class VerifiedToken(Protocol):
    @property
    def sub(self) -> str: ...

    @property
    def exp(self) -> float: ...


class TokenVerifier(Protocol):
    def verify(self, token: str) -> VerifiedToken:
        """Raises on any bad token; the exception's `message` (or str) is shown to the client."""
        ...


@dataclass(frozen=True, slots=True)
class WsConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    allowed_origins: tuple[str, ...] = ()
    max_frame_bytes: int = 65536
    rate_per_s: float = 50.0
    rate_burst: int = 100
    hello_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0
    send_queue_frames: int = 1024
    send_queue_bytes: int = 8 << 20
    max_connections_per_user: int = 200  # on this pod
    fast_path: bool = True  # plain TCP: frames written straight to the socket (runtime/directstream.py)
    read_hub: bool = True  # fast path: one task reads every socket (transport/readhub.py)


class WebSocketServer:
    def __init__(
        self,
        config: WsConfig,
        router: Router,
        verifier: TokenVerifier,
        on_user: Callable[[str], Awaitable[None]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context  # set: wss:// (the composition root builds it, TLS 1.3 only)
        self.router = router
        self.verifier = verifier
        self.on_user = on_user
        self.connections: set[Connection] = set()
        self.per_user: Counter[str] = Counter()  # open connections by JWT subject (the per-user quota)
        self.port: int | None = None
        self._listener_scope = trio.CancelScope()
        self.flusher = Flusher() if config.fast_path and ssl_context is None else None
        # Every fast-path connection's reads in one task (transport/readhub.py), where epoll exists.
        self.hub = readhub.ReadHub() if self.flusher is not None and config.read_hub and readhub.available() else None
        self.timers = TimerHeap()  # every connection's pings, idle cut-off and token expiry (transport/watch.py)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop_accepting()`; then wait for the open connections to end."""
        async with trio.open_nursery() as outer:
            if self.flusher is not None:
                outer.start_soon(self.flusher.run)  # outlives every connection that may mark it
            if self.hub is not None:
                outer.start_soon(self.hub.run)  # outlives every connection that registers with it
            outer.start_soon(self.timers.run)
            async with trio.open_nursery() as handlers:
                port = await handlers.start(self._listen, handlers)
                self.port = port
                task_status.started(port)
            outer.cancel_scope.cancel()

    async def _listen(self, handlers: trio.Nursery, *, task_status: trio.TaskStatus[int]) -> None:
        """Plain TCP on the fast path: our own WebSocket (transport/wsconn.py) on DirectStreams, one task per
        connection. TLS, or the fast path off: trio-websocket's `serve_websocket`."""
        listeners: list[Any]
        if self.ssl_context is not None:
            listeners = await trio.open_ssl_over_tcp_listeners(
                self.config.port, self.ssl_context, host=self.config.host, https_compatible=True
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]  # type: ignore[attr-defined]
        else:
            tcp = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
            port = tcp[0].socket.getsockname()[1]
            listeners = list(tcp)
            if self.flusher is not None:
                with self._listener_scope:
                    await trio.serve_listeners(
                        self._serve_own, [DirectListener(one) for one in tcp], handler_nursery=handlers,
                        task_status=_Started(task_status, port),
                    )
                return
        server = trio_websocket.WebSocketServer(
            self.handle,
            listeners,
            handler_nursery=handlers,
            # Frames over max_frame_bytes get a `too_large` error and the connection stays; only
            # far larger ones are cut by the library (1009) before we buffer them.
            max_message_size=self.config.max_frame_bytes * 2,
            connect_timeout=self.config.hello_timeout_s,
            disconnect_timeout=5,
            # A few parsed messages may wait for our reader: the library's reader task then parses a
            # burst without a task switch per frame (measured: CPU/delivered msg -6 %). Bounded:
            # 4 x 2 x max_frame_bytes per connection at worst.
            message_queue_size=4,
        )
        with self._listener_scope:
            await server.run(task_status=_Started(task_status, port))

    async def _serve_own(self, stream: DirectStream) -> None:
        """One plain-TCP connection, in one task: the handshake (bounded like the hello), then `handle`."""
        try:
            request = None
            with trio.move_on_after(self.config.hello_timeout_s):
                request = await read_handshake(stream, self.config.max_frame_bytes * 2)
            if request is not None:
                await self.handle(request)
        finally:
            # What is still pending (a close frame) gets a moment to leave; then the socket is closed.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.drain()
                await stream.aclose()

    def stop_accepting(self) -> None:
        self._listener_scope.cancel()

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)

    async def wait_all_closed(self) -> None:
        while self.connections:
            await next(iter(self.connections)).closed.wait()
            self.connections = {c for c in self.connections if not c.closed.is_set()}

    # ---- one connection -----------------------------------------------------------------------

    async def handle(self, request: AnyRequest) -> None:
        try:
            await self._handle(request)
        except Exception as exc:  # never let one device take the server down
            log.error("websocket handler failed", exc_info=exc)
        finally:
            structlog.contextvars.clear_contextvars()

    async def _handle(self, request: AnyRequest) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        if request.path.split("?", 1)[0] != WS_PATH:
            metrics.CONNECTS.labels("not_found").inc()
            await request.reject(404, body=b"unknown path; use /v1/ws\n")
            return
        origin = headers.get("origin")
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            metrics.CONNECTS.labels("origin_refused").inc()
            log.warning("websocket origin refused", origin=origin[:200])
            await request.reject(403, body=b"origin not allowed\n")
            return
        offered = request.proposed_subprotocols
        subprotocol = codec.choose_subprotocol(offered)
        if subprotocol is None:
            metrics.CONNECTS.labels("bad_subprotocol").inc()
            await request.reject(400, body=b"supported subprotocols: sessiond.v1.json, sessiond.v1.msgpack\n")
            return
        header_token = None
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            header_token = authorization[7:].strip()
        ws = await request.accept(subprotocol=subprotocol if offered else None)
        del headers, authorization  # this frame lives as long as the connection: keep only what it needs
        await self._session(ws, subprotocol, header_token)

    async def _session(self, ws: AnyWebSocket, subprotocol: str, header_token: str | None) -> None:
        hello = await self._read_hello(ws, subprotocol)
        if hello is None:
            return
        token = hello.token or header_token
        if not token:
            await self._refuse(ws, subprotocol, codes.E_UNAUTHORIZED, "a token is required", codes.UNAUTHORIZED)
            return
        try:
            claims = self.verifier.verify(token)
        except Exception as exc:
            await self._refuse(ws, subprotocol, codes.E_UNAUTHORIZED, _message(exc), codes.UNAUTHORIZED)
            return
        try:
            # Ownership first, from the record: a stranger's token never activates (or loads) a session.
            owner = await self.router.owner_of(hello.session)
        except Exception as exc:
            log.warning("session lookup failed", session=hello.session, error=str(exc))
            await self._refuse(ws, subprotocol, codes.UNAVAILABLE, "session unavailable, retry later",
                               codes.TRY_AGAIN_LATER)
            return
        if owner is None:
            await self._refuse(ws, subprotocol, codes.E_NOT_FOUND, "no such session", codes.NOT_FOUND)
            return
        if owner != claims.sub:
            await self._refuse(ws, subprotocol, codes.E_FORBIDDEN, "not your session", codes.FORBIDDEN)
            return
        structlog.contextvars.bind_contextvars(session=hello.session, device=hello.device)
        limit = self.config.max_connections_per_user
        if self.per_user[claims.sub] >= limit:
            quota = f"quota: at most {limit} connections per user"
            await self._refuse(ws, subprotocol, codes.RATE_LIMITED, quota, codes.TRY_AGAIN_LATER)
            return
        self.per_user[claims.sub] += 1
        try:
            await self._attached(ws, subprotocol, hello, claims)
        finally:
            self.per_user[claims.sub] -= 1
            if not self.per_user[claims.sub]:
                del self.per_user[claims.sub]

    async def _attached(self, ws: AnyWebSocket, subprotocol: str, hello: Hello, claims: VerifiedToken) -> None:
        if self.on_user is not None:
            await self.on_user(claims.sub)
        cfg = self.config
        conn = Connection(
            ws, hello.device, subprotocol, cfg.send_queue_frames, pod=self.router.pod, queue_bytes=cfg.send_queue_bytes,
            flusher=self.flusher,
        )
        try:
            # The local actor (activated, get + tell without a checkpoint in between) or the owner pod's, relayed.
            actor = await self.router.attach(hello.session, conn, hello.kind, hello.resume, hello.resume_epoch)
        except SessionNotFound:
            await self._refuse(ws, subprotocol, codes.E_NOT_FOUND, "no such session", codes.NOT_FOUND)
            return
        except Overloaded as exc:
            await self._refuse(ws, subprotocol, codes.RATE_LIMITED, str(exc), codes.TRY_AGAIN_LATER)
            return
        except Exception as exc:  # ActorUnavailable, StorageUnavailable while activating, a moving session
            log.warning("session activation failed", session=hello.session, error=str(exc))
            await self._refuse(ws, subprotocol, codes.UNAVAILABLE, "session unavailable, retry later",
                               codes.TRY_AGAIN_LATER)
            return
        conn.on_resync = lambda: _ask_resync(actor, conn)
        metrics.CONNECTS.labels("ok").inc()
        metrics.CONNECTIONS.inc()
        self.connections.add(conn)
        try:
            await self._pump(ws, conn, actor, claims)
        finally:
            conn.on_resync = None  # a cycle (conn -> lambda -> conn): let refcounting free the connection
            self.connections.discard(conn)
            metrics.CONNECTIONS.dec()
            await _send_detach(actor, Detach(conn))

    async def _read_hello(self, ws: AnyWebSocket, subprotocol: str) -> Hello | None:
        data: str | bytes | None = None
        with trio.move_on_after(self.config.hello_timeout_s):
            try:
                data = await ws.get_message()
            except ConnectionClosed:
                return None
        if data is None:
            await self._refuse(
                ws, subprotocol, codes.E_UNAUTHORIZED, "no hello within the time limit", codes.UNAUTHORIZED
            )
            return None
        if len(data) > self.config.max_frame_bytes:
            await self._refuse(ws, subprotocol, codes.TOO_LARGE, "hello frame too large", codes.MESSAGE_TOO_BIG)
            return None
        try:
            frame = codec.decode(data, subprotocol)
        except ProtocolError as exc:
            await self._refuse(ws, subprotocol, exc.code, exc.message, codes.PROTOCOL_ERROR)
            return None
        if not isinstance(frame, Hello):
            await self._refuse(ws, subprotocol, codes.BAD_FRAME, "the first frame must be hello", codes.PROTOCOL_ERROR)
            return None
        return frame

    async def _refuse(self, ws: AnyWebSocket, subprotocol: str, code: str, message: str, close: int) -> None:
        """Tell the device why, then close: a clear error for every refused connection."""
        metrics.CONNECTS.labels(code).inc()
        metrics.CLOSES.labels(str(close)).inc()
        with trio.move_on_after(2):
            try:
                await ws.send_message(codec.error_frame(code, message).for_subprotocol(subprotocol))
                await ws.aclose(close, message[:120])
            except ConnectionClosed:
                pass

    async def _pump(self, ws: AnyWebSocket, conn: Connection, actor: ActorRef, claims: VerifiedToken) -> None:
        cfg = self.config
        watch: Watch | None = None
        pinger: _LibraryPinger | None = None
        try:
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    conn.start(nursery)
                    timers = (cfg.ping_interval_s, cfg.idle_timeout_s)
                    if isinstance(ws, OwnWebSocket):
                        watch = Watch(conn, claims.exp, claims.sub, ws.ping_nowait, *timers)
                        ws.on_pong = watch.seen
                    else:
                        pinger = _LibraryPinger(ws, nursery, cfg.idle_timeout_s)
                        watch = Watch(conn, claims.exp, claims.sub, pinger.ping, *timers)
                        pinger.watch = watch
                    self.timers.schedule(watch, watch.next_due())
                    await self._read_loop(ws, conn, actor, watch)
                    if conn.close_request is not None:
                        # We are closing: the writer flushes and sends the close frame (bounded by the connection's
                        # close grace); cancelling it now would cut the TCP connection without one (1006).
                        await conn.closed.wait()
                    # The peer closed (or our close is done): stop the writer and watchers.
                    nursery.cancel_scope.cancel()
        finally:
            conn.tasks = None  # that nursery is gone: a late flush must not start a writer in it
            conn.closed.set()  # on the fast path no writer may have run to say so
            # Break the connection's reference cycles (ws -> on_pong -> watch -> conn -> ws; pinger <-> watch):
            # it is freed as soon as its last reference goes, not at the next full collection, which the soak
            # showed as a sawtooth of ~170k blocks and a creeping RSS (issue 8), each a long pause (issue 9).
            if watch is not None:
                TimerHeap.cancel(watch)
            if isinstance(ws, OwnWebSocket):
                ws.on_pong = None
            if pinger is not None:
                pinger.watch = None

    async def _read_loop(self, ws: AnyWebSocket, conn: Connection, actor: ActorRef, watch: Watch) -> None:
        """Take the device's messages until it closes. On the fast path (our own WebSocket) this task is the
        reader and takes each message as it is parsed: no channel hop, no task switch per incoming message."""
        take = _Taker(self, conn, actor, watch).take
        if isinstance(ws, OwnWebSocket):

            def failed(exc: Exception) -> None:  # never let one message's bug end the reader silently
                log.error("websocket message handling failed", exc_info=exc)
                conn.close(codes.INTERNAL_ERROR, "internal error")

            await ws.run(take, failed, self.hub)
            return
        while conn.close_request is None:  # once closing (expired token, eviction...) nothing more is taken
            try:
                data = await ws.get_message()
            except ConnectionClosed:
                return
            take(data)

    def _message_for(self, conn: Connection, watch: Watch, data: str | bytes) -> Any:
        """The actor message for one frame; `_HANDLED` when answered here; None after an error frame."""
        cfg = self.config
        if len(data) > cfg.max_frame_bytes or (
            isinstance(data, str) and len(data) * 4 > cfg.max_frame_bytes and _utf8_len(data) > cfg.max_frame_bytes
        ):
            self._error(conn, codes.TOO_LARGE, f"frame larger than {cfg.max_frame_bytes} bytes")
            return None
        try:
            frame = codec.decode(data, conn.subprotocol)
        except ProtocolError as exc:
            self._error(conn, exc.code, exc.message, exc.id)
            return None
        if isinstance(frame, Op):
            return ChangeRequest(conn, frame.id, frame.ops, frame.base, len(data))
        if isinstance(frame, Pause):
            return PauseRequest(conn, frame.id)
        if isinstance(frame, Claim):
            return ClaimRequest(conn, frame.id)
        if isinstance(frame, Auth):
            return _HANDLED if self._refresh(conn, watch, frame.token) else None
        self._error(conn, codes.BAD_FRAME, "already joined: hello only once per connection")
        return None

    def _refresh(self, conn: Connection, watch: Watch, token: str) -> bool:
        """In-band token refresh: same subject, new expiry (DESIGN §3 `auth`). False after an error frame."""
        try:
            claims = self.verifier.verify(token)
        except Exception as exc:
            self._error(conn, codes.E_UNAUTHORIZED, _message(exc))
            return False
        if claims.sub != watch.sub:
            self._error(conn, codes.E_FORBIDDEN, "a refreshed token must name the same user")
            return False
        watch.extend(claims.exp)
        self.timers.schedule(watch, watch.next_due())
        conn.send_nowait(codec.Encoded({"t": "authed", "exp": claims.exp}))
        return True

    def _error(self, conn: Connection, code: str, message: str, op_id: int | None = None) -> None:
        metrics.ERRORS.labels(code).inc()
        conn.send_nowait(codec.error_frame(code, message, id=op_id))


class _Taker:
    """One connection's incoming messages, each taken synchronously: the rate limit, the decode, the actor."""

    __slots__ = ("actor", "bucket", "conn", "errors_in_a_row", "server", "watch")

    def __init__(self, server: WebSocketServer, conn: Connection, actor: ActorRef, watch: Watch) -> None:
        self.server = server
        self.conn = conn
        self.actor = actor
        self.watch = watch
        self.bucket = TokenBucket(server.config.rate_per_s, server.config.rate_burst)
        self.errors_in_a_row = 0

    def take(self, data: str | bytes) -> None:
        conn = self.conn
        if conn.close_request is not None:
            return  # closing: nothing more is taken
        server = self.server
        now = trio.current_time()
        self.watch.last_seen = now
        metrics.HOT.frames_in += 1
        # The bucket is charged before any parsing: a flood costs us a counter, not a decode.
        if not self.bucket.allow(now):
            server._error(conn, codes.RATE_LIMITED, f"more than {server.config.rate_per_s:g} frames/s", _cheap_id(data))
            return
        message = server._message_for(conn, self.watch, data)
        if message is None:
            self.errors_in_a_row += 1
            if self.errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                metrics.CLOSES.labels(str(codes.POLICY_VIOLATION)).inc()
                conn.close(codes.POLICY_VIOLATION, "too many bad frames")
            return
        self.errors_in_a_row = 0
        if message is _HANDLED:
            return
        decoded_at = time.time()
        actor = self.actor
        try:
            actor.tell(message)
        except Overloaded:
            server._error(conn, codes.RATE_LIMITED, "session busy, retry shortly", message.op_id)
            return
        except ActorUnavailable as exc:
            server._error(conn, codes.UNAVAILABLE, str(exc), message.op_id)
            if actor.gone:
                conn.close(codes.TRY_AGAIN_LATER, "session unavailable, reconnect")
            return
        conn.await_ack(message.op_id, _ACK_KIND[type(message)], decoded_at)


class _Started:
    """Passes trio-websocket's "started" on as the port we listen on."""

    def __init__(self, inner: trio.TaskStatus[int], port: int) -> None:
        self.inner = inner
        self.port = port

    def started(self, _server: object = None) -> None:
        self.inner.started(self.port)


class _LibraryPinger:
    """Keepalive pings on trio-websocket's path, where a ping is awaited until its pong: one in flight at most,
    in the connection's nursery; an unanswered one is abandoned at the idle timeout."""

    __slots__ = ("idle_timeout_s", "nursery", "pinging", "watch", "ws")

    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery, idle_timeout_s: float) -> None:
        self.ws = ws
        self.nursery = nursery
        self.idle_timeout_s = idle_timeout_s
        self.pinging = False
        self.watch: Watch | None = None

    def ping(self) -> None:
        if not self.pinging:
            self.pinging = True
            self.nursery.start_soon(self._ping)

    async def _ping(self) -> None:
        try:
            with trio.move_on_after(self.idle_timeout_s):
                await self.ws.ping()
                if self.watch is not None:
                    self.watch.seen()
        except (ConnectionClosed, ValueError):
            pass
        finally:
            self.pinging = False


def _cheap_id(data: str | bytes) -> int | None:
    """The id of a small refused frame, so the client can fail that request; large ones are not parsed."""
    if len(data) > CHEAP_ID_MAX_BYTES:
        return None
    try:
        frame = codec.decode(data, codec.JSON_SUBPROTOCOL if isinstance(data, str) else codec.MSGPACK_SUBPROTOCOL)
    except (ProtocolError, ValueError):
        return None
    op_id = getattr(frame, "id", None)
    return op_id if isinstance(op_id, int) else None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc or "invalid token")[:200]


def _ask_resync(actor: ActorRef, conn: Connection) -> None:
    """The connection's queue overflowed: ask its session for a fresh welcome (or let the device resume)."""
    try:
        actor.tell(Resync(conn))
    except (Overloaded, ActorUnavailable):
        conn.close(codes.TRY_AGAIN_LATER, "session busy; resume")


async def _send_detach(actor: ActorRef, message: Detach) -> None:
    """Detach must reach the actor even when its mailbox is full, or it would count a ghost device."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        while not actor.gone:
            try:
                actor.tell(message)
                return
            except Overloaded:
                await trio.sleep(0.01)
            except ActorUnavailable:
                return
