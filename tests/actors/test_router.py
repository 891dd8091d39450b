"""Several pods in one process sharing one in-memory Storage (its membership, leases and pub/sub are the
in-process ones): placement, the relay in both directions, REST across pods, moves, drain, fencing.

The multi-process versions of these (real sessiond processes on a shared Redis and PostgreSQL) are in
tests/cluster/; these run in milliseconds and pin the router's logic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from actors.config import ActorConfig
from actors.leases import LeaseKeeper
from actors.messages import ActorRef, AnswerTimeout, ChangeRequest, Describe, RestChange, RestHandoff
from actors.registry import Registry
from actors.router import Router
from actors.session import Accepted, rest_key
from storage.memory import memory_storage
from storage.ports import Fenced, Storage
from tests.actors.fakes import FakeLink

CONFIG = ActorConfig(mailbox_size=64, passivate_after_s=60.0, storage_timeout_s=2.0)
TTL_S = 1.0


def inc(by: int = 1) -> list[dict[str, Any]]:
    return [{"op": "inc", "path": "/n", "by": by}]


@dataclass
class Pod:
    name: str
    registry: Registry
    router: Router
    scope: trio.CancelScope


class Cluster:
    def __init__(self, nursery: trio.Nursery, storage: Storage) -> None:
        self.nursery = nursery
        self.storage = storage
        self.pods: dict[str, Pod] = {}

    async def start(self, name: str) -> Pod:
        storage = self.storage
        assert storage.leases is not None
        keeper = LeaseKeeper(storage.leases, storage.sessions, name, TTL_S)
        registry = Registry(storage, CONFIG, keeper)
        router = Router(name, registry, storage, keeper, ttl_s=TTL_S)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(registry.run)
                    await nursery.start(router.run)
                    task_status.started()

        await self.nursery.start(run)
        pod = self.pods[name] = Pod(name, registry, router, scope)
        await self.converge()
        return pod

    async def converge(self) -> None:
        """Every pod heart-beats once more, so all see the same members."""
        for _ in range(2):
            for pod in self.pods.values():
                if not pod.scope.cancel_called:
                    await pod.router.heartbeat()
        await trio.testing.wait_all_tasks_blocked()

    def owner_and_other(self, sid: str) -> tuple[Pod, Pod]:
        any_pod = next(iter(self.pods.values()))
        owner = self.pods[any_pod.router.owner(sid)]
        other = next(p for p in self.pods.values() if p is not owner)
        return owner, other

    async def session(self, state: dict[str, Any] | None = None) -> str:
        any_pod = next(iter(self.pods.values()))
        record = await any_pod.registry.create_session("alice", "t", {}, state or {"n": 0})
        return record.id


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    c = Cluster(nursery, memory_storage())
    await c.start("pod-a")
    await c.start("pod-b")
    yield c


async def attach(pod: Pod, sid: str, link: FakeLink, resume: int | None = None, epoch: str | None = None) -> ActorRef:
    ref = await pod.router.attach(sid, link, "web", resume, epoch)
    link.actor = ref
    await trio.testing.wait_all_tasks_blocked()
    return ref


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_pods_see_each_other_and_agree_on_owners(cluster: Cluster) -> None:
    a, b = cluster.pods["pod-a"], cluster.pods["pod-b"]
    assert set(a.router.members) == set(b.router.members) == {"pod-a", "pod-b"}
    sessions = [await cluster.session() for _ in range(40)]
    owners = {a.router.owner(s) for s in sessions}
    assert owners == {"pod-a", "pod-b"}  # both get sessions (40 of them: a 1-in-2^39 chance to fail)
    assert all(a.router.owner(s) == b.router.owner(s) for s in sessions)


async def test_devices_on_two_pods_share_one_actor_and_one_order(cluster: Cluster) -> None:
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    local, remote = FakeLink("local"), FakeLink("remote")
    local_ref = await attach(owner, sid, local)
    remote_ref = await attach(edge, sid, remote)
    assert edge.registry.lookup(sid) is None  # the edge pod holds no actor: it relays
    for op_id in range(1, 6):
        remote_ref.tell(ChangeRequest(remote, op_id, inc(), None))
        local_ref.tell(ChangeRequest(local, op_id, inc(10), None))
        await settle()
    assert [f["id"] for f in remote.of("ack")] == [1, 2, 3, 4, 5]
    versions = sorted([f["version"] for f in remote.of("ack")] + [f["version"] for f in remote.of("patch")])
    assert versions == list(range(1, 11))  # every version exactly once, acks and patches together
    assert sorted(f["version"] for f in local.of("patch")) == [f["version"] for f in remote.of("ack")]
    described = await edge.router.ask(sid, Describe())
    assert b'"n":55' in described
    figures = edge.router.relay.statistics()
    assert figures["edge_links"] == 1 and figures["gaps"] == 0
    assert owner.router.relay.statistics()["remote_links"] == 1


async def test_a_patch_for_several_devices_of_one_pod_crosses_once(cluster: Cluster) -> None:
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    links = [FakeLink(f"d{i}") for i in range(3)]
    for link in links:
        await attach(edge, sid, link)
    sent_before = owner.router.relay.sent
    assert await owner.router.ask(sid, RestChange(inc(), None)) == Accepted(1)
    await settle()
    assert owner.router.relay.sent - sent_before == 1  # one pub/sub message, three devices
    assert all(link.of("patch")[-1]["version"] == 1 for link in links)


async def test_rest_on_a_pod_that_does_not_own_the_session(cluster: Cluster) -> None:
    sid = await cluster.session({"n": 1})
    owner, edge = cluster.owner_and_other(sid)
    assert await edge.router.ask(sid, RestChange(inc(4), None)) == Accepted(1)
    conflict = await edge.router.ask(sid, RestChange(inc(), 0))
    assert conflict.code == "conflict" and conflict.version == 1
    assert (await edge.router.ask(sid, RestHandoff("laptop"))) == Accepted(1, "laptop")
    assert await edge.router.peek([sid]) == {sid: [1, "laptop", "active"]}
    assert owner.registry.lookup(sid) is not None and edge.registry.lookup(sid) is None


async def test_a_joining_pod_takes_over_its_sessions_without_loss(cluster: Cluster) -> None:
    sessions = [await cluster.session() for _ in range(12)]
    for i, sid in enumerate(sessions):
        for _ in range(i + 1):
            assert isinstance(await cluster.pods["pod-a"].router.ask(sid, RestChange(inc(), None)), Accepted)
    link = FakeLink("watcher")
    watched = sessions[0]
    await attach(cluster.pods[cluster.pods["pod-a"].router.owner(watched)], watched, link)
    c = await cluster.start("pod-c")
    await settle()
    moved = [s for s in sessions if c.router.owner(s) == "pod-c"]
    assert moved, "pod-c should win some of 12 sessions"
    for sid in moved:  # the old owners handed them over: no actor left there
        assert all(p.registry.lookup(sid) is None for p in cluster.pods.values() if p is not c)
    if watched in moved:
        assert link.closed is not None and link.closed[0] == 1013  # resume through the new owner
    for i, sid in enumerate(sessions):  # every change is still there, wherever the session lives now
        assert b'"n":%d' % (i + 1) in await cluster.pods["pod-a"].router.ask(sid, Describe())
    assert all(c.registry.lookup(s) is not None for s in moved)


async def test_drain_hands_sessions_over_and_closes_devices(cluster: Cluster) -> None:
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    local, remote = FakeLink("local"), FakeLink("remote")
    await attach(owner, sid, local)
    ref = await attach(edge, sid, remote)
    ref.tell(ChangeRequest(remote, 1, inc(), None))
    await settle()
    await owner.router.drain(grace_s=5)
    await settle()
    assert local.closed is not None and local.closed[0] == 1001  # its pod goes away
    assert remote.closed is not None and remote.closed[0] == 1013  # its pod stays: resume elsewhere
    assert owner.registry.lookup(sid) is None and owner.registry.leases.statistics()["held"] == 0
    owner.scope.cancel()
    await cluster.converge()
    assert edge.router.owner(sid) == edge.name
    again = FakeLink("remote")
    await attach(edge, sid, again, resume=1, epoch=remote.of("welcome")[0]["epoch"])
    welcome = again.of("welcome")[0]
    assert welcome["version"] == 1 and welcome["mode"] == "full"  # a new owner: a new epoch, the full state
    assert welcome["epoch"] != remote.of("welcome")[0]["epoch"]


async def test_a_stale_owner_is_fenced_and_stops(cluster: Cluster) -> None:
    """Another pod took the session over (its lease expired while this one was frozen, say): this pod's next
    write is refused by storage, the actor stops and its devices go resume at the new owner."""
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    link = FakeLink("d")
    ref = await attach(owner, sid, link)
    ref.tell(ChangeRequest(link, 1, inc(), None))
    await settle()
    storage = cluster.storage
    assert storage.leases is not None
    await storage.leases.release(sid, owner.name, owner.registry.leases.token_of(sid) or 0)
    newer = await edge.registry.leases.acquire(sid)  # what the new owner does: a token, then the fence
    ref.tell(ChangeRequest(link, 2, inc(), None))
    await settle()
    assert [f["id"] for f in link.of("ack")] == [1]  # the fenced change was never acked
    assert link.closed is not None and link.closed[0] == 1013
    assert owner.registry.lookup(sid) is None
    with pytest.raises(Fenced):
        await storage.sessions.update_session((await storage.sessions.get_session(sid)), newer - 1)  # type: ignore[arg-type]


async def test_a_lease_that_cannot_be_renewed_stops_its_actor_in_time(cluster: Cluster) -> None:
    sid = await cluster.session()
    owner, _ = cluster.owner_and_other(sid)
    link = FakeLink("d")
    await attach(owner, sid, link)
    keeper = owner.registry.leases

    async def broken(*_: Any) -> set[str]:
        from storage.ports import StorageUnavailable

        raise StorageUnavailable("redis down")

    keeper.leases.renew = broken  # type: ignore[method-assign]
    started = trio.current_time()
    with trio.fail_after(TTL_S * 3):
        while owner.registry.lookup(sid) is not None:
            await trio.sleep(0.02)
    assert trio.current_time() - started < TTL_S  # stopped before the lease could expire
    assert link.closed is not None and link.closed[0] == 1013


async def test_a_retransmit_after_a_move_is_answered_not_applied_again(cluster: Cluster) -> None:
    """Op ids travel with the session (snapshot + journal): the new owner acks a retransmitted id with its original
    version instead of applying it twice (DESIGN §3)."""
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    link = FakeLink("phone")
    ref = await attach(owner, sid, link)
    for op_id in (7, 8):
        ref.tell(ChangeRequest(link, op_id, inc(), None))
    await settle()
    assert [(f["id"], f["version"]) for f in link.of("ack")] == [(7, 1), (8, 2)]
    await owner.router.drain(grace_s=5)  # the session moves; the device resumes on the other pod
    owner.scope.cancel()
    await cluster.converge()
    again = FakeLink("phone")
    ref = await attach(edge, sid, again)
    for op_id in (7, 8, 9):  # 7 and 8 were applied: only their acks come back; 9 is new
        ref.tell(ChangeRequest(again, op_id, inc(), None))
    await settle()
    assert [(f["id"], f["version"]) for f in again.of("ack")] == [(7, 1), (8, 2), (9, 3)]
    assert b'"n":3' in await edge.router.ask(sid, Describe())


async def test_a_rest_retry_with_its_idempotency_key_after_a_move_applies_nothing(cluster: Cluster) -> None:
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    key = rest_key("client-request-1")
    assert await edge.router.ask(sid, RestChange(inc(5), None, key=key)) == Accepted(1)
    await owner.router.drain(grace_s=5)
    owner.scope.cancel()
    await cluster.converge()
    assert await edge.router.ask(sid, RestChange(inc(5), None, key=key)) == Accepted(1)  # the first answer
    assert b'"n":5' in await edge.router.ask(sid, Describe())


async def test_an_ask_that_times_out_reports_an_unknown_outcome_and_a_keyed_retry_is_safe(cluster: Cluster) -> None:
    """The change was neither confirmed nor withdrawn (it waits in the actor behind a slow write): the answer says
    so (AnswerTimeout), and the retry with the same key returns the first result instead of applying it again."""
    sid = await cluster.session()
    owner, edge = cluster.owner_and_other(sid)
    await owner.router.ask(sid, Describe())  # activate
    gate = trio.Event()
    journal = cluster.storage.journal
    append = journal.append

    async def slow_append(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await append(*args, **kwargs)

    journal.append = slow_append  # type: ignore[method-assign]
    key = rest_key("k")
    with pytest.raises(AnswerTimeout):
        await edge.router.ask(sid, RestChange(inc(), None, key=key), timeout_s=0.2)
    gate.set()
    await settle()
    journal.append = append  # type: ignore[method-assign]
    assert await edge.router.ask(sid, RestChange(inc(), None, key=key)) == Accepted(1)
    assert b'"n":1' in await edge.router.ask(sid, Describe())
