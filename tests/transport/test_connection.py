"""transport/connection.py over a real trio-websocket pair: what a device that cannot keep up receives.

The pair runs over `lockstep_stream_pair` (no buffering: a write waits until the peer reads), so a peer that does
not read really blocks the server's writer, as a full TCP window would.
"""

from __future__ import annotations

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream, wrap_server_stream

from actors.messages import Outgoing
from protocol import codes
from protocol.codec import JSON_SUBPROTOCOL, decode_server_message
from transport.connection import Connection


async def ws_pair(nursery: trio.Nursery) -> tuple[WebSocketConnection, WebSocketConnection]:
    """(server side, client side) of one WebSocket over an unbuffered in-memory stream."""
    server_stream, client_stream = trio.testing.lockstep_stream_pair()
    found: dict[str, WebSocketConnection] = {}

    async def serve() -> None:
        request = await wrap_server_stream(nursery, server_stream)
        found["server"] = await request.accept(subprotocol=JSON_SUBPROTOCOL)

    async def connect() -> None:
        found["client"] = await wrap_client_stream(
            nursery, client_stream, "test", "/ws", subprotocols=[JSON_SUBPROTOCOL]  # type: ignore[arg-type]
        )

    with trio.fail_after(5):
        async with trio.open_nursery() as handshake:
            handshake.start_soon(serve)
            handshake.start_soon(connect)
    return found["server"], found["client"]


def patch(version: int) -> Outgoing:
    return Outgoing({"t": "patch", "version": version, "ops": [{"op": "set", "path": "/x", "value": "y" * 200}]})


async def test_a_device_evicted_as_a_slow_consumer_gets_the_error_frame_last_then_4008(
    nursery: trio.Nursery,
) -> None:
    """Review finding (issue 8): the `slow_consumer` error pushed before the 4008 close was never checked."""
    server_ws, client_ws = await ws_pair(nursery)
    conn = Connection(server_ws, "stuck", JSON_SUBPROTOCOL, queue_limit=4)
    resyncs: list[int] = []
    conn.on_resync = lambda: resyncs.append(1)
    nursery.start_soon(conn.run_writer)
    version = 0
    with trio.fail_after(5):
        while not resyncs:  # the client reads nothing: the writer blocks, the queue fills, then overflows
            version += 1
            conn.deliver(patch(version))
            await trio.testing.wait_all_tasks_blocked()
        assert conn.close_request is None
        conn.deliver(Outgoing({"t": "welcome", "mode": "full", "version": version, "state": {}}))  # the answer
        while conn.close_request is None:  # overflows again before that welcome was written: evicted
            version += 1
            conn.deliver(patch(version))
            await trio.testing.wait_all_tasks_blocked()
        assert conn.close_request == (codes.SLOW_CONSUMER, "slow_consumer")
        frames: list[dict[str, object]] = []
        try:
            while True:  # now the device reads everything it was sent
                frames.extend(decode_server_message(await client_ws.get_message(), JSON_SUBPROTOCOL))
        except ConnectionClosed as closed:
            code = closed.reason.code
    assert code == codes.SLOW_CONSUMER
    assert frames, "the device received nothing before the close"
    last = frames[-1]
    assert last["t"] == "error" and last["code"] == codes.E_SLOW_CONSUMER, last
    assert isinstance(last.get("message"), str) and last["message"]
    assert sum(1 for f in frames if f["t"] == "error") == 1
    await conn.closed.wait()


async def test_queued_bytes_is_what_waits_for_the_device(nursery: trio.Nursery) -> None:
    """What the memory budget counts for a local device (DeviceLink.queued_bytes): its send queue's bytes, from
    the queue's own tally. A device on another pod (RemoteLink) holds none here."""
    from actors.remote import RemoteLink

    server_ws, _client_ws = await ws_pair(nursery)
    conn = Connection(server_ws, "d", JSON_SUBPROTOCOL, queue_limit=16)
    assert conn.queued_bytes == 0
    frame = patch(1)
    conn.deliver(frame)  # the writer is not running: it stays queued
    assert conn.queued_bytes == len(frame.encoded[JSON_SUBPROTOCOL]) > 200
    assert RemoteLink(None, "pod-b", 1, "d", "s").queued_bytes == 0  # type: ignore[arg-type]
