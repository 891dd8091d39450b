"""The client SDK against a scripted peer: a trio-websocket server in the test that speaks protocol v1 by hand.

Each test accepts the SDK's connections one by one (`await peer.accept()`), reads what the client sends, and
answers frame by frame, so every protocol situation (batches, gaps, drops, close codes) is exact.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgpack
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from client import Patch, SessionError, backoff_delay, open_session
from client.replica import Replica, ResyncNeeded
from client.wire import Codec

Frame = dict[str, Any]
FAST = {"backoff_base_s": 0.01, "max_backoff_s": 0.05, "connect_timeout_s": 3.0, "hello_timeout_s": 2.0, "first_id": 1}


class PeerConn:
    """One accepted connection, driven by the test."""

    def __init__(self, ws: WebSocketConnection, request: WebSocketRequest) -> None:
        self.ws = ws
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.offered = list(request.proposed_subprotocols)
        self.binary = ws.subprotocol == "sessiond.v1.msgpack"
        self.done = trio.Event()
        self.hello: Frame = {}

    async def send(self, frame: Frame | list[Frame]) -> None:
        if self.binary:
            await self.ws.send_message(msgpack.packb(frame, use_bin_type=True))
        else:
            await self.ws.send_message(orjson.dumps(frame).decode())

    async def recv(self) -> Frame:
        with trio.fail_after(2):
            message = await self.ws.get_message()
        if isinstance(message, bytes):
            assert self.binary
            return msgpack.unpackb(message)  # type: ignore[no-any-return]
        return orjson.loads(message)  # type: ignore[no-any-return]

    async def welcome(self, version: int, state: Frame, **extra: Any) -> None:
        await self.send(
            {
                "t": "welcome",
                "session": "s1",
                "device": self.hello["device"],
                "version": version,
                "mode": "full",
                "state": state,
                "active": None,
                "devices": [],
                **extra,
            }
        )

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.aclose(code, reason)
        self.done.set()


class Peer:
    def __init__(self) -> None:
        self.url = ""
        self._send, self._recv = trio.open_memory_channel[PeerConn](16)

    async def handler(self, request: WebSocketRequest) -> None:
        offered = request.proposed_subprotocols
        ws = await request.accept(subprotocol=offered[0] if offered else None)
        conn = PeerConn(ws, request)
        try:
            conn.hello = (
                orjson.loads(await ws.get_message()) if not conn.binary else msgpack.unpackb(await ws.get_message())
            )
        except ConnectionClosed:
            return
        await self._send.send(conn)
        await conn.done.wait()

    async def accept(self, timeout: float = 2.0) -> PeerConn:
        with trio.fail_after(timeout):
            return await self._recv.receive()

    def pending_connections(self) -> int:
        return self._recv.statistics().current_buffer_used


@pytest.fixture
async def peer(nursery: trio.Nursery) -> AsyncIterator[Peer]:
    p = Peer()
    server = await nursery.start(partial(serve_websocket, p.handler, "127.0.0.1", 0, None))
    p.url = f"ws://127.0.0.1:{server.port}/v1/ws"
    yield p


async def joined(peer: Peer, state: Frame | None = None, version: int = 1) -> PeerConn:
    conn = await peer.accept()
    await conn.welcome(version, state if state is not None else {})
    return conn


def connect(peer: Peer, **kwargs: Any) -> Any:
    options = {"token": "tok", "session": "s1", "device": "d1", **FAST, **kwargs}
    return open_session(peer.url, **options)


# ---- join ---------------------------------------------------------------------------------------------


async def test_hello_carries_token_session_device_and_full_welcome_sets_state(
    peer: Peer, nursery: trio.Nursery
) -> None:
    async def server() -> None:
        conn = await peer.accept()
        assert conn.hello == {"t": "hello", "session": "s1", "device": "d1", "kind": "web", "token": "tok"}
        assert "authorization" not in conn.headers
        assert conn.offered == ["sessiond.v1.json"]
        await conn.welcome(7, {"a": {"b": 1}}, active="d2", devices=[{"device": "d2", "kind": "ios"}])

    nursery.start_soon(server)
    async with connect(peer, kind="web") as s:
        assert s.connected
        assert s.state == {"a": {"b": 1}}
        assert s.version == 7
        assert s.active == "d2"
        assert s.devices == [{"device": "d2", "kind": "ios"}]
        assert (await s.events().receive())["t"] == "welcome"


async def test_token_in_header_callable_and_origin(peer: Peer, nursery: trio.Nursery) -> None:
    calls = []

    def token() -> str:
        calls.append(1)
        return f"tok{len(calls)}"

    async def server() -> None:
        conn = await peer.accept()
        assert "token" not in conn.hello
        assert conn.headers["authorization"] == "Bearer tok1"
        assert conn.headers["origin"] == "https://app.example"
        await conn.welcome(1, {})

    nursery.start_soon(server)
    async with connect(peer, token=token, token_in_header=True, origin="https://app.example") as s:
        assert s.version == 1
    assert calls == [1]


@pytest.mark.parametrize("code,name", [(4001, "unauthorized"), (4003, "forbidden"), (4004, "not_found")])
async def test_join_refused_with_final_close_code_raises(
    peer: Peer, nursery: trio.Nursery, code: int, name: str
) -> None:
    async def server() -> None:
        conn = await peer.accept()
        await conn.send({"t": "error", "code": name, "message": "no"})
        await conn.close(code, name)

    nursery.start_soon(server)
    with pytest.raises(SessionError) as info:
        async with connect(peer):
            pytest.fail("must not join")
    assert info.value.code == name
    await trio.sleep(0.1)  # an absence can only be watched for a while: longer than FAST's backoff
    assert peer.pending_connections() == 0  # no reconnect after a final code


async def test_upgrade_rejected_with_401_is_final(nursery: trio.Nursery) -> None:
    attempts = []

    async def reject(request: WebSocketRequest) -> None:
        attempts.append(request.headers)
        await request.reject(401)

    server = await nursery.start(partial(serve_websocket, reject, "127.0.0.1", 0, None))
    with pytest.raises(SessionError) as info:
        async with open_session(f"ws://127.0.0.1:{server.port}/v1/ws", token="t", session="s", device="d", **FAST):
            pass
    assert info.value.code == "unauthorized"
    assert len(attempts) == 1


async def test_a_server_closing_mid_handshake_costs_one_handshake_timeout_per_try(nursery: trio.Nursery) -> None:
    """trio-websocket never returns when TCP is closed during the upgrade (a load balancer with no live backend
    does that): each try is bounded by the handshake timeout, so the device retries instead of hanging."""
    accepted = []

    async def close_at_once(stream: trio.SocketStream) -> None:
        accepted.append(trio.current_time())
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, close_at_once, 0)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(SessionError) as info:
        async with open_session(
            f"ws://127.0.0.1:{port}/v1/ws", token="t", session="s", device="d", backoff_base_s=0.01,
            max_backoff_s=0.01, connect_timeout_s=2.0, hello_timeout_s=10.0, handshake_timeout_s=0.2,
        ):
            pass
    assert info.value.code == "timeout"
    assert len(accepted) >= 4  # one try per handshake timeout, not one per hello timeout


async def test_join_times_out_without_welcome(peer: Peer, nursery: trio.Nursery) -> None:
    nursery.start_soon(peer.accept)
    with pytest.raises(SessionError) as info:
        async with connect(peer, connect_timeout_s=0.3, hello_timeout_s=5):
            pass
    assert info.value.code == "timeout"


# ---- ops ------------------------------------------------------------------------------------------------


async def test_op_resolves_on_ack_and_is_applied_locally(peer: Peer, nursery: trio.Nursery) -> None:
    patches: list[Patch] = []

    async def server() -> None:
        conn = await joined(peer, {"n": 1}, version=3)
        frame = await conn.recv()
        assert frame == {"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n", "by": 2}]}
        await conn.send({"t": "ack", "id": 1, "version": 4})
        frame = await conn.recv()
        assert frame == {"t": "op", "id": 2, "ops": [{"op": "set", "path": "/x/y", "value": "v"}], "base": 4}
        await conn.send({"t": "ack", "id": 2, "version": 5})
        await conn.send({"t": "patch", "version": 6, "device": "d2", "ops": [{"op": "del", "path": "/n"}]})

    nursery.start_soon(server)
    async with connect(peer, on_patch=patches.append) as s:
        assert await s.inc("/n", 2) == 4
        assert s.state == {"n": 3}
        assert await s.set("/x/y", "v", base=4) == 5
        await s.wait_version(6, timeout=2)
        assert s.state == {"x": {"y": "v"}}
    assert [(p.version, p.device, p.own) for p in patches] == [(4, "d1", True), (5, "d1", True), (6, "d2", False)]


async def test_error_frame_fails_the_matching_op_only(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {}, version=5)
        first, second = await conn.recv(), await conn.recv()
        await conn.send({"t": "error", "id": first["id"], "code": "conflict", "message": "stale", "version": 5})
        await conn.send({"t": "ack", "id": second["id"], "version": 6})

    nursery.start_soon(server)
    async with connect(peer) as s, trio.open_nursery() as inner:
        results: dict[str, Any] = {}

        async def conflicting() -> None:
            with pytest.raises(SessionError) as info:
                await s.set("/a", 1, base=4)
            results["error"] = info.value

        async def fine() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the conflicting op is out and waits for its answer
            results["version"] = await s.set("/b", 2)

        inner.start_soon(conflicting)
        inner.start_soon(fine)
    assert results["error"].code == "conflict"
    assert results["error"].version == 5
    assert results["version"] == 6
    assert s.state == {"b": 2}


async def test_pause_claim_handoff_presence(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {}, version=2)
        frame = await conn.recv()
        assert frame == {"t": "claim", "id": 1}
        await conn.send([{"t": "handoff", "active": "d1", "version": 2}, {"t": "ack", "id": 1, "version": 2}])
        frame = await conn.recv()
        assert frame == {"t": "pause", "id": 2}
        await conn.send({"t": "ack", "id": 2, "version": 2})
        await conn.send({"t": "presence", "devices": [{"device": "d1", "kind": "other"}], "active": None})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert await s.claim() == 2
        assert s.active == "d1"
        assert await s.pause() == 2
        kinds = []
        async for event in s.events():
            kinds.append(event["t"])
            if event["t"] == "presence":
                break
        assert kinds == ["welcome", "handoff", "presence"]
        assert s.active is None
        assert s.devices == [{"device": "d1", "kind": "other"}]
        assert s.version == 2


async def test_refresh_token_returns_exp(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer)
        assert await conn.recv() == {"t": "auth", "token": "fresh"}
        await conn.send({"t": "authed", "exp": 1234.5})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert await s.refresh_token("fresh") == 1234.5


@pytest.mark.parametrize("subprotocol", ["json", "msgpack"])
async def test_batched_frames_in_one_message(peer: Peer, nursery: trio.Nursery, subprotocol: str) -> None:
    async def server() -> None:
        conn = await peer.accept()
        assert conn.offered == [f"sessiond.v1.{subprotocol}"]
        welcome = {
            "t": "welcome",
            "session": "s1",
            "device": "d1",
            "version": 1,
            "mode": "full",
            "state": {"n": 0},
            "active": None,
            "devices": [],
        }
        await conn.send(
            [
                welcome,
                {"t": "patch", "version": 2, "device": "d2", "ops": [{"op": "inc", "path": "/n", "by": 1}]},
                {"t": "patch", "version": 3, "device": "d2", "ops": [{"op": "inc", "path": "/n", "by": 10}]},
            ]
        )
        frame = await conn.recv()
        await conn.send([{"t": "presence", "devices": []}, {"t": "ack", "id": frame["id"], "version": 4}])

    nursery.start_soon(server)
    async with connect(peer, subprotocol=subprotocol) as s:
        await s.wait_version(3, timeout=2)
        assert s.state == {"n": 11}
        assert await s.inc("/n") == 4
        assert s.state == {"n": 12}


async def test_ack_ahead_of_patch_is_held_until_the_gap_fills(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        frame = await conn.recv()
        await conn.send({"t": "ack", "id": frame["id"], "version": 3})
        await trio.testing.wait_all_tasks_blocked()  # the client has taken the ack (and holds it)
        await conn.send({"t": "patch", "version": 2, "device": "d2", "ops": [{"op": "set", "path": "/m", "value": 1}]})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert await s.inc("/n", 5) == 3
        await s.wait_version(3, timeout=2)
        assert s.state == {"n": 5, "m": 1}
        assert s.reconnects == 0


async def test_ack_ahead_that_never_fills_resyncs_with_resume(
    peer: Peer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("client.sdk.HOLD_TIMEOUT_S", 0.1)

    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        frame = await conn.recv()
        await conn.send({"t": "ack", "id": frame["id"], "version": 3})  # patch 2 never comes on this connection
        conn = await peer.accept()
        assert conn.hello["resume"] == {"version": 1}
        await conn.welcome(3, {"n": 1, "m": 2})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert await s.inc("/n") == 3
        await s.wait_version(3, timeout=2)
        assert s.state == {"n": 1, "m": 2}
        assert s.reconnects == 1


async def test_default_request_ids_grow_across_sessions(peer: Peer, nursery: trio.Nursery) -> None:
    ids = []

    async def server() -> None:
        for _ in range(2):
            conn = await joined(peer)
            frame = await conn.recv()
            ids.append(frame["id"])
            await conn.send({"t": "ack", "id": frame["id"], "version": 2})

    nursery.start_soon(server)
    for _ in range(2):
        async with connect(peer, first_id=None) as s:
            await s.set("/a", 1)
    assert ids[0] > 10**15 and ids[1] > ids[0]


# ---- reconnects -------------------------------------------------------------------------------------------


async def test_pending_op_is_retransmitted_with_the_same_id_after_a_drop(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        frame = await conn.recv()
        assert frame["id"] == 1
        await conn.close(1001, "going away")  # drop before the ack
        conn = await peer.accept()
        assert conn.hello["resume"] == {"version": 1}
        await conn.send(
            {
                "t": "welcome",
                "session": "s1",
                "device": "d1",
                "version": 2,
                "mode": "replay",
                "patches": [
                    {"t": "patch", "version": 2, "device": "d1", "ops": [{"op": "inc", "path": "/n", "by": 1}]}
                ],
                "active": None,
                "devices": [],
            }
        )
        again = await conn.recv()
        assert again == frame  # same id, same ops
        await conn.send({"t": "ack", "id": 1, "version": 2})  # the idempotent re-ack
        second = await conn.recv()
        assert second["id"] == 2
        await conn.send({"t": "ack", "id": 2, "version": 3})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert await s.inc("/n") == 2
        assert s.state == {"n": 1}  # applied once, from the replay
        assert await s.inc("/n") == 3
        assert s.state == {"n": 2}
        assert s.reconnects == 1
        events = []
        while len(events) < 4:
            events.append((await s.events().receive())["t"])
        assert events == ["welcome", "disconnected", "welcome", "reconnected"]


async def test_op_made_while_disconnected_is_sent_after_rejoin(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {}, version=1)
        await conn.close(4008, "slow_consumer")
        conn = await peer.accept()
        await trio.testing.wait_all_tasks_blocked()  # the client's op is made and waits for the welcome
        await conn.welcome(1, {})
        frame = await conn.recv()
        await conn.send({"t": "ack", "id": frame["id"], "version": 2})

    nursery.start_soon(server)
    async with connect(peer) as s:
        assert (await s.events().receive())["t"] == "welcome"
        with trio.fail_after(2):
            assert (await s.events().receive())["t"] == "disconnected"
        assert await s.set("/a", 1) == 2
        assert s.state == {"a": 1}


async def test_gap_reconnects_with_resume_and_applies_the_replay(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        await conn.send({"t": "patch", "version": 3, "device": "d2", "ops": [{"op": "inc", "path": "/n", "by": 2}]})
        with pytest.raises(ConnectionClosed):
            await conn.recv()  # the client hangs up on a gap
        conn.done.set()
        conn = await peer.accept()
        assert conn.hello["resume"] == {"version": 1}
        patches = [
            {"t": "patch", "version": 2, "device": "d2", "ops": [{"op": "inc", "path": "/n", "by": 1}]},
            {"t": "patch", "version": 3, "device": "d2", "ops": [{"op": "inc", "path": "/n", "by": 2}]},
        ]
        await conn.send(
            {
                "t": "welcome",
                "session": "s1",
                "device": "d1",
                "version": 3,
                "mode": "replay",
                "patches": patches,
                "active": None,
                "devices": [],
            }
        )

    nursery.start_soon(server)
    async with connect(peer) as s:
        await s.wait_version(3, timeout=2)
        assert s.state == {"n": 3}
        assert s.reconnects == 1


async def test_replay_with_a_gap_resyncs_without_resume(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        await conn.close(1001)
        conn = await peer.accept()
        await conn.send(
            {
                "t": "welcome",
                "session": "s1",
                "device": "d1",
                "version": 4,
                "mode": "replay",
                "patches": [{"t": "patch", "version": 3, "device": "d2", "ops": []}],
                "active": None,
                "devices": [],
            }
        )
        conn = await peer.accept()
        assert "resume" not in conn.hello
        await conn.welcome(4, {"n": 9})

    nursery.start_soon(server)
    async with connect(peer) as s:
        await s.wait_version(4, timeout=2)
        assert s.state == {"n": 9}


async def test_welcome_mid_connection_replaces_state(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        await conn.welcome(50, {"n": 50})
        await conn.send({"t": "patch", "version": 51, "device": "d2", "ops": [{"op": "inc", "path": "/n"}]})

    nursery.start_soon(server)
    async with connect(peer) as s:
        await s.wait_version(51, timeout=2)
        assert s.state == {"n": 51}
        assert s.reconnects == 0


@pytest.mark.parametrize(
    "code,name", [(4001, "unauthorized"), (4003, "forbidden"), (4004, "not_found"), (4010, "ended")]
)
async def test_final_close_code_stops_and_fails_pending(
    peer: Peer, nursery: trio.Nursery, code: int, name: str
) -> None:
    async def server() -> None:
        conn = await joined(peer)
        await conn.recv()
        await conn.close(code, name)

    nursery.start_soon(server)
    async with connect(peer) as s:
        with pytest.raises(SessionError) as info:
            await s.set("/a", 1)
        assert info.value.code == name
        assert s.error is not None and s.error.code == name
        await trio.sleep(0.1)  # an absence can only be watched for a while: longer than FAST's backoff
        assert peer.pending_connections() == 0  # no reconnect after a final code
        with pytest.raises(SessionError):
            await s.set("/b", 1)
        assert [event["t"] async for event in s.events()][-1] == "closed"


async def test_ended_fails_pending_and_stops(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer)
        await conn.recv()
        await conn.send({"t": "ended"})
        await conn.close(4010, "ended")

    nursery.start_soon(server)
    async with connect(peer) as s:
        with pytest.raises(SessionError) as info:
            await s.set("/a", 1)
        assert info.value.code == "ended"
        kinds = [event["t"] async for event in s.events()]
        assert "ended" in kinds and kinds[-1] == "closed"
        assert s.ended
        await trio.sleep(0.1)  # an absence can only be watched for a while: longer than FAST's backoff
        assert peer.pending_connections() == 0  # no reconnect after `ended`


async def test_no_reconnect_when_disabled(peer: Peer, nursery: trio.Nursery) -> None:
    async def server() -> None:
        conn = await joined(peer)
        await conn.recv()
        await conn.close(1001)

    nursery.start_soon(server)
    async with connect(peer, reconnect=False) as s:
        with pytest.raises(SessionError) as info:
            await s.set("/a", 1)
        assert info.value.code == "disconnected"


async def test_first_connect_retries_until_the_server_is_up(nursery: trio.Nursery) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    peer = Peer()
    peer.url = f"ws://127.0.0.1:{port}/v1/ws"

    async def late_server() -> None:
        await trio.sleep(0.2)
        await nursery.start(partial(serve_websocket, peer.handler, "127.0.0.1", port, None))
        await joined(peer)

    nursery.start_soon(late_server)
    async with connect(peer) as s:
        assert s.version == 1


async def test_exit_closes_politely_and_body_errors_are_not_wrapped(peer: Peer, nursery: trio.Nursery) -> None:
    seen: list[int] = []

    async def server() -> None:
        conn = await joined(peer)
        with pytest.raises(ConnectionClosed) as info:
            await conn.ws.get_message()
        assert info.value.reason is not None
        seen.append(info.value.reason.code)
        conn.done.set()

    nursery.start_soon(server)
    with pytest.raises(KeyError):
        async with connect(peer):
            raise KeyError("boom")
    with trio.fail_after(5):
        while not seen:
            await trio.sleep(0.01)
    assert seen == [1000]


# ---- pure parts -------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(1.0, 0.1 * 2**attempt)
        values = [backoff_delay(attempt, 0.1, 1.0, rng) for _ in range(200)]
        assert all(0.0 <= v <= ceiling for v in values)
        assert max(values) > ceiling * 0.8  # uses the whole window
    assert backoff_delay(10_000, 0.1, 2.0, rng) <= 2.0


def test_codec_accepts_single_frames_and_batches() -> None:
    json_codec, mp_codec = Codec("sessiond.v1.json"), Codec("sessiond.v1.msgpack")
    assert json_codec.decode('{"t":"ended"}') == [{"t": "ended"}]
    assert json_codec.decode(b'[{"t":"a"},{"t":"b"},3,{"x":1}]') == [{"t": "a"}, {"t": "b"}]
    assert mp_codec.decode(msgpack.packb([{"t": "a"}])) == [{"t": "a"}]
    assert mp_codec.decode('{"t":"text"}') == [{"t": "text"}]  # text is JSON even under msgpack
    assert isinstance(json_codec.encode({"t": "x"}), str)
    assert msgpack.unpackb(mp_codec.encode({"t": "x"})) == {"t": "x"}
    with pytest.raises(ValueError):
        json_codec.decode("{nope")


def test_replica_gap_and_divergence_rules() -> None:
    replica = Replica("d1")
    replica.on_welcome({"t": "welcome", "version": 1, "mode": "full", "state": {"n": 0}})
    replica.on_patch({"t": "patch", "version": 1, "ops": [{"op": "inc", "path": "/n"}]})  # duplicate: ignored
    assert replica.state == {"n": 0}
    with pytest.raises(ResyncNeeded) as info:
        replica.on_patch({"t": "patch", "version": 3, "ops": []})
    assert info.value.resume
    with pytest.raises(ResyncNeeded) as info:
        replica.on_patch({"t": "patch", "version": 2, "ops": [{"op": "inc", "path": "/n/deeper"}]})
    assert not info.value.resume  # our copy is wrong: full state needed
    assert replica.version == 1


async def test_an_unanswered_request_times_out_and_stays_queued(peer: Peer, nursery: trio.Nursery) -> None:
    """Issue 8: op() waited forever when no answer came. It now raises `timeout` (outcome unknown), and the request
    keeps its id in the queue: after a reconnect it is retransmitted, so the server applies it at most once."""
    first: list[Frame] = []
    timed_out = trio.Event()
    retransmitted: list[Frame] = []

    async def server() -> None:
        conn = await joined(peer, {"n": 0}, version=1)
        first.append(await conn.recv())  # never answered
        await timed_out.wait()
        await conn.close(1001, "going away")
        conn = await joined(peer, {"n": 0}, version=1)
        retransmitted.append(await conn.recv())

    nursery.start_soon(server)
    async with connect(peer, request_timeout_s=0.3) as s:
        with pytest.raises(SessionError) as info:
            await s.inc("/n")
        assert info.value.code == "timeout" and "at most once" in info.value.message
        timed_out.set()
        with trio.fail_after(5):
            while not retransmitted:
                await trio.sleep(0.01)
    assert retransmitted == first  # same id, same ops


async def test_a_ping_during_our_close_does_not_crash_the_session(nursery: trio.Nursery) -> None:
    """Seen in `bench soak`: the server's ping arrived after our close frame; trio-websocket's reader answered it,
    wsproto refused the Pong in LOCAL_CLOSING, and the LocalProtocolError escaped from `async with open_session`."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    closed_cleanly = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        await stream.send_all(ws.send(AcceptConnection(subprotocol="sessiond.v1.json")))
                    elif isinstance(event, TextMessage):
                        hello = orjson.loads(event.data)
                        welcome = {"t": "welcome", "session": hello["session"], "device": hello["device"],
                                   "epoch": "1", "version": 0, "mode": "full", "state": {}, "active": None,
                                   "devices": []}
                        await stream.send_all(ws.send(TextMessage(orjson.dumps(welcome).decode())))
                    elif isinstance(event, CloseConnection):
                        await stream.send_all(b"\x89\x00")  # a ping (server frames are unmasked), before the reply
                        await stream.send_all(ws.send(event.response()))
                        closed_cleanly.set()
                        return

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        for _ in range(5):  # the race is the reader's: a few rounds make it near certain
            closed_cleanly = trio.Event()
            async with open_session(f"ws://127.0.0.1:{port}/v1/ws", token="t", session="s1", device="d1") as s:
                assert s.version == 0
            await closed_cleanly.wait()
