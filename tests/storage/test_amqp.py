"""Events to the real RabbitMQ on 127.0.0.1:5672 (vhost "/"): a queue of our own bound to the exchange.

Other tests may publish to the shared exchange at the same time, so every event here carries this test's run id
and the consumer keeps only those.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pika
import pytest
import trio
from prometheus_client import REGISTRY

from storage.amqp import EXCHANGE, open_amqp_events
from storage.bridge import Bridge
from tests.support.proxy import TcpProxy

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
KEYS = ["session.created", "session.ended", "device.joined", "device.left", "session.handoff", "actor.crashed"]

pytestmark = pytest.mark.services


def _declare(queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        ch.exchange_declare(EXCHANGE, "topic", durable=True)
        ch.queue_declare(queue, arguments={"x-expires": 120_000})  # vanishes even if the test dies
        for pattern in ("session.*", "device.*", "actor.*"):
            ch.queue_bind(queue, EXCHANGE, routing_key=pattern)
    finally:
        conn.close()


def _collect(queue: str, run_id: str, count: int, timeout: float) -> list[tuple[str, dict[str, Any], int | None]]:
    """(routing key, body, delivery_mode) of this run's messages, until `count` distinct ones or timeout."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    got: list[tuple[str, dict[str, Any], int | None]] = []
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        ch = conn.channel()
        while len(seen) < count and time.monotonic() < deadline:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                conn.sleep(0.02)
                continue
            data = json.loads(body)
            if data.get("run") == run_id:
                got.append((method.routing_key, data, props.delivery_mode))
                seen.add(data["n"])
        return got
    finally:
        conn.close()


def _delete(queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = f"sessiond-test-{uuid.uuid4().hex[:10]}"
    await trio.to_thread.run_sync(_declare, name)
    try:
        yield name
    finally:
        await trio.to_thread.run_sync(_delete, name)


def event(run_id: str, n: int, key: str) -> dict[str, Any]:
    return {"type": key, "session": f"s{n}", "owner": "alice", "at": 1.5, "run": run_id, "n": n}


async def _wait_for(predicate: Any, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_events_arrive_with_routing_keys_and_persistent(bridge: Bridge, queue: str) -> None:
    run_id = uuid.uuid4().hex
    async with open_amqp_events(bridge, AMQP_URL) as sink:
        for n, key in enumerate(KEYS):
            sink.publish(key, event(run_id, n, key))
        await _wait_for(lambda: sink.published == len(KEYS), 10)
        assert sink.buffered == 0 and sink.dropped == 0
    got = await trio.to_thread.run_sync(_collect, queue, run_id, len(KEYS), 10.0)
    assert [(k, body["n"]) for k, body, _ in got] == [(k, n) for n, k in enumerate(KEYS)]
    assert all(mode == 2 for _, _, mode in got)
    assert got[0][1] == event(run_id, 0, KEYS[0])


async def test_many_events_in_bursts(bridge: Bridge, queue: str) -> None:
    run_id = uuid.uuid4().hex
    async with open_amqp_events(bridge, AMQP_URL) as sink:
        for n in range(3000):
            sink.publish("device.joined", event(run_id, n, "device.joined"))
            if n % 500 == 0:
                await trio.lowlevel.checkpoint()
        await _wait_for(lambda: sink.published == 3000, 20)
    got = await trio.to_thread.run_sync(_collect, queue, run_id, 3000, 20.0)
    assert [b["n"] for _, b, _ in got] == list(range(3000))


def _failed_connects() -> float:
    """Connection attempts the sink reported failed (its backoff loop counts each one)."""
    return REGISTRY.get_sample_value("sessiond_storage_errors_total", {"backend": "amqp", "kind": "unavailable"}) or 0.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_broker_buffers_and_counts_drops(bridge: Bridge) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F"
    async with open_amqp_events(bridge, url, buffer_size=5, flush_timeout=0.2) as sink:
        for n in range(8):
            sink.publish("session.created", {"n": n})  # never raises, never blocks
        assert sink.dropped == 3
        assert sink.buffered == 5
        failed = _failed_connects()
        await _wait_for(lambda: _failed_connects() >= failed + 2, 10)  # a few failed connection attempts
        assert sink.published == 0 and not sink.connected and sink.buffered == 5
        sink.publish("session.created", {"bad": object()})  # unencodable: dropped, not raised
        assert sink.dropped == 4


async def test_outage_buffers_then_delivers_after_reconnect(bridge: Bridge, queue: str) -> None:
    run_id = uuid.uuid4().hex
    proxy = TcpProxy(5672)
    async with trio.open_nursery() as outer:
        await proxy.start(outer)
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        async with open_amqp_events(bridge, url) as sink:
            sink.publish("session.created", event(run_id, 0, "session.created"))
            await _wait_for(lambda: sink.published == 1, 10)

            proxy.cut()  # RabbitMQ "goes away"
            await _wait_for(lambda: not sink.connected, 10)
            for n in range(1, 6):
                sink.publish("device.joined", event(run_id, n, "device.joined"))
            failed = _failed_connects()
            await _wait_for(lambda: _failed_connects() >= failed + 1, 10)  # it tried the dead broker again
            assert sink.published == 1 and sink.buffered == 5

            await proxy.start(outer)  # it comes back on the same address
            await _wait_for(lambda: sink.published == 6, 15)
            assert sink.dropped == 0
            proxy.cut()
    got = await trio.to_thread.run_sync(_collect, queue, run_id, 6, 10.0)
    assert sorted({b["n"] for _, b, _ in got}) == list(range(6))


async def test_production_storage_wires_amqp_events(queue: str, tmp_path: Path) -> None:
    from api.settings import Settings
    from storage.amqp import AmqpEventSink
    from storage.production import open_production_storage

    run_id = uuid.uuid4().hex
    async with open_production_storage(Settings(amqp_url=AMQP_URL, data_dir=tmp_path)) as storage:
        assert isinstance(storage.events, AmqpEventSink)
        storage.events.publish("session.ended", event(run_id, 0, "session.ended"))
        sink = storage.events
        await _wait_for(lambda: sink.published == 1, 10)
    got = await trio.to_thread.run_sync(_collect, queue, run_id, 1, 10.0)
    assert [k for k, _, _ in got] == ["session.ended"]
