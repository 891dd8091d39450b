"""The cluster with real processes (DESIGN §6): three or four sessiond pods on loopback sharing Redis (a plain
server, and a 3-master Redis Cluster) and PostgreSQL, devices on any pod, pods killed, frozen, drained, added.

Exactly-once is checked with `inc` (not idempotent): a session's counter must equal the number of increments
its devices saw acked, and every ack's version must be unique. Waits are polled conditions with deadlines.
"""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors.placement import owner
from client.sdk import Session, open_session
from client.wire import SessionError
from tests.cluster.conftest import LEASE_TTL_S
from tests.integration.harness import SECRET
from tests.support.pods import Balancer, Pod, Pods

pytestmark = pytest.mark.slow

TOKEN = jwt.encode({"sub": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
ADMIN = jwt.encode({"sub": "ops", "exp": 4102444800, "roles": ["admin"]}, SECRET, algorithm="HS256")
FAILOVER_LIMIT_S = 5.0
FOUR = ["pod-1", "pod-2", "pod-3", "pod-4"]


def rest(pod: Pod, token: str = TOKEN) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=pod.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=15)


async def create_sessions(pod: Pod, count: int) -> list[str]:
    async with rest(pod) as http:
        out = []
        for _ in range(count):
            r = await http.post("/v1/sessions", json={"state": {"n": 0}})
            assert r.status_code == 201, r.text
            out.append(r.json()["id"])
        return out


async def converge(pods: Pods, timeout_s: float = 10.0) -> dict[str, Any]:
    """Wait until every live pod lists the same members; the admin view of one of them."""
    live = pods.live()
    names = sorted(p.name for p in live)
    view: dict[str, Any] = {}
    seen: list[Any] = []
    try:
        with trio.fail_after(timeout_s):
            while True:
                seen = []
                for pod in live:
                    async with rest(pod, ADMIN) as http:
                        view = (await http.get("/v1/admin/actors")).json()
                    seen.append(view["members"])
                if all(s == names for s in seen):
                    return view
                await trio.sleep(0.1)
    except trio.TooSlowError:
        # Say what each pod saw (its log is in the test's folder): "timed out" alone cannot be diagnosed.
        raise AssertionError(f"members not converged in {timeout_s} s: want {names}, pods saw {seen}") from None


async def state_of(pod: Pod, sid: str) -> dict[str, Any]:
    async with rest(pod) as http:
        r = await http.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@dataclass
class Writer:
    """One SDK device incrementing /n as fast as its acks come back (with a small pause)."""

    session: Session
    acked_versions: list[int] = field(default_factory=list)
    failed: int = 0
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.acked_versions.append(await self.session.inc("/n"))
            except SessionError:
                self.failed += 1  # refused (not applied): e.g. `unavailable` while the session moved
                await trio.sleep(0.05)
            await trio.sleep(0.01)


class Load:
    """SDK devices writing to sessions through `url` until `finish()`: then every op they sent is settled."""

    def __init__(self, url: str, sessions: list[str], per_session: int = 2) -> None:
        self.url = url
        self.sessions = sessions
        self.per_session = per_session
        self.written: list[tuple[str, Writer]] = []
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with AsyncExitStack() as stack:
                for sid in self.sessions:
                    for i in range(self.per_session):
                        s = await stack.enter_async_context(
                            open_session(
                                self.url, token=TOKEN, session=sid, device=f"w{i}", backoff_base_s=0.05,
                                max_backoff_s=0.5, connect_timeout_s=20,
                            )
                        )
                        self.written.append((sid, Writer(s)))
                async with trio.open_nursery() as nursery:
                    for _, writer in self.written:
                        nursery.start_soon(writer.run)
                    task_status.started()
        finally:
            self._done.set()

    async def finish(self, timeout_s: float = 30.0) -> list[tuple[str, Writer]]:
        for _, writer in self.written:
            writer.stop.set()
        with trio.fail_after(timeout_s):
            await self._done.wait()
        return self.written


def check_exactly_once(final: dict[str, int], written: list[tuple[str, Writer]]) -> None:
    """Every acked increment counted once, nothing else: the counter equals the acks, versions are unique."""
    per_session: dict[str, list[int]] = {}
    for sid, writer in written:
        per_session.setdefault(sid, []).extend(writer.acked_versions)
    for sid, versions in per_session.items():
        doubles = [v for v, n in Counter(versions).items() if n > 1]
        assert not doubles, f"{sid}: versions acked twice {doubles[:5]}"
        assert final[sid] == len(versions), f"{sid}: counter {final[sid]} but {len(versions)} increments acked"


async def wait_writable(pods: list[Pod], sid: str, started: float) -> float:
    """Seconds from `started` until a REST change of the session succeeds on some live pod."""
    with trio.fail_after(30):
        for pod in itertools.cycle(pods):
            async with rest(pod) as http:
                try:
                    r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "inc", "path": "/rest"}]})
                except httpx.TransportError:
                    r = None
            if r is not None and r.status_code == 200:
                return trio.current_time() - started
            await trio.sleep(0.05)
    raise AssertionError("unreachable")


