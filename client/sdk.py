"""The Python client of sessiond: one device's live, self-healing view of one session (DESIGN §3, §5).

`open_session(...)` connects, joins with `hello`, keeps `state`/`version`/`active`/`devices` current, and
hides reconnects: after a drop it resumes from its version (the server replays or sends full state) and
retransmits unacknowledged requests with their original ids, which the server acks idempotently — so an
op is neither lost nor applied twice, and its future resolves exactly once.

Version discipline is the whole correctness story: every change moves `version` by exactly one. A patch
that skips a version is a gap (drop and resume); our own op is applied locally when its ack says it is the
next version; an ack that runs ahead of a not-yet-received patch is held briefly until the gap fills.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection
from wsproto.utilities import LocalProtocolError

from client.replica import PendingRequest, Replica, ResyncNeeded
from client.wire import (
    FINAL_CLOSE_CODES,
    FINAL_HTTP_STATUSES,
    JSON,
    SUBPROTOCOLS,
    Codec,
    DecodeError,
    Patch,
    SessionError,
    backoff_delay,
)

Frame = dict[str, JSON]
TokenSource = str | Callable[[], str]

EVENT_BUFFER = 1024  # events() backlog; beyond it events are dropped (counted), never blocking the reader
HOLD_TIMEOUT_S = 2.0  # an ack ahead of a missing patch waits this long for the gap to fill, then resync
MAX_MESSAGE = 16 * 1024 * 1024  # a full welcome carries up to 1 MiB of state by default; leave headroom


class _AuthWaiter:
    """A pending in-band token refresh; `authed` frames carry no id, so waiters are answered in order."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.exp: float = 0.0
        self.error: SessionError | None = None


@dataclass(slots=True)
class _Outcome:
    """How one connection ended, for the reconnect policy."""

    kind: str  # "closed" | "failed" | "resync"
    code: int | None = None
    reason: str = ""
    final: str | None = None  # a final error code: stop, do not reconnect
    resume: bool = True
    welcomed: bool = False


