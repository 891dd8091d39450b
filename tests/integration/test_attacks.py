"""Like an attacker: every refusal is a clear error, and other sessions are unharmed."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import httpx
import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from api.logs import configure_logging, reset_logging
from bench.server import running_target
from tests.integration.harness import SECRET, Harness, raw_device, start_server, wsproto_device


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


BAD_TOKENS = {
    "bad signature": jwt.encode({"sub": "alice", "exp": time.time() + 60}, "x" * 32, algorithm="HS256"),
    "alg none": _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(b'{"sub":"alice","exp":9999999999}') + ".",
    "expired": jwt.encode({"sub": "alice", "exp": time.time() - 10}, SECRET, algorithm="HS256"),
    "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "garbage": "not-a-token",
    "huge": "a" * 5000,
}


async def past_expiry(token: str, margin_s: float = 0.5) -> None:
    """Until `token` has expired (the wall clock passing its `exp` is the condition), plus a margin for the
    server's expiry timer, which fires at `exp`. What the callers check next is partly an absence (a refreshed
    connection was not closed with 4001), which can only be watched for a while: the margin is that while."""
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    await trio.sleep(max(0.0, exp - time.time()) + margin_s)


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_refused_on_websocket(server: Harness, name: str) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, token=BAD_TOKENS[name], expect_welcome=False) as d:
        err = await d.recv_type("error")
        assert err["code"] == "unauthorized"
        assert await d.closed_code() == 4001


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_refused_on_rest(server: Harness, name: str) -> None:
    async with server.rest(None) as http:
        r = await http.get("/v1/sessions", headers={"Authorization": f"Bearer {BAD_TOKENS[name]}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert (await http.get("/v1/sessions")).status_code == 401


async def test_another_users_session_and_unknown_session(server: Harness) -> None:
    sid = await server.create_session("alice")
    async with raw_device(server, sid, user="mallory", expect_welcome=False) as d:
        assert (await d.recv_type("error"))["code"] == "forbidden"
        assert await d.closed_code() == 4003
    async with raw_device(server, "no-such-session", expect_welcome=False) as d:
        assert (await d.recv_type("error"))["code"] == "not_found"
        assert await d.closed_code() == 4004
    async with server.rest("mallory") as http:
        assert (await http.get(f"/v1/sessions/{sid}")).status_code == 403
        r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": "/x", "value": 1}]})
        assert r.status_code == 403
        assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 403
        assert (await http.get("/v1/sessions")).json()["sessions"] == []
        assert (await http.get("/v1/sessions/unknown")).status_code == 404


async def test_bad_and_oversized_frames(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid) as d:
        for bad in ["{", "[]", '{"t":"op"}', '{"t":"op","id":1,"ops":[]}', '{"t":"nope"}', '{"t":"hello"}']:
            await d.send(bad)
            assert (await d.recv_type("error"))["code"] == "bad_frame", bad
        await d.send('{"t":"op","id":5,"ops":[{"op":"set","path":"/x","value":"' + "x" * 70_000 + '"}]}')
        assert (await d.recv_type("error"))["code"] == "too_large"
        await d.send({"t": "op", "id": 6, "ops": [{"op": "set", "path": "/ok", "value": True}]})
        assert (await d.recv_type("ack"))["version"] == 1  # still connected, still served


async def test_a_garbage_flood_is_closed_with_1008_and_a_close_frame(server: Harness) -> None:
    """The server closes while the peer is still sending: the close frame must still go out (a regression: the
    reader stopped first and cut the writer, so the peer saw 1006 without a code or a reason)."""
    sid = await server.create_session()
    async with raw_device(server, sid) as d:
        for _ in range(150):  # more than the 100 bad frames in a row the server tolerates, sent in one burst
            await d.send("{")
        assert await d.closed_code() == 1008


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-16"])
async def test_rest_bodies_that_are_not_utf8_get_400_with_the_error_body(server: Harness, content_type: str) -> None:
    """Issue 8: such bodies got Quart's HTML 500 page and an error log; they are the client's mistake."""
    sid = await server.create_session()
    bad = b'{"name":"\xff"}' if "utf-16" not in content_type else '{"name":"x"}'.encode("utf-16")
    logs = io.StringIO()
    configure_logging("json", "debug", logs, stdlib_level="info")  # ours and the libraries' (quart, hypercorn)
    try:
        answers = []
        async with server.rest() as http:
            for method, path in (("POST", "/v1/sessions"), ("PATCH", f"/v1/sessions/{sid}"),
                                 ("POST", f"/v1/sessions/{sid}/handoff")):
                r = await http.request(method, path, content=bad, headers={"content-type": content_type})
                answers.append((method, path, r.status_code, r.text))
    finally:
        reset_logging()
    entries = [json.loads(line) for line in logs.getvalue().splitlines() if line.strip()]
    # A client's mistake: no error-level line and no traceback in the server's log (checked before the
    # answers, so a regression shows as the log line it writes).
    loud = [e for e in entries if e.get("level") in ("error", "critical") or "exception" in e or "exc_info" in e]
    assert not loud, loud
    for method, path, status, text in answers:
        assert status == 400, (method, path, text)
        assert json.loads(text)["error"]["code"] == "bad_frame"


async def test_idle_rest_connections_are_released(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Issue 8: after a response (HTTP/1.0, keep-alive) or with no request at all, the socket stayed open for good,
    one descriptor per request for anyone reaching the port. With a read timeout each one closes."""
    h = await start_server(nursery, tmp_path, http_read_timeout_s=0.5, request_timeout_s=0.2)

    async def closed_by_server(request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.http_port)
        got = b""
        with trio.fail_after(5):  # well past the 0.5 s read timeout, far below "never"
            if request:
                await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                got += chunk
        await stream.aclose()
        return got

    async with trio.open_nursery() as many:  # many idle sockets at once: all released
        results: list[bytes] = []

        async def one(request: bytes) -> None:
            results.append(await closed_by_server(request))

        for _ in range(20):
            many.start_soon(one, b"")
            many.start_soon(one, b"GET /healthz HTTP/1.0\r\n\r\n")
            many.start_soon(one, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sum(r.startswith(b"HTTP/1.1 200") for r in results) == 40 and results.count(b"") == 20
    h.running.stop()


async def test_an_answer_before_the_body_was_read_leaves_the_connection_usable(tmp_path: Path) -> None:
    """Found by schemathesis: a 401 (or 405, or another error) given before the request body was read left the
    keep-alive connection stuck, about 3 times in 4: the client's next request on it never got an answer. It
    shows with the server in its own process (in-process, the timing hides it)."""
    async with running_target("sessiond", tmp_path) as target:
        sid = (await target.create_sessions(1))[0]
        auth = {"Authorization": f"Bearer {target.token()}"}
        for _ in range(6):  # each time a new keep-alive connection, the sequence schemathesis sent on one
            assert await _error_then_next_request(str(target.http_url), sid, auth) == [200, 404, 401, 400, 405, 200]


async def _error_then_next_request(url: str, sid: str, auth: dict[str, str]) -> list[int]:
    json_type = {"Content-Type": "application/json"}
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            statuses = [
                (await http.options("/v1/sessions/st")).status_code,
                (await http.get("/v1/sessions/st", headers=auth)).status_code,
                (await http.patch(f"/v1/sessions/{sid}", content=b'{"ops": [{}]}', headers=json_type)).status_code,
                (await http.patch(f"/v1/sessions/{sid}", content=b"[null]", headers={**auth, **json_type})
                 ).status_code,
                (await http.put(f"/v1/sessions/{sid}/handoff", content=b'{"device":"d"}', headers=auth)).status_code,
                (await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "inc", "path": "/n"}]}, headers=auth)
                 ).status_code,
            ]
    return statuses


