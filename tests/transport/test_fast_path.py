"""The send fast path (issue 9) in a real server: frames written straight to plain-TCP sockets by the flusher.

What it must keep from trio-websocket's own path: whole frames in order, pongs and close frames between them
intact, a device that never reads next to a fast one (the slow one's bytes wait in its own queue and stream, the
fast one is not held back), and the close code after the last frame.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from protocol import codes
from tests.integration.harness import Harness, raw_device, start_server, wsproto_device
from transport.connection import Connection

BIG = "v" * 20_000


@pytest.fixture(params=[True, False], ids=["read-hub", "reader-task"])
def hub(request: pytest.FixtureRequest) -> bool:
    """Every test with the sockets read by the server's ReadHub (the default) and by a task per connection."""
    return bool(request.param)


def server_link(h: Harness, sid: str, device: str) -> Connection:
    actor = h.running.registry.lookup(sid)
    assert actor is not None
    link = actor.links[device]
    assert isinstance(link, Connection)
    return link


async def patches_until(dev: Any, version: int, timeout: float = 20) -> list[int]:
    versions: list[int] = []
    with trio.fail_after(timeout):
        while not versions or versions[-1] < version:
            frame = await dev.recv(timeout)
            if frame["t"] == "patch":
                versions.append(frame["version"])
    return versions


@pytest.mark.parametrize("fast", [True, False])
async def test_both_paths_deliver_the_same_frames(nursery: trio.Nursery, tmp_path: Path, hub: bool, fast: bool) -> None:
    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, ws_fast_path=fast, rate_limit="1000/1000")
    sid = await h.create_session()
    async with raw_device(h, sid, "w") as writer, raw_device(h, sid, "r") as reader:
        assert (server_link(h, sid, "r")._direct is not None) is fast
        for op_id in range(1, 51):
            await writer.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})
        acks = [(await writer.recv_type("ack"))["version"] for _ in range(50)]
        assert acks == list(range(1, 51))
        assert await patches_until(reader, 50) == list(range(1, 51))
    h.running.stop()


@pytest.mark.parametrize("reads_in_grace", [False, True])
async def test_a_device_that_never_reads_does_not_hold_back_a_fast_one(
    nursery: trio.Nursery, tmp_path: Path, hub: bool, reads_in_grace: bool
) -> None:
    """It is evicted; if it reads within the close grace it gets the error then 4008, else it is reset."""
    from wsproto.events import CloseConnection, Message

    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, rate_limit="10000/10000", send_queue_frames=64)
    sid = await h.create_session()
    # A 4 KiB window drains slower than the close grace allows; one that reads in time gets a normal window.
    stuck_stream, stuck_ws = await wsproto_device(h, sid, "stuck", h.token(), rcvbuf=None if reads_in_grace else 4096)
    sent = 600  # 600 x 20 kB: far more than the stuck device's socket buffers and send queue hold
    async with raw_device(h, sid, "w") as writer, raw_device(h, sid, "fast") as fast:
        stuck = server_link(h, sid, "stuck")
        seen: list[int] = []

        async def read_fast() -> None:  # the fast device reads all along
            seen.extend(await patches_until(fast, sent, timeout=30))

        async with trio.open_nursery() as inner:
            inner.start_soon(read_fast)
            for op_id in range(1, sent + 1):
                op = {"op": "set", "path": f"/k{op_id % 5}", "value": BIG}
                await writer.send({"t": "op", "id": op_id, "ops": [op]})
                await writer.recv_type("ack")
                if reads_in_grace and stuck.close_request is not None:
                    inner.cancel_scope.cancel()  # evicted: go and read (below) within its close grace
                    break
        if reads_in_grace:
            assert stuck.close_request == (codes.SLOW_CONSUMER, "slow_consumer")
        else:
            assert seen == list(range(1, sent + 1))  # every one, in order, none held back
        held = stuck.queued_bytes  # its queue and the rest of a half-written frame: what the budget counts
        assert stuck.close_request is not None or held <= h.settings.send_queue_bytes + 64_000
    # The stuck device now reads what it was sent: whole frames only (a torn frame fails wsproto), and either a
    # gap-free stream or the slow_consumer error then 4008.
    frames: list[dict[str, Any]] = []
    close_code = None
    parts: list[bytes] = []
    cut = False
    with trio.fail_after(20):
        while close_code is None:
            try:
                data = await stuck_stream.receive_some()
            except trio.BrokenResourceError:  # reset: evicted, and it did not read within the close grace
                data = b""
            if not data:
                cut = True
                break
            stuck_ws.receive_data(data)
            for event in stuck_ws.events():
                if isinstance(event, Message):  # wsproto hands a message over in pieces as they arrive
                    parts.append(event.data.encode() if isinstance(event.data, str) else event.data)
                    if event.message_finished:
                        obj = orjson.loads(b"".join(parts))
                        parts.clear()
                        frames.extend(obj if isinstance(obj, list) else [obj])
                elif isinstance(event, CloseConnection):
                    close_code = event.code
            if frames and frames[-1]["t"] == "patch" and frames[-1]["version"] == sent:
                break
    kinds = {f["t"] for f in frames}
    assert kinds <= {"welcome", "patch", "presence", "error"}, kinds
    if reads_in_grace:
        assert close_code == codes.SLOW_CONSUMER and frames[-1].get("code") == codes.E_SLOW_CONSUMER, frames[-1:]
    elif close_code is not None:
        assert close_code == codes.SLOW_CONSUMER and frames[-1].get("code") == codes.E_SLOW_CONSUMER
    elif cut:  # never a "normal" close for a device that was evicted
        assert stuck.close_request == (codes.SLOW_CONSUMER, "slow_consumer")
    else:
        versions = [f["version"] for f in frames if f["t"] in ("patch", "welcome")]
        assert versions == sorted(versions) and versions[-1] == sent
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stuck_stream.aclose()
    h.running.stop()