class Session:
    """A device's connection to one session. Create with `open_session(...)` and use as `async with`.

    Public, read-only: `state`, `version`, `active`, `devices`, `connected`, `ended`, `error` (why the session
    stopped for good), `reconnects`, `events_dropped`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
        session: str,
        device: str,
        kind: str = "other",
        subprotocol: str = "json",
        reconnect: bool = True,
        max_backoff_s: float = 10.0,
        backoff_base_s: float = 0.1,
        on_patch: Callable[[Patch], None] | None = None,
        on_event: Callable[[Frame], None] | None = None,
        token_in_header: bool = False,
        origin: str | None = None,
        connect_timeout_s: float = 10.0,
        hello_timeout_s: float = 10.0,
        first_id: int | None = None,
        handshake_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"subprotocol must be one of {sorted(SUBPROTOCOLS)}")
        self.url = url
        self.session_id = session
        self.device = device
        self.kind = kind
        self._replica = Replica(device, on_patch)
        self.error: SessionError | None = None
        self.reconnects = 0
        self.events_dropped = 0
        self._token = token
        self._subprotocol = SUBPROTOCOLS[subprotocol]
        self._reconnect = reconnect
        self._max_backoff = max_backoff_s
        self._backoff_base = backoff_base_s
        self._on_event = on_event
        self._token_in_header = token_in_header
        self._origin = origin
        self._connect_timeout = connect_timeout_s
        self._hello_timeout = hello_timeout_s
        self._handshake_timeout = handshake_timeout_s
        self._request_timeout = request_timeout_s
        self._ws: WebSocketConnection | None = None
        self._codec = Codec(None)
        self._ready = False
        self._resume_ok = True
        self._welcomed_once = False
        self._closing = False
        self._send_lock = trio.Lock()
        # Request ids must keep increasing across restarts of the same device too (the server acks an id it
        # has seen instead of applying it), so by default they start at the wall clock in microseconds.
        self._next_id = first_id if first_id is not None else time.time_ns() // 1000
        self._auth_waiters: deque[_AuthWaiter] = deque()
        self._settled = trio.Event()
        self._stopped = trio.Event()
        self._events_send, self._events_recv = trio.open_memory_channel[Frame](EVENT_BUFFER)
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None

    # ---- public API -------------------------------------------------------------------------------

    @property
    def state(self) -> dict[str, JSON]:
        """The synced document at `version`; read it, never mutate it (changes go through `op`)."""
        return self._replica.state

    @property
    def version(self) -> int:
        return self._replica.version

    @property
    def active(self) -> str | None:
        """The device currently holding the session."""
        return self._replica.active

    @property
    def devices(self) -> list[Frame]:
        """Connected devices as the server last told us: `[{"device": ..., "kind": ...}]`."""
        return self._replica.devices

    @property
    def ended(self) -> bool:
        """The session was deleted (`ended` frame); no more reconnects."""
        return self._replica.ended

    @property
    def connected(self) -> bool:
        """True between a welcome and the next drop (requests made meanwhile are sent at once)."""
        return self._ready

    async def op(self, ops: Sequence[Frame], base: int | None = None) -> int:
        """Submit one atomic change; returns the version it got. Raises SessionError on an error frame."""
        frame: Frame = {"t": "op", "ops": list(ops)}
        if base is not None:
            frame["base"] = base
        return await self._request(frame)

    async def set(self, path: str, value: JSON, base: int | None = None) -> int:
        return await self.op([{"op": "set", "path": path, "value": value}], base)

    async def inc(self, path: str, by: int | float = 1, base: int | None = None) -> int:
        return await self.op([{"op": "inc", "path": path, "by": by}], base)

    async def delete(self, path: str, base: int | None = None) -> int:
        return await self.op([{"op": "del", "path": path}], base)

    async def pause(self) -> int:
        """Ask the server to pause the session (we must be the active device); returns the acked version."""
        return await self._request({"t": "pause"})

    async def claim(self) -> int:
        """Become the active device; returns the acked version."""
        return await self._request({"t": "claim"})

    async def refresh_token(self, token: str, timeout: float = 10.0) -> float:
        """Send a fresh token in band; returns its `exp`. The token is also used for later reconnects."""
        self._token = token
        self._check_open()
        if not self._ready or self._ws is None:
            raise SessionError("disconnected", "not connected; the new token will be used on reconnect")
        waiter = _AuthWaiter()
        self._auth_waiters.append(waiter)
        try:
            with trio.fail_after(timeout):
                async with self._send_lock:
                    await self._send_quietly({"t": "auth", "token": token})
                await waiter.done.wait()
        finally:
            if waiter in self._auth_waiters:
                self._auth_waiters.remove(waiter)
        if waiter.error is not None:
            raise SessionError(waiter.error.code, waiter.error.message)
        return waiter.exp

    def events(self) -> trio.MemoryReceiveChannel[Frame]:
        """Server frames (welcome, patch, handoff, presence, ended, error) plus client events
        `{"t":"disconnected","code","reason"}`, `{"t":"reconnected","version"}` and a last
        `{"t":"closed","code","message"}`; iteration ends when the session stops. One consumer."""
        return self._events_recv

    async def wait_version(self, version: int, timeout: float = 5.0) -> None:
        """Wait until the local state has reached `version` (trio.TooSlowError on timeout)."""
        with trio.fail_after(timeout):
            while self.version < version:
                if self._stopped.is_set():
                    self._check_open()
                await self._replica.changed.wait()

    # ---- context manager --------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._run)
        try:
            with trio.move_on_after(self._connect_timeout) as scope:
                await self._settled.wait()
        except BaseException:
            await self._shutdown()
            raise
        if scope.cancelled_caught or not self._welcomed_once:
            error = self.error or SessionError("timeout", f"no welcome within {self._connect_timeout} s")
            await self._shutdown()
            raise SessionError(error.code, error.message, error.version)
        return self

    async def __aexit__(
        self, etype: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        # The body's exception is not passed to the nursery, so users get it unwrapped (no ExceptionGroup).
        await self._shutdown()
        return False

    async def _shutdown(self) -> None:
        """Close the socket politely (1000), stop the tasks, fail what is still pending."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                with contextlib.suppress(Exception):  # e.g. wsproto refusing a Pong once closing: we are leaving
                    await ws.aclose()
        self._stop(SessionError("closed", "the session was closed by the client"))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._nursery_cm.__aexit__(None, None, None)
            self._nursery = None

    # ---- requests ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopped.is_set():
            error = self.error or SessionError("closed")
            raise SessionError(error.code, error.message, error.version)

    async def _request(self, frame: Frame) -> int:
        self._check_open()
        async with self._send_lock:
            self._check_open()
            request_id = self._next_id
            self._next_id += 1
            frame["id"] = request_id
            request = PendingRequest(frame)
            self._replica.pending[request_id] = request
            if self._ready:
                await self._send_quietly(frame)
        with trio.move_on_after(self._request_timeout):
            return await request.wait()
        # The outcome is unknown: it may have been applied. It stays queued and is retransmitted with its id on
        # every reconnect, so the server applies it at most once; resending it as a new request could apply it twice.
        raise SessionError(
            "timeout", f"no answer within {self._request_timeout:g} s; the request stays queued (applied at most once)"
        )

    async def _send_quietly(self, frame: Frame) -> None:
        """Send on the current connection; a dead one is the reader's business (it reconnects and
        retransmits), so a send failure is not the caller's error."""
        ws = self._ws
        if ws is None:
            return
        with suppress(ConnectionClosed):
            await ws.send_message(self._codec.encode(frame))

    # ---- connection loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                outcome = await self._connect_once()
                if self._closing:
                    return
                if outcome.welcomed:
                    attempt = 0
                    self._emit({"t": "disconnected", "code": outcome.code, "reason": outcome.reason})
                self._fail_auth(SessionError("disconnected", outcome.reason))
                final = "ended" if self.ended else outcome.final or FINAL_CLOSE_CODES.get(outcome.code or 0)
                if final is not None:
                    self._replica.ended = self._replica.ended or final == "ended"
                    self._stop(SessionError(final, outcome.reason or f"closed with {outcome.code}"))
                    return
                if not self._reconnect:
                    self._stop(SessionError("disconnected", outcome.reason or f"closed with {outcome.code}"))
                    return
                if outcome.kind == "resync":
                    self._resume_ok = self._resume_ok and outcome.resume
                    delay = backoff_delay(0, self._backoff_base, self._max_backoff)
                else:
                    delay = backoff_delay(attempt, self._backoff_base, self._max_backoff)
                    attempt += 1
                await trio.sleep(delay)
        finally:
            self._stop(SessionError("closed", "the session was closed by the client"))

    async def _connect_once(self) -> _Outcome:
        """One connection's life; expected network errors become an _Outcome, never an exception."""
        outcome = _Outcome("failed", reason="connection lost")
        rejected: ConnectionRejected | None = None
        try:
            async with trio.open_nursery() as conn_nursery:
                outcome = await self._connection(conn_nursery)
                # Let trio-websocket's reader finish a close handshake in flight (cancelling it now would
                # leave a concurrent aclose() waiting for a reply nobody reads), but not forever.
                conn_nursery.cancel_scope.deadline = trio.current_time() + 1.0
        except* ConnectionRejected as group:  # trio-websocket raises a rejection from its reader task too
            rejected = group.exceptions[0]  # type: ignore[assignment]
        except* LocalProtocolError:
            # trio-websocket's reader answers a ping that arrives while our close is in flight, and wsproto
            # refuses the Pong in LOCAL_CLOSING: the connection is going away anyway (seen in `bench soak`).
            pass
        if rejected is not None:
            return self._rejected(rejected)
        return outcome

    @staticmethod
    def _rejected(exc: ConnectionRejected) -> _Outcome:
        return _Outcome(
            "failed",
            reason=f"upgrade rejected with HTTP {exc.status_code}",
            final=FINAL_HTTP_STATUSES.get(exc.status_code),
        )

    def _headers(self, token: str) -> list[tuple[bytes, bytes]]:
        headers = []
        if self._token_in_header:
            headers.append((b"Authorization", f"Bearer {token}".encode()))
        if self._origin is not None:
            headers.append((b"Origin", self._origin.encode()))
        return headers

    async def _connection(self, nursery: trio.Nursery) -> _Outcome:
        token = self._token() if callable(self._token) else self._token
        try:
            # Its own bound: trio-websocket never returns when the server closes TCP mid-handshake (a load
            # balancer with no live backend does), and waiting for the whole hello timeout slows failover.
            with trio.fail_after(min(self._hello_timeout, self._handshake_timeout)):
                ws = await trio_websocket.connect_websocket_url(
                    nursery,
                    self.url,
                    subprotocols=[self._subprotocol],
                    extra_headers=self._headers(token),
                    max_message_size=MAX_MESSAGE,
                    message_queue_size=16,
                )
        except ConnectionRejected as exc:
            return self._rejected(exc)
        except (HandshakeError, OSError, trio.TooSlowError) as exc:
            return _Outcome("failed", reason=f"connect failed: {exc!r}")
        self._ws = ws
        self._codec = Codec(ws.subprotocol)
        welcomed = [False]
        try:
            await self._serve(ws, token, welcomed)
        except ConnectionClosed as exc:
            reason = exc.reason
            return _Outcome(
                "closed",
                code=reason.code if reason else None,
                reason=(reason.reason or reason.name) if reason else "closed",
                welcomed=welcomed[0],
            )
        except ResyncNeeded as exc:
            await self._close_ws(ws, 1000, exc.why)
            return _Outcome("resync", code=1000, reason=exc.why, resume=exc.resume, welcomed=welcomed[0])
        except trio.TooSlowError:
            await self._close_ws(ws, 1000, "no welcome")
            return _Outcome("failed", reason=f"no welcome within {self._hello_timeout} s")
        except DecodeError as exc:
            await self._close_ws(ws, 1002, "bad message")
            return _Outcome("closed", code=1002, reason=str(exc), welcomed=welcomed[0])
        finally:
            self._ready = False
            self._ws = None
        raise AssertionError("unreachable: _serve only returns by raising")  # pragma: no cover

    async def _close_ws(self, ws: WebSocketConnection, code: int, reason: str) -> None:
        with trio.move_on_after(1.0), contextlib.suppress(Exception):
            await ws.aclose(code, reason)

    def _hello(self, token: str) -> Frame:
        hello: Frame = {"t": "hello", "session": self.session_id, "device": self.device, "kind": self.kind}
        if not self._token_in_header:
            hello["token"] = token
        if self._replica.have_state and self._resume_ok:
            resume: Frame = {"version": self.version}
            if self._replica.epoch is not None:
                resume["epoch"] = self._replica.epoch
            hello["resume"] = resume
        return hello

    async def _serve(self, ws: WebSocketConnection, token: str, welcomed: list[bool]) -> None:
        """hello → welcome → retransmit pending → read frames until the connection ends (always raises)."""
        await ws.send_message(self._codec.encode(self._hello(token)))
        rest: list[Frame] = []
        with trio.fail_after(self._hello_timeout):
            while not welcomed[0]:
                frames = self._codec.decode(await ws.get_message())
                for index, frame in enumerate(frames):
                    if frame["t"] == "welcome":
                        self._replica.on_welcome(frame)
                        if self._welcomed_once:
                            self.reconnects += 1
                        self._emit(frame)
                        welcomed[0] = True
                        rest = frames[index + 1 :]
                        break
                    self._handle(frame)
        async with self._send_lock:
            # Same ids, in id order: the server acks what it already applied and applies the rest once.
            for request_id in sorted(self._replica.pending):
                await ws.send_message(self._codec.encode(self._replica.pending[request_id].frame))
            self._ready = True
        if self._welcomed_once:
            self._emit({"t": "reconnected", "version": self.version})
        self._welcomed_once = True
        self._resume_ok = True
        self._settled.set()
        for frame in rest:
            self._handle(frame)
        while True:
            held_since = self._replica.held_since
            deadline = math.inf if held_since is None else held_since + HOLD_TIMEOUT_S
            with trio.move_on_at(deadline):
                message = await ws.get_message()
                for frame in self._codec.decode(message):
                    self._handle(frame)
                continue
            raise ResyncNeeded(True, "an acked version never got its missing predecessor")

    # ---- frames -----------------------------------------------------------------------------------

    def _handle(self, frame: Frame) -> None:
        kind = frame["t"]
        if kind == "ack":
            self._replica.on_ack(frame)
            return
        if kind == "authed":
            if self._auth_waiters:
                waiter = self._auth_waiters.popleft()
                exp = frame.get("exp")
                waiter.exp = float(exp) if isinstance(exp, int | float) else 0.0
                waiter.done.set()
            return
        if kind == "error":
            unmatched = self._replica.on_error(frame)
            if unmatched is not None and unmatched.code == "unauthorized" and self._auth_waiters:
                waiter = self._auth_waiters.popleft()
                waiter.error = unmatched
                waiter.done.set()
        else:
            # A welcome mid-connection means the server replaced our backlog with fresh state (§5.5).
            self._replica.handle(frame)
        self._emit(frame)

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _emit(self, frame: Frame) -> None:
        if self._on_event is not None:
            self._on_event(frame)
        try:
            self._events_send.send_nowait(frame)
        except trio.WouldBlock:
            self.events_dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _fail_auth(self, error: SessionError) -> None:
        while self._auth_waiters:
            waiter = self._auth_waiters.popleft()
            waiter.error = error
            waiter.done.set()

    def _stop(self, error: SessionError) -> None:
        """Stop for good: remember why, fail every waiter, end the events stream."""
        if self._stopped.is_set():
            return
        self.error = error
        self._ready = False
        self._replica.fail_pending(error)
        self._fail_auth(error)
        self._emit({"t": "closed", "code": error.code, "message": error.message})
        self._events_send.close()
        self._stopped.set()
        self._settled.set()
        self._replica.bump()