async def test_a_body_over_the_limit_is_refused_before_the_app_runs(server: Harness) -> None:
    async with server.rest(None) as http:  # no token: refused on size first, without buffering it all
        r = await http.post("/v1/sessions", content=b"x" * (4 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


async def test_first_frame_must_be_hello(server: Harness) -> None:
    async with raw_device(server, None, hello={}) as d:
        await d.send({"t": "op", "id": 1, "ops": [{"op": "del", "path": "/x"}]})
        assert (await d.recv_type("error"))["code"] == "bad_frame"
        assert await d.closed_code() == 1002


async def test_origin_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, allowed_origins=("https://app.example",))
    sid = await h.create_session()
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(h.ws_url, extra_headers=[("Origin", "https://evil.example")]):
            pass
    assert info.value.status_code == 403
    async with raw_device(h, sid, extra_headers=[("Origin", "https://app.example")]) as d:
        assert d.welcome is not None
    h.running.stop()


async def test_flood_is_rate_limited_and_others_unharmed(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, rate_limit="20/20")
    flooded, calm = await h.create_session(), await h.create_session()
    async with raw_device(h, flooded, "f") as f, raw_device(h, calm, "c1") as c1, raw_device(h, calm, "c2") as c2:
        for i in range(200):
            await f.send({"t": "op", "id": i + 1, "ops": [{"op": "inc", "path": "/n"}]})
        codes = []
        for _ in range(200):
            frame = await f.recv()
            codes.append(frame.get("code") if frame["t"] == "error" else frame["t"])
        assert codes.count("rate_limited") >= 150
        assert codes.count("ack") <= 40
        await c1.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/ok", "value": 1}]})
        assert (await c1.recv_type("ack"))["version"] == 1
        assert (await c2.recv_type("patch"))["version"] == 1
    h.running.stop()


async def test_silent_connection_is_closed(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, hello_timeout_s=0.5)
    async with open_websocket_url(h.ws_url) as ws:  # never says hello
        with trio.fail_after(5):
            from trio_websocket import ConnectionClosed

            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.get_message()
        assert info.value.reason.code == 4001
    h.running.stop()


async def test_expired_token_closes_connection(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, token=server.token(ttl_s=1)) as d:
        assert await d.closed_code(timeout=5) == 4001


async def test_token_refresh_in_band(server: Harness) -> None:
    sid = await server.create_session()
    first = server.token(ttl_s=2)
    async with raw_device(server, sid, token=first) as d:
        await d.send({"t": "auth", "token": server.token(ttl_s=3600)})
        authed = await d.recv_type("authed")
        assert authed["exp"] > time.time() + 3000
        await d.send({"t": "auth", "token": server.token("mallory")})
        assert (await d.recv_type("error"))["code"] == "forbidden"
        await past_expiry(first)
        await d.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/still", "value": "here"}]})
        assert (await d.recv_type("ack"))["version"] == 1


async def test_idle_connection_without_pongs_is_closed(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A peer that completed hello but never answers pings is cut after idle_timeout_s."""
    from wsproto.events import CloseConnection

    h = await start_server(nursery, tmp_path, ping_interval_s=0.2, idle_timeout_s=0.6)
    sid = await h.create_session()
    stream, ws = await wsproto_device(h, sid, "mute", h.token())
    with trio.fail_after(5):
        await trio.sleep(1.5)  # read nothing: no pongs go back
        closed = None
        while closed is None:
            data = await stream.receive_some()
            if not data:
                break
            ws.receive_data(data)  # wsproto answers nothing by itself: we never send its pongs
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    closed = event.code
    assert closed == 1001
    await stream.aclose()
    h.running.stop()


async def test_rest_refuses_nan_and_huge_numbers(server: Harness) -> None:
    sid = await server.create_session()
    async with server.rest() as http:
        bodies = (b'{"ops":[{"op":"set","path":"/x","value":NaN}]}', b'{"ops":[{"op":"inc","path":"/x","by":1e400}]}')
        for body in bodies:
            r = await http.patch(f"/v1/sessions/{sid}", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
        assert (await http.get(f"/v1/sessions/{sid}")).json()["version"] == 0


async def test_a_peer_that_never_reads_is_cut_and_cannot_write_after_expiry(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Review finding: a close used to wait behind a blocked write forever, and the reader kept going."""
    import orjson
    from wsproto.events import TextMessage

    h = await start_server(nursery, tmp_path, send_queue_frames=8, rate_limit="1000/1000")
    sid = await h.create_session()
    token = h.token(ttl_s=2)
    stream, ws = await wsproto_device(h, sid, "stuck", token, rcvbuf=4096)
    async with h.rest() as http:
        big = "x" * 60_000
        for i in range(60):  # far more than its socket buffers and its send queue hold: it never reads
            await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": f"/b{i % 3}", "value": big}]})
        await past_expiry(token)
        op = {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/evil", "value": True}]}
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await stream.send_all(ws.send(TextMessage(orjson.dumps(op).decode())))
        with trio.fail_after(10):
            while True:
                body = (await http.get(f"/v1/sessions/{sid}")).json()
                if not body["devices"]:
                    break
                await trio.sleep(0.1)
        assert "evil" not in body["state"]
    await stream.aclose()
    h.running.stop()


async def test_rest_authenticates_before_reading_the_body_and_refuses_deep_documents(server: Harness) -> None:
    async with server.rest(None) as http:
        r = await http.post("/v1/sessions", content=b"{garbage", headers={"content-type": "application/json"})
        assert r.status_code == 401
        spec = (await http.get("/openapi.json")).json()
        assert "requestBody" in spec["paths"]["/v1/sessions"]["post"]
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    sid = await server.create_session()
    async with server.rest() as http:
        r = await http.post("/v1/sessions", json={"state": {"d": deep}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame"
        path = "/" + "/".join("a" * 10 for _ in range(30))
        r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": path, "value": deep}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_op"
        assert (await http.get(f"/v1/sessions/{sid}")).status_code == 200  # still healthy


async def test_a_huge_frame_is_cut_with_1009_and_the_server_lives_on(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, "huge") as d:
        # Beyond twice the frame cap: the server cuts it from its header, maybe before the client has written it all
        # (then the client's send already sees the close; the loaded CI box did once).
        with contextlib.suppress(ConnectionClosed):
            await d.send("x" * 200_000)
        assert await d.closed_code() == 1009
    async with raw_device(server, sid, "next") as d:
        await d.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/ok", "value": 1}]})
        assert (await d.recv_type("ack"))["version"] == 1


# ---- quotas (issue 8) -----------------------------------------------------------------------------------------


async def test_rest_is_rate_limited_per_user(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, rest_rate_limit="0.5/5")
    async with h.rest("alice") as alice, h.rest("bob") as bob:
        codes = [(await alice.get("/v1/sessions")).status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        refused = await alice.get("/v1/sessions")
        assert refused.json()["error"]["code"] == "rate_limited" and "retry in" in refused.json()["error"]["message"]
        assert (await bob.get("/v1/sessions")).status_code == 200  # another user is not affected
    h.running.stop()


async def test_sessions_per_user_quota(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, max_sessions_per_user=2)
    async with h.rest("alice") as alice:
        ids = [(await alice.post("/v1/sessions", json={})).json()["id"] for _ in range(2)]
        third = await alice.post("/v1/sessions", json={})
        assert third.status_code == 403 and "quota" in third.json()["error"]["message"]
        assert (await alice.delete(f"/v1/sessions/{ids[0]}")).status_code == 204
        assert (await alice.post("/v1/sessions", json={})).status_code == 201  # an ended one no longer counts
    assert (await h.create_session("bob")) is not None
    h.running.stop()


async def test_devices_per_session_quota(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, max_devices_per_session=2)
    sid = await h.create_session()
    async with raw_device(h, sid, "a"), raw_device(h, sid, "b") as b:
        async with raw_device(h, sid, "c", expect_welcome=False) as c:
            error = await c.recv_type("error")
            assert error["code"] == "forbidden" and "devices" in error["message"]
            assert await c.closed_code() == 4003
        async with raw_device(h, sid, "b") as again:  # a known device reconnecting is not a new one
            assert again.welcome is not None
            assert await b.closed_code() == 4009
    h.running.stop()


async def test_connections_per_user_quota(tmp_path: Path, nursery: trio.Nursery) -> None:
    h = await start_server(nursery, tmp_path, max_connections_per_user=2)
    sid = await h.create_session()
    other = await h.create_session("bob")
    async with raw_device(h, sid, "a"), raw_device(h, sid, "b"):
        async with raw_device(h, sid, "c", expect_welcome=False) as c:
            error = await c.recv_type("error")
            assert error["code"] == "rate_limited" and "connections" in error["message"]
            assert await c.closed_code() == 1013
        async with raw_device(h, other, "x", user="bob") as x:  # another user is not affected
            assert x.welcome is not None
    async with raw_device(h, sid, "c") as c:  # the quota counts open connections only
        assert c.welcome is not None
    h.running.stop()
