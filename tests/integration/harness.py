"""An in-process sessiond on loopback (ephemeral ports) and small REST / WebSocket helpers for tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from api.auth import Authenticator
from api.server import RunningServer, serve
from api.settings import Settings, load_settings

SECRET = "test-secret-0123456789abcdef0123456789"


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "http_port": 0,
        "ws_port": 0,
        "jwt_secret": SECRET,
        "log_format": "json",
        "allow_durability_switch": True,  # one database for the whole run, in every mode (see tests/conftest.py)
    }
    base.update(overrides)
    return load_settings({}, **base)


@dataclass
class Harness:
    settings: Settings
    auth: Authenticator
    running: RunningServer
    stopped: trio.Event = field(default_factory=trio.Event)  # set once `serve` has returned (ports closed)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.running.ws_port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    def token(self, user: str = "alice", roles: tuple[str, ...] = (), ttl_s: int = 3600) -> str:
        return self.auth.mint(user, roles=roles, ttl_s=ttl_s)

    def rest(self, user: str | None = "alice") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return httpx.AsyncClient(base_url=self.http_url, headers=headers, timeout=10)

    async def create_session(self, user: str = "alice", state: dict[str, Any] | None = None) -> str:
        async with self.rest(user) as http:
            r = await http.post("/v1/sessions", json={"name": "t", "state": state or {}})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])


async def start_server(nursery: trio.Nursery, data_dir: Path, **overrides: Any) -> Harness:
    settings = test_settings(data_dir, **overrides)
    auth = Authenticator.from_settings(settings)
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(settings, auth, handle_signals=False, tune_gc=False, task_status=task_status)
        finally:
            stopped.set()

    running: RunningServer = await nursery.start(run)
    return Harness(settings, auth, running, stopped)


class RawDevice:
    """A plain WebSocket client speaking the JSON protocol by hand (no SDK), for protocol-level tests."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        data = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        await self.ws.send_message(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """Next frame (unbatching arrays)."""
        with trio.fail_after(timeout):
            while not self.inbox:
                data = await self.ws.get_message()
                obj = orjson.loads(data)
                self.inbox.extend(obj if isinstance(obj, list) else [obj])
        return self.inbox.pop(0)

    async def recv_type(self, t: str, timeout: float = 5.0) -> dict[str, Any]:
        """Next frame of type `t`, skipping others (presence etc.)."""
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["t"] == t:
                    return frame

    async def closed_code(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code."""
        from trio_websocket import ConnectionClosed

        with trio.fail_after(timeout):
            try:
                while True:
                    data = await self.ws.get_message()
                    obj = orjson.loads(data)
                    self.inbox.extend(obj if isinstance(obj, list) else [obj])
            except ConnectionClosed as exc:
                return exc.reason.code


@asynccontextmanager
async def raw_device(
    h: Harness,
    session: str | None,
    device: str = "d1",
    *,
    user: str = "alice",
    token: str | None = None,
    hello: dict[str, Any] | None = None,
    expect_welcome: bool = True,
    **ws_kw: Any,
) -> AsyncIterator[RawDevice]:
    """Connect, send hello (unless hello={}), and read the welcome."""
    async with open_websocket_url(h.ws_url, **ws_kw) as ws:
        dev = RawDevice(ws)
        if hello is None:
            hello = {"t": "hello", "token": token or h.token(user), "session": session, "device": device}
        if hello:
            await dev.send(hello)
            if expect_welcome:
                dev.welcome = await dev.recv_type("welcome")
        yield dev


async def wsproto_device(
    h: Harness, session: str, device: str, token: str, rcvbuf: int | None = None
) -> tuple[trio.SocketStream, Any]:
    """A hand-driven WebSocket peer (raw TCP + wsproto) that has sent its hello and then reads only when the
    test says so: for peers that never answer pings or never read, which trio-websocket's client cannot be."""
    import socket

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    stream = await trio.open_tcp_stream("127.0.0.1", h.running.ws_port)
    if rcvbuf is not None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/v1/ws")))
    events: list[object] = []
    with trio.fail_after(5):
        while not any(isinstance(e, AcceptConnection) for e in events):
            ws.receive_data(await stream.receive_some())
            events.extend(ws.events())
    hello = {"t": "hello", "token": token, "session": session, "device": device}
    await stream.send_all(ws.send(TextMessage(orjson.dumps(hello).decode())))
    return stream, ws
