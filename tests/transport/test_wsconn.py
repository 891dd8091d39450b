"""transport/wsconn.py, our own WebSocket, over real loopback TCP against wsproto as the client: the handshake,
the close handshake both ways, pings both ways, and the violations trio-websocket used to answer for us."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from runtime.directstream import DirectStream
from transport.readhub import ReadHub
from transport.wsconn import OwnRequest, OwnWebSocket, read_handshake

MAX = 4096

RunWs = Callable[[OwnWebSocket, Callable[[Any], None], Callable[[Exception], None]], Awaitable[None]]


@pytest.fixture(params=["read-hub", "reader-task"])
async def run_ws(request: pytest.FixtureRequest, nursery: trio.Nursery) -> RunWs:
    """`ws.run` read by a ReadHub's task (the server's default), or by the calling task itself."""
    if request.param == "reader-task":
        return lambda ws, take, failed: ws.run(take, failed)
    hub = ReadHub()
    nursery.start_soon(hub.run)
    return lambda ws, take, failed: ws.run(take, failed, hub)


class Client:
    """A wsproto client over a real socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[object] = []

    async def send(self, event: object) -> None:
        await self.stream.send_all(self.ws.send(event))  # type: ignore[arg-type]

    async def next_event(self) -> object:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
            if not data and not self.events:
                return None
        return self.events.pop(0)

    async def eof(self) -> bool:
        """Whether the server closed TCP (after any events still buffered)."""
        with trio.fail_after(5):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return True


async def pair(subprotocols: list[str] | None = None, early: bytes = b"") -> tuple[OwnRequest, Client, DirectStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    server = DirectStream(await listeners[0].accept())
    await listeners[0].aclose()
    await client.stream.send_all(
        client.ws.send(Request(host="localhost", target="/v1/ws", subprotocols=subprotocols or [])) + early
    )
    with trio.fail_after(5):
        request = await read_handshake(server, MAX)
    assert request is not None
    return request, client, server


async def opened(early: bytes = b"") -> tuple[OwnWebSocket, Client]:
    request, client, _ = await pair(["sessiond.v1.json"], early)
    ws = await request.accept(subprotocol="sessiond.v1.json")
    event = await client.next_event()
    assert isinstance(event, AcceptConnection) and event.subprotocol == "sessiond.v1.json"
    return ws, client


def masked(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, mask: bool = True) -> bytes:
    """A client frame built by hand, for the frames wsproto refuses to build."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    key = os.urandom(4) if mask else b""
    header = bytes((first, (0x80 if mask else 0) | len(payload)))
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    return header + key + body


async def test_the_handshake_gives_path_headers_and_subprotocols_then_messages_flow_both_ways() -> None:
    request, client, _ = await pair(["sessiond.v1.msgpack", "sessiond.v1.json"])
    assert request.path == "/v1/ws"
    assert request.proposed_subprotocols == ("sessiond.v1.msgpack", "sessiond.v1.json")
    assert (b"sec-websocket-version", b"13") in request.headers
    ws = await request.accept(subprotocol="sessiond.v1.json")
    assert isinstance(await client.next_event(), AcceptConnection)
    await client.send(TextMessage(data="héllo"))
    await client.send(BytesMessage(data=b"\x00\x01"))
    with trio.fail_after(5):
        assert await ws.get_message() == "héllo"
        assert await ws.get_message() == b"\x00\x01"
    await ws.send_message("back")
    event = await client.next_event()
    assert isinstance(event, TextMessage) and event.data == "back"


async def test_a_rejected_handshake_gets_its_status_and_body() -> None:
    request, client, _ = await pair()
    await request.reject(404, body=b"unknown path\n")
    event = await client.next_event()
    assert isinstance(event, RejectConnection) and event.status_code == 404
    body = await client.next_event()
    assert isinstance(body, RejectData) and body.data == b"unknown path\n"


async def test_a_request_that_is_not_a_websocket_upgrade_gets_400() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = DirectStream(await listeners[0].accept())
    await client.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        assert await read_handshake(server, MAX) is None
        answer = await client.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_frames_sent_with_the_request_before_our_answer_are_not_lost() -> None:
    early = FrameProtocol(client=True, extensions=[]).send_data("early", fin=True)
    ws, _ = await opened(early)
    with trio.fail_after(5):
        assert await ws.get_message() == "early"


async def test_run_hands_over_every_message_inline_and_answers_pings_with_their_payload(run_ws: RunWs) -> None:
    ws, client = await opened()
    got: list[str | bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ws, ws, got.append, _raise)
        for i in range(50):
            await client.send(TextMessage(data=f"m{i}"))
        await client.send(Ping(payload=b"are you there"))
        event = await client.next_event()
        assert isinstance(event, Pong) and event.payload == b"are you there"
        await client.send(CloseConnection(code=1000, reason="bye"))
        with trio.fail_after(5):
            echo = await client.next_event()
    assert isinstance(echo, CloseConnection) and echo.code == 1000
    assert got == [f"m{i}" for i in range(50)]
    assert ws.closed is not None and ws.closed.code == 1000 and ws.closed.reason == "bye"


async def test_our_close_waits_for_the_peers_answer_then_closes_tcp(run_ws: RunWs) -> None:
    ws, client = await opened()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ws, ws, _ignore, _raise)
        nursery.start_soon(ws.aclose, 4008, "slow_consumer")
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 4008 and event.reason == "slow_consumer"
        await client.send(event.response())
    assert await client.eof()


async def test_aclose_without_a_reader_reads_the_answer_itself() -> None:
    ws, client = await opened()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.aclose, 4001, "unauthorized")
        await client.send(TextMessage(data="crossing"))  # a message crossing our close is dropped
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 4001
        await client.send(event.response())
    assert await client.eof()


async def test_keepalive_pings_are_answered_by_pongs_that_reach_on_pong(run_ws: RunWs) -> None:
    ws, client = await opened()
    pongs: list[int] = []
    ws.on_pong = lambda: pongs.append(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ws, ws, _ignore, _raise)
        ws.ping_nowait()
        event = await client.next_event()
        assert isinstance(event, Ping)
        await client.send(event.response())
        with trio.fail_after(5):
            while not pongs:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def violation(run_ws: RunWs, frames: bytes) -> tuple[OwnWebSocket, int | None]:
    """The close code the client gets after sending `frames`, and the server side's reason."""
    ws, client = await opened()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ws, ws, _ignore, _raise)
        await client.stream.send_all(frames)
        with trio.fail_after(5):
            event = await client.next_event()
    assert isinstance(event, CloseConnection), event
    return ws, event.code