def open_session(
    url: str,
    *,
    token: TokenSource,
    session: str,
    device: str,
    kind: str = "other",
    subprotocol: str = "json",
    reconnect: bool = True,
    max_backoff_s: float = 10.0,
    backoff_base_s: float = 0.1,
    on_patch: Callable[[Patch], None] | None = None,
    on_event: Callable[[Frame], None] | None = None,
    token_in_header: bool = False,
    origin: str | None = None,
    connect_timeout_s: float = 10.0,
    hello_timeout_s: float = 10.0,
    first_id: int | None = None,
    handshake_timeout_s: float = 5.0,
    request_timeout_s: float = 30.0,
) -> Session:
    """`async with open_session(url, token=..., session=..., device=...) as s:` — joined once entered.

    Entering waits for the first welcome (retrying per the backoff policy up to `connect_timeout_s`) and
    raises SessionError when it cannot join (`unauthorized`, `forbidden`, `not_found`, `timeout`, ...).
    `token` may be a callable, called at every (re)connect. Callbacks run on the reader task: they must
    be quick and must not raise (an exception there tears the session down).
    `first_id` fixes the first request id (default: the wall clock in µs, so ids grow across restarts).
    `handshake_timeout_s` bounds each TCP connect + WebSocket upgrade (a balancer that accepts and closes must not
    cost a whole hello timeout); `hello_timeout_s` then bounds the wait for the welcome. A request (`op`, `pause`,
    `claim`) unanswered after `request_timeout_s` raises SessionError `timeout`: its outcome is unknown, and it
    stays queued and is retransmitted with its id, so the server applies it at most once.
    """
    return Session(
        url,
        token=token,
        session=session,
        device=device,
        kind=kind,
        subprotocol=subprotocol,
        reconnect=reconnect,
        max_backoff_s=max_backoff_s,
        backoff_base_s=backoff_base_s,
        on_patch=on_patch,
        on_event=on_event,
        token_in_header=token_in_header,
        origin=origin,
        connect_timeout_s=connect_timeout_s,
        hello_timeout_s=hello_timeout_s,
        first_id=first_id,
        handshake_timeout_s=handshake_timeout_s,
        request_timeout_s=request_timeout_s,
    )