async def test_pings_answered_between_a_flood_of_frames(nursery: trio.Nursery, tmp_path: Path, hub: bool) -> None:
    """trio-websocket answers pings with send_all while the flusher writes frames: neither tears the other."""
    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, rate_limit="10000/10000")
    sid = await h.create_session()
    sent = 400
    async with raw_device(h, sid, "w") as writer, raw_device(h, sid, "r") as reader:

        async def flood() -> None:
            for op_id in range(1, sent + 1):
                await writer.send({"t": "op", "id": op_id, "ops": [{"op": "set", "path": "/x", "value": BIG[:3000]}]})

        pongs = 0
        async with trio.open_nursery() as inner:
            inner.start_soon(flood)

            async def ping() -> None:
                nonlocal pongs
                for n in range(40):
                    with trio.fail_after(10):
                        await reader.ws.ping(b"p%d" % n)  # returns when its pong arrived
                    pongs += 1

            inner.start_soon(ping)
            assert await patches_until(reader, sent) == list(range(1, sent + 1))
        assert pongs == 40
    h.running.stop()


async def test_a_session_ended_while_frames_flow_closes_after_the_last_frame(
    nursery: trio.Nursery, tmp_path: Path, hub: bool
) -> None:
    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, rate_limit="10000/10000")
    sid = await h.create_session()
    async with raw_device(h, sid, "w") as writer, raw_device(h, sid, "r") as reader:
        for op_id in range(1, 201):
            await writer.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})
        await writer.recv_type("ack")
        async with h.rest() as http:
            assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 204
        code = await reader.closed_code(timeout=10)
        assert code == codes.ENDED
        frames = reader.inbox
        assert frames[-1]["t"] == "ended", frames[-3:]
        versions = [f["version"] for f in frames if f["t"] == "patch"]
        assert versions == list(range(versions[0], versions[0] + len(versions))) if versions else True
        with contextlib.suppress(ConnectionClosed):
            await writer.closed_code(timeout=10)
    h.running.stop()


async def test_messages_sent_before_the_welcome_are_taken_in_order_then_inline(
    nursery: trio.Nursery, tmp_path: Path, hub: bool
) -> None:
    """Ops pipelined right behind the hello wait, parsed, while the session attaches; they are taken first, in
    order, then the connection's own task takes the rest as it reads them."""
    from transport.wsconn import OwnWebSocket

    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, rate_limit="10000/10000")
    sid = await h.create_session()
    hello = {"t": "hello", "token": h.token(), "session": sid, "device": "p"}
    async with raw_device(h, sid, "p", hello={}) as dev:
        await dev.send(hello)
        for op_id in range(1, 31):  # no wait for the welcome
            await dev.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})
        await dev.recv_type("welcome")
        acks = [(await dev.recv_type("ack")) for _ in range(30)]
        assert [a["id"] for a in acks] == list(range(1, 31))
        assert [a["version"] for a in acks] == list(range(1, 31))
        assert isinstance(server_link(h, sid, "p").ws, OwnWebSocket)
        async with h.rest() as http:
            assert (await http.get(f"/v1/sessions/{sid}")).json()["state"] == {"n": 30}
    h.running.stop()


async def test_a_failure_while_taking_a_message_closes_that_connection_only(
    nursery: trio.Nursery, tmp_path: Path, hub: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while a message is taken inline, in the connection's reading task: it must not reach the
    server's nursery (every device would go), only close its own connection with 1011."""
    from transport.server import WebSocketServer

    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub)
    sid = await h.create_session()
    original = WebSocketServer._message_for

    def boom(self: WebSocketServer, conn: Connection, watch: Any, data: str | bytes) -> Any:
        if "boom" in str(data):
            raise RuntimeError("a bug")
        return original(self, conn, watch, data)

    monkeypatch.setattr(WebSocketServer, "_message_for", boom)
    async with raw_device(h, sid, "bystander") as bystander, raw_device(h, sid, "victim") as victim:
        await victim.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/boom", "value": 1}]})
        assert await victim.closed_code() == codes.INTERNAL_ERROR
        await bystander.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}]})
        assert (await bystander.recv_type("ack"))["version"] == 1
    h.running.stop()


async def test_devices_leaving_while_frames_flow_to_them_leave_the_server_up(
    nursery: trio.Nursery, tmp_path: Path, hub: bool
) -> None:
    """Review finding: a connection marked for the flusher whose nursery ended before the flush (the device left
    in between) made the flusher start a writer in a closed nursery, and that error ended the whole server."""
    h = await start_server(nursery, tmp_path / "data", ws_read_hub=hub, rate_limit="10000/10000")
    sid = await h.create_session()
    async with raw_device(h, sid, "w") as writer:

        async def flood() -> None:
            for op_id in range(1, 3001):
                await writer.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            for index in range(40):  # each leaves abruptly while patches are on their way to it
                async with raw_device(h, sid, f"leaver{index}") as leaver:
                    await leaver.recv_type("patch")
                    await leaver.ws.aclose()
        with trio.fail_after(20):
            while (await writer.recv_type("ack"))["id"] < 3000:
                pass
    async with raw_device(h, sid, "after") as after:  # the server is still up
        assert after.welcome is not None and after.welcome["state"] == {"n": 3000}
    h.running.stop()