async def test_a_message_over_the_cap_is_closed_with_1009(run_ws: RunWs) -> None:
    big = FrameProtocol(client=True, extensions=[]).send_data(b"x" * (MAX + 1), fin=True)
    ws, code = await violation(run_ws, big)
    assert code == 1009 and ws.closed is not None and ws.closed.code == 1009


async def test_text_that_is_not_utf8_is_closed_with_1007(run_ws: RunWs) -> None:
    _, code = await violation(run_ws, masked(0x1, b"\xff\xfe"))
    assert code == 1007


async def test_an_unmasked_frame_and_reserved_bits_are_closed_with_1002(run_ws: RunWs) -> None:
    _, code = await violation(run_ws, masked(0x1, b"hi", mask=False))
    assert code == 1002
    _, code = await violation(run_ws, masked(0x1, b"hi", rsv1=True))
    assert code == 1002


async def test_a_peer_that_vanishes_gives_connection_closed_1006() -> None:
    ws, client = await opened()
    await client.stream.aclose()
    with trio.fail_after(5):
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason.code == 1006
        else:
            raise AssertionError("no ConnectionClosed")


async def test_send_after_close_raises_connection_closed() -> None:
    ws, client = await opened()
    await client.send(CloseConnection(code=1001))
    with trio.fail_after(5):
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason.code == 1001
    try:
        await ws.send_message("late")
    except ConnectionClosed:
        pass
    else:
        raise AssertionError("a message was sent after the close")


def _ignore(_: object) -> None:
    pass


def _raise(exc: Exception) -> None:
    raise exc


async def test_a_peer_that_vanishes_ends_run_with_1006(run_ws: RunWs) -> None:
    ws, client = await opened()
    got: list[str | bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ws, ws, got.append, _raise)
        await client.send(TextMessage(data="last words"))
        await client.stream.aclose()
        with trio.fail_after(5):
            while ws.closed is None:
                await trio.sleep(0.01)
    assert got == ["last words"] and ws.closed.code == 1006


async def test_a_failure_in_the_read_callback_ends_that_connections_run_only(nursery: trio.Nursery) -> None:
    """With a hub, what escapes the parse (a bug, here in the pong handler) is raised in the connection's own
    task, as it would have been from its reader task; the hub and another connection read on."""
    hub = ReadHub()
    nursery.start_soon(hub.run)
    (bad, bad_client), (good, good_client) = await opened(), await opened()

    def broken_pong() -> None:
        raise RuntimeError("bug")

    bad.on_pong = broken_pong
    got: list[str | bytes] = []
    raised: list[BaseException] = []

    async def run_bad() -> None:
        try:
            await bad.run(_ignore, _raise, hub)
        except RuntimeError as exc:
            raised.append(exc)

    async with trio.open_nursery() as inner:
        inner.start_soon(run_bad)
        inner.start_soon(good.run, got.append, _raise, hub)
        await bad_client.send(Pong(payload=b"x"))
        await good_client.send(TextMessage(data="still here"))
        with trio.fail_after(5):
            while not raised or not got:
                await trio.sleep(0.01)
        assert len(hub) == 1  # the broken connection left the hub, the good one reads on
        await good_client.send(TextMessage(data="and here"))
        with trio.fail_after(5):
            while len(got) < 2:
                await trio.sleep(0.01)
        inner.cancel_scope.cancel()
    assert str(raised[0]) == "bug" and got == ["still here", "and here"]
    assert len(hub) == 0  # a cancelled run leaves the hub too
