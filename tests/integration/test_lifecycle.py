"""Process-level behaviour: SIGTERM checkpoints and closes with 1001; state survives a restart; crash isolation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from actors.messages import Crash
from tests.integration.harness import SECRET, Harness, raw_device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Process:
    def __init__(self, data_dir: Path) -> None:
        self.http, self.ws = _free_port(), _free_port()
        env = {
            **os.environ,
            "SESSIOND_DATA_DIR": str(data_dir),
            "SESSIOND_HTTP_PORT": str(self.http),
            "SESSIOND_WS_PORT": str(self.ws),
            "SESSIOND_JWT_SECRET": SECRET,
            "SESSIOND_LOG_FORMAT": "json",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    async def ready(self) -> None:
        with trio.fail_after(20):
            while True:
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"http://127.0.0.1:{self.http}/healthz")).status_code == 200:
                            return
                except httpx.TransportError:
                    await trio.sleep(0.05)


async def test_sigterm_checkpoints_closes_1001_and_state_survives_restart(tmp_path: Path) -> None:
    import jwt

    token = jwt.encode({"sub": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
    first = _Process(tmp_path)
    try:
        await first.ready()
        base = f"http://127.0.0.1:{first.http}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            sid = (await http.post("/v1/sessions", json={"state": {"n": 0}})).json()["id"]
        import orjson
        from trio_websocket import ConnectionClosed, open_websocket_url

        async with open_websocket_url(f"ws://127.0.0.1:{first.ws}/v1/ws") as ws:
            await ws.send_message(orjson.dumps({"t": "hello", "token": token, "session": sid, "device": "d"}).decode())
            await ws.get_message()
            for i in range(10):
                op = {"t": "op", "id": i + 1, "ops": [{"op": "inc", "path": "/n"}]}
                await ws.send_message(orjson.dumps(op).decode())
            acked = 0
            while acked < 10:
                frames = orjson.loads(await ws.get_message())
                acked += sum(1 for f in (frames if isinstance(frames, list) else [frames]) if f["t"] == "ack")
            first.proc.send_signal(signal.SIGTERM)
            code = None
            with trio.fail_after(10):
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    code = exc.reason.code
            assert code == 1001
        assert await trio.to_thread.run_sync(first.proc.wait, 10) == 0
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    second = _Process(tmp_path)
    try:
        await second.ready()
        base = f"http://127.0.0.1:{second.http}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert body["state"] == {"n": 10} and body["version"] == 10
    finally:
        second.proc.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(second.proc.wait, 10)


async def test_actor_crash_restarts_from_checkpoint_and_spares_others(server: Harness) -> None:
    crashy, calm = await server.create_session(), await server.create_session()
    async with raw_device(server, crashy, "a") as a, raw_device(server, calm, "c") as c:
        for i in range(3):
            await a.send({"t": "op", "id": i + 1, "ops": [{"op": "inc", "path": "/n"}]})
            await a.recv_type("ack")
        actor = server.running.registry.lookup(crashy)
        assert actor is not None
        actor.tell(Crash())
        welcome = await a.recv_type("welcome")  # told to resync: a fresh full welcome
        assert welcome["mode"] == "full" and welcome["state"] == {"n": 3} and welcome["version"] == 3
        await a.send({"t": "op", "id": 4, "ops": [{"op": "inc", "path": "/n"}]})
        assert (await a.recv_type("ack"))["version"] == 4
        await c.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/fine", "value": True}]})
        assert (await c.recv_type("ack"))["version"] == 1


async def test_health_metrics_openapi_admin(server: Harness) -> None:
    await server.create_session()
    async with server.rest(None) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "sessiond_changes_total" in metrics and "session=" not in metrics
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/sessions" in spec["paths"] and "/v1/sessions/{session_id}" in spec["paths"]
    async with server.rest("alice") as http:
        assert (await http.get("/v1/admin/actors")).status_code == 403
    async with httpx.AsyncClient(
        base_url=server.http_url, headers={"Authorization": f"Bearer {server.token('root', roles=('admin',))}"}
    ) as http:
        body = (await http.get("/v1/admin/actors")).json()
        assert body["count"] >= 0 and isinstance(body["actors"], list)


async def test_list_sessions_paginates_newest_first(server: Harness) -> None:
    ids = [await server.create_session() for _ in range(5)]
    async with server.rest() as http:
        page1 = (await http.get("/v1/sessions", params={"limit": 3})).json()
        assert [s["id"] for s in page1["sessions"]] == ids[::-1][:3]
        page2 = (await http.get("/v1/sessions", params={"limit": 3, "cursor": page1["next"]})).json()
        assert [s["id"] for s in page2["sessions"]] == ids[::-1][3:] and page2["next"] is None
        assert (await http.get("/v1/sessions", params={"cursor": "garbage!"})).status_code == 400
        assert (await http.get("/v1/sessions", params={"limit": 0})).status_code == 400
        r = await http.post("/v1/sessions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame"


async def test_memory_budget_passivates_least_recently_used(nursery: trio.Nursery, tmp_path: Path) -> None:
    from tests.integration.harness import start_server

    h = await start_server(nursery, tmp_path, memory_budget_bytes=3000)
    ids = [await h.create_session(state={"blob": "x" * 900}) for _ in range(6)]
    async with h.rest() as http:
        for sid in ids:
            assert (await http.get(f"/v1/sessions/{sid}")).status_code == 200  # activates each
        async with raw_device(h, ids[0], "keeper"):  # a connected session is never evicted
            with trio.fail_after(5):
                while len(h.running.registry.live()) > 3:
                    await trio.sleep(0.05)
            live = {a.id for a in h.running.registry.live()}
            assert ids[0] in live and ids[-1] in live and ids[1] not in live
        body = (await http.get(f"/v1/sessions/{ids[1]}")).json()  # re-activated from its checkpoint
        assert body["state"] == {"blob": "x" * 900}
    h.running.stop()
