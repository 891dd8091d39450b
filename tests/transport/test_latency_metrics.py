"""The latency histograms of the send path: `sessiond_ack_latency_seconds{op}` and
`sessiond_delivery_latency_seconds` (lock-free HotHistograms exported at scrape time)."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from trio_websocket import open_websocket_url

from actors.messages import Outgoing
from actors.placement import owner
from runtime.hothistogram import HotHistogram
from tests.integration.harness import SECRET, RawDevice, raw_device, start_server
from tests.support.pods import Pods
from transport import metrics
from transport.connection import MAX_AWAITED_ACKS, Connection


def buckets(text: str, family: str) -> dict[tuple[str, str], float]:
    """(label value or '', le) -> cumulative count, plus ('...', '_count') / ('...', '_sum') for one family."""
    found: dict[tuple[str, str], float] = {}
    for metric in text_string_to_metric_families(text):
        if metric.name != family:
            continue
        for sample in metric.samples:
            label = sample.labels.get("op", "")
            if sample.name.endswith("_bucket"):
                found[(label, sample.labels["le"])] = sample.value
            else:
                found[(label, sample.name[len(family):])] = sample.value
    return found


def test_hot_histogram_counts_like_a_prometheus_histogram() -> None:
    histogram = HotHistogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 0.1, 7.0):  # a value on a bound is counted in it (le)
        histogram.observe(value)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 3), ("0.1", 5), ("+Inf", 6)]
    assert histogram.sum == 7.1535

    class One(Collector):
        def collect(self) -> Any:
            family = HistogramMetricFamily("x_seconds", "x")
            family.add_metric([], histogram.cumulative(), histogram.sum)
            yield family

    registry = CollectorRegistry()
    registry.register(One())
    found = buckets(generate_latest(registry).decode(), "x_seconds")
    assert found[("", "0.01")] == 3 and found[("", "+Inf")] == 6 and found[("", "_count")] == 6


def test_realtime_buckets() -> None:
    assert metrics.LATENCY_BUCKETS[0] == 0.0005 and metrics.LATENCY_BUCKETS[-1] == 5.0
    assert list(metrics.LATENCY_BUCKETS) == sorted(metrics.LATENCY_BUCKETS)


class _Socket:
    """Stands in for the WebSocket under the writer: records each message written."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def send_message(self, data: str | bytes) -> None:
        self.sent.append(data)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        pass


async def test_one_delivery_observation_per_write_the_oldest_patch() -> None:
    conn = Connection(_Socket(), "d1", "sessiond.v1.json", 100)  # type: ignore[arg-type]
    before = list(metrics.DELIVERY_LATENCY.counts)
    now = time.time()
    conn.deliver(Outgoing({"t": "presence", "devices": [], "active": None}, now - 9))  # not a patch: not timed
    for age in (1.5, 1.2, 0.0001):  # queued before the writer runs: one write
        conn.deliver(Outgoing({"t": "patch", "version": 1, "device": "d2", "ops": []}, now - age))
    conn.deliver(Outgoing({"t": "patch", "version": 2, "device": "d2", "ops": []}))  # born unknown: not timed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        assert len(conn.ws.sent) == 1  # type: ignore[attr-defined]
        conn.close(1000, "done")
    after = metrics.DELIVERY_LATENCY.counts
    grew = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b != a]
    assert grew == [metrics.LATENCY_BUCKETS.index(2.5)]  # 1.5 s: the oldest patch of the write, once
    assert sum(after) - sum(before) == 1


async def test_ack_latency_pairs_requests_and_acks() -> None:
    conn = Connection(_Socket(), "d1", "sessiond.v1.json", 100)  # type: ignore[arg-type]
    pause = metrics.ACK_LATENCY[metrics.ACK_KINDS.index("pause")]
    before = sum(pause.counts)
    now = time.time()
    conn.await_ack(7, metrics.ACK_KINDS.index("pause"), now - 0.2)
    conn.await_ack(8, metrics.ACK_KINDS.index("pause"), now)
    conn.deliver(Outgoing({"t": "error", "id": 8, "code": "conflict", "message": "x"}))  # answered, not an ack
    conn.deliver(Outgoing({"t": "ack", "id": 7, "version": 3}))
    conn.deliver(Outgoing({"t": "ack", "id": 7, "version": 3}))  # a second ack of one id is not timed again
    assert sum(pause.counts) - before == 1
    assert not conn._awaited
    for op_id in range(MAX_AWAITED_ACKS + 10):  # requests never answered are forgotten, oldest first
        conn.await_ack(op_id, 0, now)
    assert len(conn._awaited) == MAX_AWAITED_ACKS and min(conn._awaited) == 10


