"""`python -m bench.relay_probe`: what one relay hop costs on an idle cluster, one request at a time.

Two pods (Redis + PostgreSQL, durability=redis). One session; a device on its owner pod and then a device on the
other pod each send `--ops` increments one at a time (the next after the ack) and time op -> ack. The difference
of the two is what the relay adds (edge -> owner and back over Redis pub/sub) with no queueing: the floor under
the `cluster` scenario's loaded figures (each pod's /metrics has the one-way transit too:
`sessiond_relay_latency_seconds`). Needs the local Redis and PostgreSQL; stops its pods and deletes its keys.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import orjson
import trio
from trio_websocket import open_websocket_url

from bench.pods import check_services, http, run_prefix, running_cluster
from bench.server import delete_keys
from bench.stats import percentile


async def _timed_acks(url: str, token: str, session: str, device: str, ops: int) -> list[float]:
    """Milliseconds from sending each op to receiving its ack, one op in flight at a time."""
    out = []
    async with open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"t": "hello", "token": token, "session": session, "device": device}))
        await ws.get_message()
        for i in range(1, ops + 1):
            started = time.perf_counter()
            await ws.send_message(orjson.dumps({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]}))
            acked = False
            while not acked:
                data = orjson.loads(await ws.get_message())
                acked = any(f.get("t") == "ack" for f in (data if isinstance(data, list) else [data]))
            out.append((time.perf_counter() - started) * 1000)
            await trio.sleep(0.005)
    return out


async def main(ops: int) -> None:
    database_url, redis_pid = await check_services()
    with tempfile.TemporaryDirectory(prefix="relay-probe-") as tmp:
        prefix = run_prefix()
        async with running_cluster(2, Path(tmp), database_url=database_url, prefix=prefix, ttl_s=3.0,
                                   redis_pid=redis_pid) as cluster:
            first = cluster.pods[0]
            token = cluster.token()
            status, body = await http("POST", f"{first.http_url}/v1/sessions", {"state": {"n": 0}}, token=token)
            assert status == 201, body
            session = body["id"]
            await http("GET", f"{first.http_url}/v1/sessions/{session}", token=token)  # activate it
            view = await cluster.admin_view()
            owner = next(a["pod"] for a in view["actors"] if a["session"] == session)
            local = next(p for p in cluster.pods if p.name == owner)
            remote = next(p for p in cluster.pods if p.name != owner)
            rows = {}
            for label, pod in (("device on the owner pod", local), ("device on the other pod", remote)):
                samples = sorted(await _timed_acks(pod.ws_url, token, session, label.split()[-2], ops))
                rows[label] = [percentile(samples, q) for q in (50, 90, 99)]
            print(f"op -> ack, {ops} sequential ops each (ms)      p50     p90     p99")
            for label, (p50, p90, p99) in rows.items():
                print(f"  {label:<38} {p50:7.2f} {p90:7.2f} {p99:7.2f}")
            here, there = rows.values()
            print(f"  {'relay adds':<38} {there[0] - here[0]:7.2f} {there[1] - here[1]:7.2f} {there[2] - here[2]:7.2f}")
        await delete_keys(prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.relay_probe", description=__doc__)
    parser.add_argument("--ops", type=int, default=300, help="sequential ops per device (default 300)")
    trio.run(main, parser.parse_args().ops)
