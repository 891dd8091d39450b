"""Wire-protocol behaviour end to end: retransmits, resume, handoff, REST reaching devices, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import trio
from trio_websocket import open_websocket_url

from tests.integration.harness import Harness, raw_device, start_server


async def test_retransmit_is_idempotent(server: Harness) -> None:
    sid = await server.create_session(state={"n": 0})
    async with raw_device(server, sid, "a") as a, raw_device(server, sid, "b") as b:
        op = {"t": "op", "id": 7, "ops": [{"op": "inc", "path": "/n"}]}
        await a.send(op)
        assert (await a.recv_type("ack"))["version"] == 1
        await a.send(op)  # same id again: the original ack, not a second change
        assert await a.recv_type("ack") == {"t": "ack", "id": 7, "version": 1}
        await a.send({"t": "op", "id": 8, "ops": [{"op": "inc", "path": "/n"}]})
        assert (await a.recv_type("ack"))["version"] == 2
        patches = [await b.recv_type("patch"), await b.recv_type("patch")]
        assert [p["version"] for p in patches] == [1, 2]
    async with server.rest() as http:
        assert (await http.get(f"/v1/sessions/{sid}")).json()["state"] == {"n": 2}


async def test_resume_replays_missed_patches(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, "a") as a:
        assert a.welcome is not None
        epoch = a.welcome["epoch"]
        for i in range(5):
            await a.send({"t": "op", "id": i + 1, "ops": [{"op": "set", "path": f"/x{i}", "value": i}]})
            await a.recv_type("ack")
    resume = {"version": 2, "epoch": epoch}
    hello = {"t": "hello", "token": server.token(), "session": sid, "device": "b", "resume": resume}
    async with raw_device(server, sid, "b", hello=hello) as b:
        assert b.welcome is not None
        assert b.welcome["mode"] == "replay"
        assert [p["version"] for p in b.welcome["patches"]] == [3, 4, 5]
    hello["resume"] = {"version": 5, "epoch": epoch}
    async with raw_device(server, sid, "b", hello=hello) as b:
        assert b.welcome == {**b.welcome, "mode": "replay", "patches": [], "version": 5}
    hello["resume"] = {"version": 2}  # no epoch: the server cannot know which history 2 belongs to
    async with raw_device(server, sid, "b", hello=hello) as b:
        assert b.welcome is not None and b.welcome["mode"] == "full" and b.welcome["version"] == 5


async def test_base_conflict_and_invalid_op(server: Harness) -> None:
    sid = await server.create_session(state={"s": "text"})
    async with raw_device(server, sid, "a") as a:
        await a.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/v", "value": 1}], "base": 0})
        assert (await a.recv_type("ack"))["version"] == 1
        await a.send({"t": "op", "id": 2, "ops": [{"op": "set", "path": "/v", "value": 2}], "base": 0})
        err = await a.recv_type("error")
        assert err["code"] == "conflict" and err["id"] == 2 and err["version"] == 1
        ops = [{"op": "set", "path": "/w", "value": 1}, {"op": "inc", "path": "/s"}]
        await a.send({"t": "op", "id": 3, "ops": ops})
        err = await a.recv_type("error")
        assert err["code"] == "invalid_op" and err["id"] == 3
    async with server.rest() as http:
        body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert body["state"] == {"s": "text", "v": 1} and body["version"] == 1


async def test_handoff_pause_and_claim(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, "phone") as phone, raw_device(server, sid, "laptop") as laptop:
        await phone.send({"t": "claim", "id": 1})
        assert (await phone.recv_type("ack"))["id"] == 1
        assert (await laptop.recv_type("handoff"))["active"] == "phone"
        await laptop.send({"t": "pause", "id": 1})  # not the active device
        assert (await laptop.recv_type("error"))["code"] == "conflict"
        await phone.send({"t": "pause", "id": 2})
        assert (await phone.recv_type("ack"))["id"] == 2
        assert (await laptop.recv_type("handoff"))["active"] is None
        await laptop.send({"t": "claim", "id": 2})
        assert (await laptop.recv_type("ack"))["id"] == 2
        assert (await phone.recv_type("handoff"))["active"] == "laptop"
    async with server.rest() as http:
        body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert body["active"] == "laptop" and body["status"] == "active"
        r = await http.post(f"/v1/sessions/{sid}/handoff", json={"device": "phone"})
        assert r.json() == {"active": "phone", "version": 0}


async def test_rest_patch_reaches_devices_and_delete_ends_them(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, "a") as a, server.rest() as http:
        r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": "/t", "value": "hi"}]})
        assert r.status_code == 200 and r.json() == {"version": 1}
        patch = await a.recv_type("patch")
        assert patch["ops"][0]["value"] == "hi" and patch["version"] == 1
        r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": "/t", "value": 1}], "base": 0})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        r = await http.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 204
        assert (await a.recv_type("ended")) == {"t": "ended"}
        assert await a.closed_code() == 4010
        r = await http.get(f"/v1/sessions/{sid}")
        assert r.json()["status"] == "ended"
        assert (await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "del", "path": "/t"}]})).status_code == 404
    async with raw_device(server, sid, "a", expect_welcome=False) as again:
        assert (await again.recv_type("error"))["code"] == "not_found"
        assert await again.closed_code() == 4004


async def test_msgpack_subprotocol(server: Harness) -> None:
    sid = await server.create_session(state={"a": 1})
    async with open_websocket_url(server.ws_url, subprotocols=["sessiond.v1.msgpack"]) as ws:
        assert ws.subprotocol == "sessiond.v1.msgpack"
        await ws.send_message(msgpack.packb({"t": "hello", "token": server.token(), "session": sid, "device": "m"}))
        welcome = msgpack.unpackb(await ws.get_message())
        assert welcome["t"] == "welcome" and welcome["state"] == {"a": 1}
        await ws.send_message(msgpack.packb({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/a", "by": 1.5}]}))
        with trio.fail_after(5):
            ack = msgpack.unpackb(await ws.get_message())
        assert ack == {"t": "ack", "id": 1, "version": 1}


async def test_token_in_authorization_header(server: Harness) -> None:
    sid = await server.create_session()
    hello = {"t": "hello", "session": sid, "device": "h"}
    headers = [("Authorization", f"Bearer {server.token()}")]
    async with raw_device(server, sid, hello=hello, extra_headers=headers) as d:
        assert d.welcome is not None and d.welcome["version"] == 0


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


async def test_an_op_nested_too_deeply_gets_invalid_op_with_its_id_in_both_formats(server: Harness) -> None:
    """Issue 8: a 70-level value was refused as `bad_frame` without the op's id; the client could not tell which
    request failed. The session goes on."""
    sid = await server.create_session()
    deep = {"t": "op", "id": 15, "ops": [{"op": "set", "path": "/d", "value": _deep(70)}]}
    async with raw_device(server, sid) as d:
        await d.send(deep)
        error = await d.recv_type("error")
        assert (error["code"], error.get("id")) == ("invalid_op", 15)
        await d.send({"t": "op", "id": 16, "ops": [{"op": "set", "path": "/ok", "value": 1}]})
        assert (await d.recv_type("ack"))["version"] == 1
    async with open_websocket_url(server.ws_url, subprotocols=["sessiond.v1.msgpack"]) as ws:
        await ws.send_message(msgpack.packb({"t": "hello", "token": server.token(), "session": sid, "device": "m"}))
        assert msgpack.unpackb(await ws.get_message())["t"] == "welcome"
        await ws.send_message(msgpack.packb(deep))
        with trio.fail_after(5):
            error = msgpack.unpackb(await ws.get_message())
        assert (error["t"], error["code"], error.get("id")) == ("error", "invalid_op", 15)


async def test_rest_idempotency_key_makes_retries_safe(server: Harness) -> None:
    """DESIGN §4: a PATCH or handoff retried with the same Idempotency-Key returns the first result, changes
    nothing; without a key every PATCH applies; a malformed key is a 400."""
    sid = await server.create_session(state={"n": 0})
    inc = {"ops": [{"op": "inc", "path": "/n"}]}
    async with server.rest() as http:
        for _ in range(3):
            r = await http.patch(f"/v1/sessions/{sid}", json=inc, headers={"Idempotency-Key": "req-1"})
            assert (r.status_code, r.json()) == (200, {"version": 1})
        r = await http.patch(f"/v1/sessions/{sid}", json=inc, headers={"Idempotency-Key": "req-2"})
        assert r.json() == {"version": 2}
        for _ in range(2):
            r = await http.post(f"/v1/sessions/{sid}/handoff", json={"device": "tv"}, headers={"Idempotency-Key": "h"})
            assert r.json() == {"active": "tv", "version": 2}
        assert (await http.patch(f"/v1/sessions/{sid}", json=inc)).json() == {"version": 3}
        bad = await http.patch(f"/v1/sessions/{sid}", json=inc, headers={"Idempotency-Key": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_frame"
        assert (await http.get(f"/v1/sessions/{sid}")).json()["state"] == {"n": 3}


async def test_rest_timeout_says_the_outcome_is_unknown(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A PATCH whose session does not answer in time gets 503 with `outcome: unknown` (it may still be applied),
    and the retry with the same key applies it at most once."""
    h = await start_server(nursery, tmp_path, request_timeout_s=0.3)
    sid = await h.create_session(state={"n": 0})
    gate = trio.Event()
    journal = h.running.storage.journal
    append = journal.append

    async def slow_append(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await append(*args, **kwargs)

    journal.append = slow_append  # type: ignore[method-assign]
    inc = {"ops": [{"op": "inc", "path": "/n"}]}
    async with h.rest() as http:
        r = await http.patch(f"/v1/sessions/{sid}", json=inc, headers={"Idempotency-Key": "once"})
        assert r.status_code == 503 and r.json()["error"]["outcome"] == "unknown"
        gate.set()
        journal.append = append  # type: ignore[method-assign]
        r = await http.patch(f"/v1/sessions/{sid}", json=inc, headers={"Idempotency-Key": "once"})
        assert (r.status_code, r.json()) == (200, {"version": 1})
        assert (await http.get(f"/v1/sessions/{sid}")).json()["state"] == {"n": 1}
    h.running.stop()