async def test_a_real_server_times_acks_by_request_type_and_deliveries(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_server(nursery, tmp_path / "data")
    sid = await h.create_session()

    async def scrape() -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
        async with h.rest(None) as http:
            text = (await http.get("/metrics")).text
        return buckets(text, "sessiond_ack_latency_seconds"), buckets(text, "sessiond_delivery_latency_seconds")

    acks0, delivery0 = await scrape()
    async with raw_device(h, sid, "a") as a, raw_device(h, sid, "b") as b:
        for op_id in range(1, 6):
            await a.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})
            await a.recv_type("ack")
            assert (await b.recv_type("patch"))["version"] == op_id
        await a.send({"t": "claim", "id": 6})
        await a.recv_type("ack")
        await a.send({"t": "pause", "id": 7})
        await a.recv_type("ack")
        await a.send({"t": "op", "id": 8, "ops": [{"op": "set", "path": "/s", "value": "text"},
                                                  {"op": "inc", "path": "/s"}]})  # refused (invalid_op): not timed
        assert (await a.recv_type("error"))["id"] == 8
    acks, delivery = await scrape()
    for op, count in (("op", 5), ("claim", 1), ("pause", 1)):
        assert acks[(op, "_count")] - acks0[(op, "_count")] == count, (op, acks)
        assert acks[(op, "+Inf")] == acks[(op, "_count")]
        assert 0 < acks[(op, "_sum")] - acks0[(op, "_sum")] < count * 5
    # b got 5 patches, each in its own write here (one op at a time); a got none (its own ops come back as acks)
    assert delivery[("", "_count")] - delivery0[("", "_count")] == 5
    assert 0 < delivery[("", "_sum")] - delivery0[("", "_sum")] < 5 * 5
    h.running.stop()



def _tokens() -> dict[str, str]:
    """Tokens for the pods of tests.support.pods (signed with tests.integration.harness.SECRET)."""
    exp = int(time.time()) + 3600
    return {"alice": jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256"),
            "admin": jwt.encode({"sub": "ops", "exp": exp, "roles": ["admin"]}, SECRET, algorithm="HS256")}


async def test_two_pods_time_relayed_acks_and_deliveries(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_url: str
) -> None:
    """A device on a pod that does not own its session: its acks (relay round trip) and the patches relayed to it
    are timed on that pod; `sessiond top --once` there lists the session with its owner pod."""
    env = {"SESSIOND_REDIS_URL": redis_url, "SESSIOND_REDIS_PREFIX": f"{redis_prefix}{secrets.token_hex(3)}:",
           "SESSIOND_DATABASE_URL": pg_url, "SESSIOND_DURABILITY": "redis"}
    tokens = _tokens()
    with Pods(tmp_path, env) as cluster:
        first, second = await cluster.start(2)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=10) as http:
            with trio.fail_after(20):  # both pods see both members
                while True:
                    views = [(await http.get(f"{p.http_url}/v1/admin/actors")).json() for p in (first, second)]
                    if all(view["members"] == ["pod-1", "pod-2"] for view in views):
                        break
                    await trio.sleep(0.1)
            created = await http.post(f"{first.http_url}/v1/sessions", json={"state": {}},
                                      headers={"Authorization": f"Bearer {tokens['alice']}"})
            sid = created.json()["id"]
            home = owner(sid, ["pod-1", "pod-2"])
            near, far = (first, second) if home == first.name else (second, first)

            async def scrape() -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
                text = (await http.get(f"{far.http_url}/metrics")).text
                return buckets(text, "sessiond_ack_latency_seconds"), buckets(text, "sessiond_delivery_latency_seconds")

            acks0, delivery0 = await scrape()
            hello = {"t": "hello", "token": tokens["alice"], "session": sid}
            async with open_websocket_url(near.ws_url) as ws_a, open_websocket_url(far.ws_url) as ws_b:
                a, b = RawDevice(ws_a), RawDevice(ws_b)
                await a.send({**hello, "device": "a"})
                await b.send({**hello, "device": "b"})
                await a.recv_type("welcome", 10)
                await b.recv_type("welcome", 10)
                for op_id in range(1, 6):
                    await a.send({"t": "op", "id": op_id, "ops": [{"op": "inc", "path": "/n"}]})
                    await a.recv_type("ack", 10)
                    assert (await b.recv_type("patch", 10))["version"] == op_id
                await b.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}]})
                await b.recv_type("ack", 10)
                acks, delivery = await scrape()
                with trio.fail_after(30):
                    top = await trio.run_process(
                        [sys.executable, "-m", "api.cli", "top", "--once", "--url", far.http_url,
                         "--token", tokens["admin"]],
                        capture_stdout=True, capture_stderr=True, check=False,
                    )
    assert acks[("op", "_count")] - acks0[("op", "_count")] == 1  # b's op, relayed to the owner and back
    assert delivery[("", "_count")] - delivery0[("", "_count")] == 5  # the patches relayed to b
    assert 0 < delivery[("", "_sum")] - delivery0[("", "_sum")] < 5 * 5
    assert top.returncode == 0, top.stderr.decode()
    lines = top.stdout.decode().splitlines()
    assert lines[0].startswith(f"sessiond top  pod {far.name}  members 2")
    row = next(line for line in lines if line.startswith(sid)).split()
    assert row[2] == "2" and row[-1] == home  # both devices, on the owner pod