# ---- one order across pods ------------------------------------------------------------------------------


async def test_devices_on_three_pods_see_one_order(pods: Pods) -> None:
    p1, p2, p3 = await pods.start(3)
    await converge(pods)
    (sid,) = await create_sessions(p1, 1)
    frames: dict[str, list[dict[str, Any]]] = {}

    async def device(pod: Pod, name: str, count: int, ready: trio.Event, go: trio.Event) -> None:
        got = frames[name] = []
        async with open_websocket_url(pod.ws_url) as ws:
            await ws.send_message(orjson.dumps({"t": "hello", "token": TOKEN, "session": sid, "device": name}).decode())
            ready.set()
            await go.wait()
            for i in range(1, count + 1):
                await ws.send_message(orjson.dumps({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]}).decode())
            with trio.move_on_after(20):
                while sum(1 for f in got if f["t"] in ("ack", "patch")) < 200:
                    data = orjson.loads(await ws.get_message())
                    got.extend(data if isinstance(data, list) else [data])

    go = trio.Event()
    async with trio.open_nursery() as nursery:
        readies = []
        for pod, name, count in ((p1, "d1", 67), (p2, "d2", 67), (p3, "d3", 66)):
            ready = trio.Event()
            readies.append(ready)
            nursery.start_soon(device, pod, name, count, ready, go)
        for ready in readies:
            await ready.wait()
        with trio.fail_after(10):  # one actor in the cluster; the devices of the two other pods are relayed to it
            while True:
                actors = [a for a in (await converge(pods))["actors"] if a["session"] == sid]
                if len(actors) == 1 and actors[0]["remote_devices"] == 2 and len(actors[0]["devices"]) == 3:
                    break
                await trio.sleep(0.05)
        go.set()
    for name, got in frames.items():
        errors = [f for f in got if f["t"] not in ("ack", "patch", "presence")]
        assert not errors[1:], f"{name}: unexpected frames {errors[:5]}"
        versions = [f["version"] for f in got if f["t"] in ("ack", "patch")]
        assert versions == list(range(1, 201)), f"{name}: not one gap-free order ({versions[:10]}...)"
        assert got[0]["t"] == "welcome"
    for pod in (p1, p2, p3):  # the same answer on every pod
        body = await state_of(pod, sid)
        assert (body["state"], body["version"]) == ({"n": 200}, 200)
        async with rest(pod) as http:
            listed = {s["id"]: s for s in (await http.get("/v1/sessions?limit=200")).json()["sessions"]}
        assert listed[sid]["version"] == 200
    view = await converge(pods)
    owners = [a for a in view["actors"] if a["session"] == sid]
    assert len(owners) == 1 and owners[0]["epoch"] >= 1 and set(view["pods"]) == {"pod-1", "pod-2", "pod-3"}


# ---- failures -------------------------------------------------------------------------------------------


async def test_kill_9_of_an_owner_under_load_loses_nothing_and_doubles_nothing(pods: Pods) -> None:
    started = await pods.start(3)
    await converge(pods)
    sessions = await create_sessions(started[0], 6)
    balancer = Balancer([p.ws for p in started])
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        load = Load(balancer.ws_url, sessions)
        await nursery.start(load.run)
        await trio.sleep(1.0)  # load before the failure
        view = await converge(pods)
        owners = Counter(a["pod"] for a in view["actors"])
        victim = pods.pods[owners.most_common(1)[0][0]]
        moved = [a["session"] for a in view["actors"] if a["pod"] == victim.name]
        pods.kill(victim)
        killed_at = trio.current_time()
        survivors = pods.live()
        recovery = [await wait_writable(survivors, sid, killed_at) for sid in moved]
        await trio.sleep(1.0)  # load after the failure
        written = await load.finish()
        nursery.cancel_scope.cancel()
    assert max(recovery) <= FAILOVER_LIMIT_S, f"writable again after {recovery} s"
    final = {sid: (await state_of(survivors[0], sid))["state"]["n"] for sid in sessions}
    check_exactly_once(final, written)
    assert all(len(w.acked_versions) > 5 for _, w in written)


