"""Acked means kept (DESIGN §5.2) with the real Redis, PostgreSQL and RabbitMQ: crashes, SIGKILL, outages."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors.messages import Crash
from tests.integration.harness import SECRET, raw_device, start_server
from tests.integration.test_lifecycle import _free_port
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.services


def _prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}{secrets.token_hex(3)}:"


async def _stream_ops(dev: Any, count: int) -> list[int]:
    """Send `count` ops (each sets its own key), return the ids that were acked."""
    for i in range(count):
        await dev.send({"t": "op", "id": i + 1, "ops": [{"op": "set", "path": f"/k{i + 1}", "value": i + 1}]})
    acked = []
    while len(acked) < count:
        frame = await dev.recv()
        if frame["t"] == "ack":
            acked.append(frame["id"])
    return acked


async def test_actor_crash_mid_stream_keeps_every_acked_op(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    h = await start_server(nursery, tmp_path, redis_url=redis_url, redis_prefix=_prefix(redis_prefix))
    sid = await h.create_session()
    async with raw_device(h, sid, "a") as a:
        for i in range(50):
            await a.send({"t": "op", "id": i + 1, "ops": [{"op": "set", "path": f"/k{i + 1}", "value": i + 1}]})
        actor = h.running.registry.lookup(sid)
        assert actor is not None
        actor.tell(Crash())  # lands somewhere in the middle of the stream
        acked: set[int] = set()
        with trio.fail_after(10):
            while True:
                frame = await a.recv()
                if frame["t"] == "ack":
                    acked.add(frame["id"])
                if frame["t"] == "welcome":
                    welcome = frame
                    break
        # the fresh welcome after the restart holds every op acked before it
        assert all(welcome["state"].get(f"k{i}") == i for i in acked)
    async with h.rest() as http:
        state = (await http.get(f"/v1/sessions/{sid}")).json()["state"]
    assert all(state.get(f"k{i}") == i for i in acked)
    h.running.stop()


class _ServerProcess:
    def __init__(self, data_dir: Path, env: dict[str, str], capture: bool = False) -> None:
        self.http, self.ws = _free_port(), _free_port()
        full = {
            **os.environ,
            "SESSIOND_DATA_DIR": str(data_dir),
            "SESSIOND_HTTP_PORT": str(self.http),
            "SESSIOND_WS_PORT": str(self.ws),
            "SESSIOND_JWT_SECRET": SECRET,
            "SESSIOND_LOG_FORMAT": "json",
            "SESSIOND_RATE_LIMIT": "100000/100000",
            "SESSIOND_REST_RATE_LIMIT": "100000/100000",
            **env,
        }
        self._log = data_dir / f"server-{self.http}.log" if capture else None
        out = self._log.open("wb") if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve"], env=full, stdout=out,
                                     stderr=subprocess.STDOUT)
        self.output = (lambda: self._log.read_bytes()) if self._log is not None else None

    async def ready(self) -> None:
        with trio.fail_after(30):
            while True:
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"http://127.0.0.1:{self.http}/readyz")).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def _send_incs_collect_acks(ws: Any, ids: range, on_ack: Any = None) -> dict[int, int]:
    """Send an `inc` for every id, then read acks (id -> version) until all came or the connection ends."""
    for i in ids:
        await ws.send_message(orjson.dumps({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]}).decode())
    acked: dict[int, int] = {}
    with trio.move_on_after(15):
        try:
            while len(acked) < len(ids):
                frames = orjson.loads(await ws.get_message())
                for f in frames if isinstance(frames, list) else [frames]:
                    if f["t"] == "ack":
                        acked[f["id"]] = f["version"]
                        if on_ack is not None:
                            on_ack(len(acked))
        except ConnectionClosed:
            pass
    return acked


async def _sigkill_roundtrip(tmp_path: Path, env: dict[str, str]) -> None:
    """300 `inc`s (not idempotent), SIGKILL mid-stream after 150 acks, restart, retransmit all 300 with their ids
    (what a client does): the counter is exactly 300 (nothing acked lost, nothing applied twice)."""
    import jwt

    token = jwt.encode({"sub": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
    auth = {"Authorization": f"Bearer {token}"}
    hello = orjson.dumps({"t": "hello", "token": token, "session": "", "device": "d"})
    first = _ServerProcess(tmp_path, env)
    try:
        await first.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.http}", headers=auth) as http:
            sid = (await http.post("/v1/sessions", json={"state": {"n": 0}})).json()["id"]
        hello = orjson.dumps({"t": "hello", "token": token, "session": sid, "device": "d"})
        async with open_websocket_url(f"ws://127.0.0.1:{first.ws}/v1/ws") as ws:
            await ws.send_message(hello.decode())
            await ws.get_message()

            def kill_at_150(count: int) -> None:
                if count == 150:
                    first.proc.send_signal(signal.SIGKILL)  # mid-stream, no goodbye

            before = await _send_incs_collect_acks(ws, range(1, 301), kill_at_150)
        assert len(before) >= 150
    finally:
        first.stop()
    second = _ServerProcess(tmp_path, env)
    try:
        await second.ready()
        async with open_websocket_url(f"ws://127.0.0.1:{second.ws}/v1/ws") as ws:
            await ws.send_message(hello.decode())
            await ws.get_message()
            after = await _send_incs_collect_acks(ws, range(1, 301))
        assert len(after) == 300, f"{300 - len(after)} retransmits unanswered"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{second.http}", headers=auth) as http:
            body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert body["state"]["n"] == 300, f"counter {body['state']['n']}: acked changes lost or applied twice"
        assert body["version"] == 300
        # The ops applied only now each got a version of their own (older ones are answered, not applied again).
        fresh = [after[i] for i in range(1, 301) if i > max(before)]
        assert len(set(fresh)) == len(fresh) and all(v <= 300 for v in after.values())
    finally:
        second.stop()


async def test_sigkill_keeps_acked_ops_with_redis_journal(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    env = {"SESSIOND_REDIS_URL": redis_url, "SESSIOND_REDIS_PREFIX": _prefix(redis_prefix)}
    await _sigkill_roundtrip(tmp_path, env)


async def test_sigkill_keeps_acked_ops_with_postgres_durability(tmp_path: Path, pg_url: str) -> None:
    await _sigkill_roundtrip(tmp_path, {"SESSIOND_DATABASE_URL": pg_url, "SESSIOND_DURABILITY": "postgres"})


async def test_postgres_durability_keeps_creation_state_and_claim_when_redis_is_lost(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Issue 8's reproduction: with durability=postgres and Redis configured, the state given at creation and a
    claim were only in Redis; after SIGKILL and an empty Redis the session came back without them. Everything a
    201 or an ack confirms must be in PostgreSQL."""
    import jwt
    import redis

    prefix = _prefix(redis_prefix)
    env = {"SESSIOND_DATABASE_URL": pg_url, "SESSIOND_REDIS_URL": redis_url, "SESSIOND_REDIS_PREFIX": prefix,
           "SESSIOND_DURABILITY": "postgres"}
    token = jwt.encode({"sub": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
    auth = {"Authorization": f"Bearer {token}"}
    first = _ServerProcess(tmp_path, env)
    try:
        await first.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.http}", headers=auth) as http:
            sid = (await http.post("/v1/sessions", json={"state": {"a": 1}})).json()["id"]
        async with open_websocket_url(f"ws://127.0.0.1:{first.ws}/v1/ws") as ws:
            await ws.send_message(orjson.dumps({"t": "hello", "token": token, "session": sid, "device": "d"}).decode())
            claim = {"t": "claim", "id": 1}
            op = {"t": "op", "id": 2, "ops": [{"op": "set", "path": "/b", "value": 2}]}
            for frame in (claim, op):
                await ws.send_message(orjson.dumps(frame).decode())
            acked = set()
            with trio.fail_after(10):
                while acked != {1, 2}:
                    data = orjson.loads(await ws.get_message())
                    acked |= {f["id"] for f in (data if isinstance(data, list) else [data]) if f["t"] == "ack"}
        first.proc.send_signal(signal.SIGKILL)
    finally:
        first.stop()
    client = redis.Redis.from_url(redis_url)
    try:  # Redis comes back empty (only this test's keys: other tests share the server)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    second = _ServerProcess(tmp_path, env)
    try:
        await second.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{second.http}", headers=auth) as http:
            body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert (body["state"], body["version"], body["active"]) == ({"a": 1, "b": 2}, 1, "d")
    finally:
        second.stop()


async def test_redis_outage_unavailable_then_recovers(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start(nursery)
    h = await start_server(
        nursery, tmp_path, redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_prefix=_prefix(redis_prefix)
    )
    sid = await h.create_session()
    async with raw_device(h, sid, "a") as a:
        await a.send({"t": "op", "id": 1, "ops": [{"op": "set", "path": "/before", "value": 1}]})
        assert (await a.recv_type("ack"))["version"] == 1
        proxy.cut()
        await a.send({"t": "op", "id": 2, "ops": [{"op": "set", "path": "/during", "value": 2}]})
        err = await a.recv_type("error", timeout=20)
        assert err["code"] == "unavailable" and err["id"] == 2
        async with h.rest(None) as http:
            assert (await http.get("/readyz")).status_code == 503
        await proxy.start(nursery)
        with trio.fail_after(30):
            while True:  # the client retries, as the SDK does; service comes back without a restart
                await a.send({"t": "op", "id": 2, "ops": [{"op": "set", "path": "/during", "value": 2}]})
                frame = await a.recv()
                while frame["t"] not in ("ack", "error"):
                    frame = await a.recv()
                if frame["t"] == "ack":
                    break
                await trio.sleep(0.2)
        async with h.rest(None) as http:
            assert (await http.get("/readyz")).status_code == 200
    async with h.rest() as http:
        body = (await http.get(f"/v1/sessions/{sid}")).json()
    assert body["state"] == {"before": 1, "during": 2}
    h.running.stop()


async def test_postgres_outage_serving_goes_on_from_redis(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str, redis_prefix: str, pg_url: str
) -> None:
    pg_port = int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    proxy = TcpProxy(pg_port)
    await proxy.start(nursery)
    db_url = pg_url.replace(f":{pg_port}/", f":{proxy.port}/")
    h = await start_server(
        nursery, tmp_path, redis_url=redis_url, redis_prefix=_prefix(redis_prefix), database_url=db_url,
        checkpoint_every_s=0.2,
    )
    sid = await h.create_session()
    from prometheus_client import REGISTRY

    def failures() -> float:
        return REGISTRY.get_sample_value("sessiond_checkpoint_failures_total") or 0.0

    before = failures()
    async with raw_device(h, sid, "a") as a:
        proxy.cut()
        for i in range(1, 21):  # acked from the Redis journal while PostgreSQL is away
            await a.send({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]})
            assert (await a.recv_type("ack", timeout=10))["version"] == i
        with trio.fail_after(10):  # a periodic checkpoint fails (and is retried later); nothing crashes
            while failures() == before:
                await trio.sleep(0.05)
        await proxy.start(nursery)
        await a.send({"t": "pause", "id": 100})  # pause writes the durable checkpoint
        assert (await a.recv_type("ack", timeout=20))["id"] == 100
    import asyncpg

    async def durable_version() -> int:
        conn = await asyncpg.connect(pg_url)
        try:
            return int(await conn.fetchval("SELECT version FROM sessions WHERE id = $1", sid))
        finally:
            await conn.close()

    import asyncio

    assert await trio.to_thread.run_sync(lambda: asyncio.run(durable_version())) == 20
    h.running.stop()


def _drain_queue(amqp_url: str, queue: str, want: int, timeout: float) -> list[tuple[str, dict[str, Any], int]]:
    import time

    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        got: list[tuple[str, dict[str, Any], int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                conn.sleep(0.05)
                continue
            got.append((method.routing_key, orjson.loads(body), props.delivery_mode))
        return got
    finally:
        conn.close()


def _bind_queue(amqp_url: str) -> str:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.exchange_declare("sessiond.events", exchange_type="topic", durable=True)
        queue = ch.queue_declare("", exclusive=False, auto_delete=False).method.queue
        ch.queue_bind(queue, "sessiond.events", routing_key="#")
        return str(queue)
    finally:
        conn.close()


async def test_events_reach_rabbitmq_and_survive_its_outage(
    nursery: trio.Nursery, tmp_path: Path, amqp_url: str
) -> None:
    queue = await trio.to_thread.run_sync(_bind_queue, amqp_url)
    proxy = TcpProxy(5672)
    await proxy.start(nursery)
    h = await start_server(nursery, tmp_path, amqp_url=amqp_url.replace(":5672/", f":{proxy.port}/"))
    sid = await h.create_session()
    async with raw_device(h, sid, "a") as a:
        await a.send({"t": "claim", "id": 1})
        await a.recv_type("ack")
    got = await trio.to_thread.run_sync(_drain_queue, amqp_url, queue, 4, 10)
    keys = [k for k, _, _ in got]
    assert keys == ["session.created", "device.joined", "session.handoff", "device.left"], keys
    body = got[2][1]
    assert body["type"] == "session.handoff" and body["session"] == sid and body["owner"] == "alice"
    assert body["to"] == "a" and "at" in body
    assert all(mode == 2 for _, _, mode in got)  # persistent
    proxy.cut()
    sink: Any = h.running.storage.events
    async with h.rest() as http:
        assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 204  # session.ended, buffered
    with trio.fail_after(10):  # RabbitMQ is away and the event waits in the buffer
        while sink.connected or sink.buffered < 1:
            await trio.sleep(0.02)
    await proxy.start(nursery)
    got = await trio.to_thread.run_sync(_drain_queue, amqp_url, queue, 1, 20)
    assert [k for k, _, _ in got] == ["session.ended"]
    h.running.stop()


@pytest.fixture
def own_pg_url(pg_url: str) -> Iterator[str]:
    """A database of this test's own (the run's shared one has seen every durability mode)."""
    from tests.conftest import _pg_run

    name = f"{pg_url.rsplit('/', 1)[1]}_{secrets.token_hex(3)}"
    _pg_run(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_url.rsplit('/', 1)[0]}/{name}"
    finally:
        _pg_run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_durability_switch_that_would_hide_acked_changes_is_refused(
    tmp_path: Path, own_pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Issue 8: restarting postgres -> redis ignored the PostgreSQL journal, and acked ops vanished silently. A
    start in another mode now refuses (exit 3, saying why) while the old journal holds changes; the old mode finds
    them all, and after its clean stop (SIGTERM checkpoints and trims) the switch goes through."""
    import jwt

    token = jwt.encode({"sub": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
    auth = {"Authorization": f"Bearer {token}"}
    base = {"SESSIOND_DATABASE_URL": own_pg_url, "SESSIOND_REDIS_URL": redis_url,
            "SESSIOND_REDIS_PREFIX": _prefix(redis_prefix), "SESSIOND_ALLOW_DURABILITY_SWITCH": "0"}
    postgres, redis_mode = {**base, "SESSIOND_DURABILITY": "postgres"}, {**base, "SESSIOND_DURABILITY": "redis"}
    first = _ServerProcess(tmp_path, postgres)
    try:
        await first.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.http}", headers=auth) as http:
            sid = (await http.post("/v1/sessions", json={"state": {"n": 0}})).json()["id"]
            for _ in range(3):
                assert (await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "inc", "path": "/n"}]})).is_success
        first.proc.send_signal(signal.SIGKILL)  # the changes sit in the PostgreSQL journal only
    finally:
        first.stop()
    refused = _ServerProcess(tmp_path, redis_mode, capture=True)
    assert await trio.to_thread.run_sync(refused.proc.wait, 30) == 3
    assert refused.output is not None and b"SESSIOND_DURABILITY=postgres" in refused.output()
    again = _ServerProcess(tmp_path, postgres)
    try:
        await again.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{again.http}", headers=auth) as http:
            # The killed pod's lease and membership run out first (503 meanwhile, like any failover).
            with trio.fail_after(20):
                while (r := await http.get(f"/v1/sessions/{sid}")).status_code == 503:
                    await trio.sleep(0.1)
            assert r.json()["state"] == {"n": 3}
        again.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(again.proc.wait, 30) == 0
    finally:
        again.stop()
    switched = _ServerProcess(tmp_path, redis_mode)
    try:
        await switched.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{switched.http}", headers=auth) as http:
            assert (await http.get(f"/v1/sessions/{sid}")).json()["state"] == {"n": 3}
    finally:
        switched.stop()


async def _record_until(h: Any, sid: str, status: str, active: str | None, timeout: float) -> None:
    """Poll the session record in the durable store (the SQLite file) until it shows `status` and `active`."""
    with trio.fail_after(timeout):
        while True:
            record = await h.running.storage.sessions.get_session(sid)
            if record is not None and (record.status, record.active) == (status, active):
                return
            await trio.sleep(0.02)


async def test_embedded_handoffs_are_acked_from_memory_and_reach_the_sqlite_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The embedded default (no service): a pause and a claim are acked once their snapshot is in memory beside the
    in-process journal; the pause reaches the SQLite file at once, the claim within a checkpoint period, and the
    memory copy is then let go."""
    h = await start_server(nursery, tmp_path, checkpoint_every_s=0.3)
    snapshots = h.running.storage.snapshots
    assert getattr(snapshots, "volatile", False)  # the real assembly has the volatile layer
    sid = await h.create_session()
    async with raw_device(h, sid, "a") as a, raw_device(h, sid, "b") as b:
        await a.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}]})
        assert (await a.recv_type("ack"))["version"] == 1
        await a.send({"t": "pause", "id": 2})
        assert (await a.recv_type("ack"))["id"] == 2
        await _record_until(h, sid, "paused", None, timeout=5)
        await b.send({"t": "claim", "id": 1})
        assert (await b.recv_type("ack"))["id"] == 1
        await _record_until(h, sid, "active", "b", timeout=5)
        with trio.fail_after(5):
            while snapshots.holds_volatile(sid):  # type: ignore[attr-defined]
                await trio.sleep(0.02)
    h.running.stop()


async def test_an_embedded_claim_survives_an_actor_crash_before_it_is_durable(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    h = await start_server(nursery, tmp_path, checkpoint_every_s=3600)
    sid = await h.create_session()
    async with raw_device(h, sid, "a") as a, raw_device(h, sid, "b") as b:
        await b.send({"t": "claim", "id": 1})
        assert (await b.recv_type("ack"))["id"] == 1
        record = await h.running.storage.sessions.get_session(sid)
        assert record is not None and record.active != "b"  # not in the SQLite file yet
        actor = h.running.registry.lookup(sid)
        assert actor is not None
        actor.tell(Crash())
        await a.recv_type("welcome", timeout=10)  # the restart's resync
        await b.send({"t": "claim", "id": 1})  # a retransmission: answered, not applied again
        assert (await b.recv_type("ack"))["id"] == 1
    async with h.rest() as http:
        r = await http.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["active"] == "b"
    h.running.stop()