async def test_frozen_owner_past_its_lease_writes_nothing_when_it_wakes(pods: Pods) -> None:
    """SIGSTOP the owner longer than its lease, let another pod take over, SIGCONT: the woken pod's pending
    writes are refused (fenced), so every ack's version is unique and the state holds exactly the acked ops."""
    p1, p2, p3 = await pods.start(3)
    await converge(pods)
    (sid,) = await create_sessions(p1, 1)
    await state_of(p1, sid)  # activates the session on its owner
    view = await converge(pods)
    owner = pods.pods[next(a["pod"] for a in view["actors"] if a["session"] == sid)]
    other = next(p for p in (p1, p2, p3) if p is not owner)
    stale_acks: list[int] = []
    async with open_websocket_url(owner.ws_url) as ws:
        await ws.send_message(orjson.dumps({"t": "hello", "token": TOKEN, "session": sid, "device": "f"}).decode())
        await ws.get_message()
        acked: dict[int, int] = {}
        for i in range(1, 6):
            await ws.send_message(orjson.dumps({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]}).decode())
        with trio.fail_after(10):
            while len(acked) < 5:
                data = orjson.loads(await ws.get_message())
                for f in data if isinstance(data, list) else [data]:
                    if f["t"] == "ack":
                        acked[f["id"]] = f["version"]
        pods.freeze(owner)
        for i in range(6, 11):  # queued in the frozen pod's socket buffer
            await ws.send_message(orjson.dumps({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]}).decode())
        frozen_at = trio.current_time()
        took = await wait_writable([other], sid, frozen_at)
        async with trio.open_nursery() as nursery:
            load = Load(other.ws_url, [sid], per_session=1)
            await nursery.start(load.run)
            await trio.sleep(0.5)
            pods.thaw(owner)
            with trio.move_on_after(10):  # the woken pod must not ack what it can no longer write
                try:
                    while True:
                        data = orjson.loads(await ws.get_message())
                        for f in data if isinstance(data, list) else [data]:
                            if f["t"] == "ack" and f["id"] > 5:
                                stale_acks.append(f["id"])
                except ConnectionClosed as exc:
                    assert exc.reason.code == 1013
            await trio.sleep(0.5)
            written = await load.finish()
    assert took >= LEASE_TTL_S * 0.5  # the takeover waited for the lease, it did not steal it
    assert stale_acks == [], f"a fenced pod acked ops {stale_acks}"
    body = await state_of(other, sid)
    rest_incs = body["state"].get("rest", 0)
    versions = list(acked.values()) + [v for _, w in written for v in w.acked_versions]
    assert len(set(versions)) == len(versions)
    assert body["state"]["n"] == len(acked) + sum(len(w.acked_versions) for _, w in written)
    assert rest_incs >= 1


async def test_sigterm_drain_under_load_hands_sessions_over(pods: Pods) -> None:
    started = await pods.start(3)
    await converge(pods)
    sessions = await create_sessions(started[0], 6)
    balancer = Balancer([p.ws for p in started])
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        load = Load(balancer.ws_url, sessions)
        await nursery.start(load.run)
        await trio.sleep(1.0)
        view = await converge(pods)
        victim = pods.pods[Counter(a["pod"] for a in view["actors"]).most_common(1)[0][0]]
        drained_at = trio.current_time()
        code = await pods.terminate(victim)
        drain_s = trio.current_time() - drained_at
        await trio.sleep(1.5)
        written = await load.finish()
        nursery.cancel_scope.cancel()
    assert code == 0, pods.tail(victim)
    assert drain_s < 10, f"drain took {drain_s:.1f} s"
    survivors = pods.live()
    final = {sid: (await state_of(survivors[0], sid))["state"]["n"] for sid in sessions}
    check_exactly_once(final, written)


async def test_a_fourth_pod_joining_under_load_takes_sessions_without_loss(pods: Pods) -> None:
    started = await pods.start(3)
    await converge(pods)
    # Sessions enough that the fourth pod (named pod-4) wins some: rendezvous hashing is deterministic.
    sessions: list[str] = []
    while len(sessions) < 12 or sum(owner(s, FOUR) == "pod-4" for s in sessions) < 3:
        sessions += await create_sessions(started[0], 1)
    balancer = Balancer([p.ws for p in started])
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        load = Load(balancer.ws_url, sessions, per_session=1)
        await nursery.start(load.run)
        await trio.sleep(1.0)
        (fourth,) = await pods.start(1)
        balancer.backends.append(fourth.ws)
        await converge(pods)
        await trio.sleep(2.0)
        written = await load.finish()
        nursery.cancel_scope.cancel()
    for sid in sessions:
        await state_of(fourth, sid)  # activate them all where they now belong
    view = await converge(pods)
    assert fourth.name == "pod-4"
    on_four = {a["session"] for a in view["actors"] if a["pod"] == "pod-4"}
    assert on_four == {s for s in sessions if owner(s, FOUR) == "pod-4"}
    final = {sid: (await state_of(fourth, sid))["state"]["n"] for sid in sessions}
    check_exactly_once(final, written)


async def test_a_pod_with_an_embedded_store_refuses_to_join(pods: Pods) -> None:
    (member,) = await pods.start(1)
    await converge(pods)
    embedded = pods.spawn({"SESSIOND_DATABASE_URL": "", "SESSIOND_DURABILITY": ""})
    assert embedded.proc is not None
    with trio.fail_after(30):
        while embedded.proc.poll() is None:
            await trio.sleep(0.1)
    assert embedded.proc.returncode == 3
    assert "refusing to start" in pods.tail(embedded) and "embedded store" in pods.tail(embedded)
    await pods.ready(member)  # the member was not disturbed
