"""The SessionActor runtime with in-memory storage and FakeLinks: turns, group commit, supervision,
passivation, shutdown and backpressure (DESIGN §5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from actors.config import ActorConfig
from actors.messages import (
    ActorUnavailable,
    Attach,
    ChangeRequest,
    ClaimRequest,
    Crash,
    Describe,
    Detach,
    End,
    PauseRequest,
    RestChange,
    RestHandoff,
    Shutdown,
)
from actors.registry import Registry
from actors.session import Accepted
from actors.session_actor import SessionActor
from storage.memory import (
    Fences,
    MemoryEventSink,
    MemoryJournal,
    MemorySessionStore,
    MemorySnapshotStore,
    VolatileSnapshotStore,
)
from storage.ports import Snapshot, Storage
from storage.production import LayeredSnapshotStore
from tests.actors.fakes import CountingJournal, FakeLink, Replica, make_registry

JSON = Any
CONFIG = ActorConfig(
    mailbox_size=64,
    replay_window=10,
    passivate_after_s=30.0,
    checkpoint_every_versions=1000,
    checkpoint_every_s=5.0,
    max_restarts=3,
    restart_window_s=60.0,
    storage_timeout_s=2.0,
)


def inc(by: int = 1) -> list[dict[str, JSON]]:
    return [{"op": "inc", "path": "/n", "by": by}]


class Env:
    def __init__(self, registry: Registry, storage: Storage, journal: CountingJournal) -> None:
        self.registry = registry
        self.storage = storage
        self.journal = journal

    async def session(self, state: dict[str, JSON] | None = None) -> str:
        record = await self.registry.create_session("alice", "demo", {}, state if state is not None else {})
        return record.id

    async def attach(self, sid: str, link: FakeLink, resume: int | None = None) -> SessionActor:
        actor = await self.registry.tell(sid, Attach(link, "web", resume))
        link.actor = actor
        await settle()
        return actor

    async def change(self, sid: str, ops: list[dict[str, JSON]], base: int | None) -> Any:
        result = await self.registry.ask(sid, RestChange(ops, base))
        await settle()  # what the change set in motion (a resync asked by an overflowing link) is done too
        return result

    async def handoff(self, sid: str, device: str) -> Any:
        return await self.registry.ask(sid, RestHandoff(device))

    async def describe(self, sid: str) -> bytes:
        result: bytes = await self.registry.ask(sid, Describe())
        return result

    async def end(self, sid: str) -> None:
        await self.registry.ask(sid, End())

    async def state(self, sid: str) -> dict[str, JSON]:
        described: dict[str, JSON] = orjson.loads(await self.describe(sid))
        return described


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def make_env_storage(journal: CountingJournal) -> Storage:
    fences = Fences()
    journal.inner = MemoryJournal(fences)
    return Storage(MemorySessionStore(fences), MemorySnapshotStore(fences), journal, MemoryEventSink())


async def start_env(nursery: trio.Nursery, config: ActorConfig = CONFIG) -> Env:
    journal = CountingJournal()
    storage = make_env_storage(journal)
    registry = make_registry(storage, config)
    await nursery.start(registry.run)
    return Env(registry, storage, journal)


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[Env]:
    yield await start_env(nursery)


def replay(link: FakeLink) -> Replica:
    replica = Replica(link.device)
    for frame in link.frames:
        replica.receive(frame)
    return replica


# ---- activation and sync ------------------------------------------------------------------------------


async def test_activation_loads_the_session_from_storage(env: Env) -> None:
    sid = await env.session({"n": 41})
    assert env.registry.lookup(sid) is None
    described = await env.state(sid)
    assert (described["state"], described["version"], described["owner"]) == ({"n": 41}, 0, "alice")
    actor = env.registry.lookup(sid)
    assert actor is not None and await env.registry.get(sid) is actor


async def test_unknown_session_is_not_found(env: Env) -> None:
    with pytest.raises(LookupError):
        await env.registry.get("nope")
    assert env.registry.lookup("nope") is None


async def test_two_links_stay_in_sync(env: Env) -> None:
    sid = await env.session({"n": 0})
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, a)
    await env.attach(sid, b)
    ra, rb = Replica("a"), Replica("b")
    for op_id in range(1, 4):
        ra.send(op_id, inc(op_id))
        actor.tell(ChangeRequest(a, op_id, inc(op_id), None))
        await settle()
    rb.send(1, [{"op": "set", "path": "/b", "value": True}])
    actor.tell(ChangeRequest(b, 1, [{"op": "set", "path": "/b", "value": True}], None))
    await settle()
    for link, replica in ((a, ra), (b, rb)):
        for frame in link.frames:
            replica.receive(frame)
        assert (replica.state, replica.version) == ({"n": 6, "b": True}, 4)
    assert [f["id"] for f in a.of("ack")] == [1, 2, 3]
    assert [f["version"] for f in b.of("patch")] == [1, 2, 3]
    assert b.of("presence") == []  # b joined last: its welcome lists the devices
    assert a.of("presence")[-1]["devices"] == [{"device": "a", "kind": "web"}, {"device": "b", "kind": "web"}]


async def test_frames_from_a_link_that_is_not_attached_are_ignored(env: Env) -> None:
    sid = await env.session()
    a, stranger = FakeLink("a"), FakeLink("x")
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(stranger, 1, inc(), None))
    actor.tell(PauseRequest(stranger, 2))
    actor.tell(ClaimRequest(stranger, 3))
    await settle()
    described = await env.state(sid)
    assert (described["version"], described["active"], described["status"]) == (0, None, "active")
    assert stranger.frames == []


async def test_group_commit_one_journal_write_per_turn(env: Env) -> None:
    sid = await env.session()
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    env.journal.appends.clear()
    for op_id in range(1, 6):
        actor.tell(ChangeRequest(a, op_id, inc(), None))  # all queued before the actor runs
    await settle()
    assert [[c.version for c in batch] for batch in env.journal.appends] == [[1, 2, 3, 4, 5]]
    assert [f["version"] for f in a.of("ack")] == [1, 2, 3, 4, 5]


async def test_acks_leave_only_after_the_journal_write(env: Env) -> None:
    sid = await env.session()
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    gate = trio.Event()
    inner_append = env.journal.append

    async def slow_append(session_id: str, changes: Any, token: int = 0) -> None:
        await gate.wait()
        await inner_append(session_id, changes, token)

    env.journal.append = slow_append  # type: ignore[method-assign]
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await settle()
    assert a.of("ack") == []
    gate.set()
    await settle()
    assert a.of("ack") == [{"t": "ack", "id": 1, "version": 1}]


# ---- REST through the registry ------------------------------------------------------------------------


async def test_rest_change_handoff_describe_end(env: Env) -> None:
    sid = await env.session({"n": 1})
    a = FakeLink("a")
    await env.attach(sid, a)
    assert await env.change(sid, inc(2), None) == Accepted(1)
    conflict = await env.change(sid, inc(), 0)
    assert (conflict.code, conflict.version) == ("conflict", 1)
    assert await env.handoff(sid, "a") == Accepted(1, "a")
    described = await env.state(sid)
    assert (described["state"], described["version"], described["active"]) == ({"n": 3}, 1, "a")
    assert described["devices"] == [{"device": "a", "kind": "web"}]
    snapshot = await env.storage.snapshots.load_snapshot(sid)
    assert snapshot is not None and snapshot.active == "a"  # the handoff checkpoint was written
    assert a.of("patch")[0]["device"] == "@rest"
    assert a.of("handoff") == [{"t": "handoff", "active": "a", "version": 1}]

    await env.end(sid)
    await settle()
    assert a.frames[-1] == {"t": "ended"}
    assert a.closed is not None and a.closed[0] == 4010
    record = await env.storage.sessions.get_session(sid)
    assert record is not None and record.status == "ended"
    assert await env.storage.snapshots.load_snapshot(sid) is None
    assert await env.storage.journal.read_after(sid, 0) == []
    with pytest.raises(LookupError):
        await env.registry.get(sid)
    events = [key for key, _ in env.storage.events.events]  # type: ignore[attr-defined]
    assert events[0] == "session.created" and "session.handoff" in events and events[-1] == "session.ended"


async def test_pause_and_claim_over_the_wire(env: Env) -> None:
    sid = await env.session()
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, a)
    await env.attach(sid, b)
    actor.tell(ClaimRequest(a, 1))
    actor.tell(PauseRequest(b, 1))  # not the active device
    actor.tell(PauseRequest(a, 2))
    await settle()
    assert a.of("ack") == [{"t": "ack", "id": 1, "version": 0}, {"t": "ack", "id": 2, "version": 0}]
    assert b.of("error")[0]["code"] == "conflict"
    assert [f["active"] for f in b.of("handoff")] == ["a", None]
    described = await env.state(sid)
    assert (described["status"], described["active"]) == ("paused", None)


class SlowTrimJournal(CountingJournal):
    """A journal whose trims wait until released: housekeeping no ack may wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.trims: list[int] = []

    async def trim(self, session_id: str, upto_version: int) -> None:
        await self.release.wait()
        self.trims.append(upto_version)
        await self.inner.trim(session_id, upto_version)


async def test_a_pause_is_acked_after_its_snapshot_not_after_the_journal_trim(nursery: trio.Nursery) -> None:
    journal = SlowTrimJournal()
    storage = make_env_storage(journal)
    registry = make_registry(storage, CONFIG)
    await nursery.start(registry.run)
    env = Env(registry, storage, journal)
    sid = await env.session({"n": 0})
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    actor.tell(ClaimRequest(a, 1))
    actor.tell(ChangeRequest(a, 2, inc(), None))
    actor.tell(PauseRequest(a, 3))
    await settle()
    assert [f["id"] for f in a.of("ack")] == [1, 2, 3]  # every trim is still blocked
    snapshot = await storage.snapshots.load_snapshot(sid)
    assert snapshot is not None and (snapshot.version, snapshot.status, snapshot.state) == (1, "paused", {"n": 1})
    assert journal.trims == [] and [c.version for c in await journal.read_after(sid, 0)] == [1]
    journal.release.set()
    await settle()
    assert journal.trims and max(journal.trims) == 1 and await journal.read_after(sid, 0) == []


# ---- handoff checkpoints (DESIGN §5.2) -----------------------------------------------------------------


class TieredSnapshots(MemorySnapshotStore):
    """A fast tier (this store: Redis, or memory in the embedded default) and a durable one (`durable`:
    PostgreSQL or the SQLite file), with a log of (tier, status, active) of every write in order. `tiered=False`:
    one tier only (the durable one, and every write goes there)."""

    def __init__(self, fences: Fences, tiered: bool = True, volatile: bool = False) -> None:
        super().__init__(fences)
        self.tiered = tiered
        self.volatile = volatile
        self.durable = MemorySnapshotStore(fences)
        self.log: list[tuple[str, str, str | None]] = []

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await super().save_snapshot(snapshot)
        self.log.append(("fast", snapshot.status, snapshot.active))

    async def save_durable(self, snapshot: Snapshot) -> None:
        await self.durable.save_snapshot(snapshot)
        self.log.append(("durable", snapshot.status, snapshot.active))


def written_before_ack(link: FakeLink, log: list[Any]) -> list[Any]:
    """The writes of `log` made before `link` was handed its next ack (filled in when the ack arrives)."""
    seen: list[Any] = []
    deliver = link.deliver

    def watch(out: Any) -> None:
        if out.frame.get("t") == "ack" and not seen:
            seen.extend(log)
        deliver(out)

    link.deliver = watch  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(
    ("tiered", "volatile", "overrides", "pause_tier", "claim_tier"),
    [
        (False, False, {}, "durable", "durable"),  # one tier only: the durable one
        (True, True, {}, "fast", "fast"),  # embedded: a volatile tier in memory (beside the in-process journal)
        (True, False, {"fast_snapshot_every_versions": 100}, "durable", "fast"),  # Redis
        (True, False, {"fast_snapshot_every_versions": 100, "durable_handoffs": True}, "durable", "durable"),  # pg
    ],
)
async def test_a_handoff_is_acked_from_the_tier_its_mode_names_and_a_pause_then_becomes_durable(
    nursery: trio.Nursery,
    tiered: bool,
    volatile: bool,
    overrides: dict[str, Any],
    pause_tier: str,
    claim_tier: str,
) -> None:
    config = replace(CONFIG, **overrides)
    fences = Fences()
    journal = CountingJournal()
    journal.inner = MemoryJournal(fences)
    snapshots = TieredSnapshots(fences, tiered, volatile)
    storage = Storage(MemorySessionStore(fences), snapshots, journal, MemoryEventSink())
    registry = make_registry(storage, config)
    await nursery.start(registry.run)
    env = Env(registry, storage, journal)
    sid = await env.session({"n": 0})
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, a)
    await env.attach(sid, b)

    snapshots.log.clear()  # what activation wrote
    at_pause_ack = written_before_ack(a, snapshots.log)
    actor.tell(PauseRequest(a, 1))
    await settle()
    assert a.of("ack") == [{"t": "ack", "id": 1, "version": 0}]
    assert at_pause_ack == [(pause_tier, "paused", None)]
    paused = [(pause_tier, "paused", None)]
    if pause_tier == "fast":
        paused.append(("durable", "paused", None))  # at once, not a checkpoint period later
    assert snapshots.log == paused

    at_claim_ack = written_before_ack(b, snapshots.log)
    actor.tell(ClaimRequest(b, 1))
    await settle()
    assert b.of("ack") == [{"t": "ack", "id": 1, "version": 0}]
    assert at_claim_ack == [*paused, (claim_tier, "active", "b")]


async def test_a_pause_while_a_durable_checkpoint_is_in_flight_is_written_durably_after_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The pause's ack does not wait for the durable write in flight, and its own durable write follows that one
    rather than a checkpoint period later."""
    env = await start_volatile_env(nursery, replace(CONFIG, checkpoint_every_s=3600.0))
    layered = env.storage.snapshots
    assert isinstance(layered, LayeredSnapshotStore)
    durable = layered.durable
    release = trio.Event()
    save = durable.save_snapshot

    async def slow_save(snapshot: Snapshot) -> None:
        await release.wait()
        await save(snapshot)

    sid = await env.session({"n": 0})
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await settle()
    durable.save_snapshot = slow_save  # type: ignore[method-assign]
    actor.checkpoints.soon(actor.state, "timer")  # type: ignore[arg-type]  # a periodic one, now in flight
    actor.tell(PauseRequest(a, 2))
    await settle()
    assert a.of("ack")[-1] == {"t": "ack", "id": 2, "version": 1}  # not held by the durable write
    _, stored = tiers(env)
    assert stored is not None and stored.status == "active"  # the periodic one has not landed yet
    release.set()
    await settle()
    volatile, stored = tiers(env)
    assert stored is not None and (stored.version, stored.status) == (1, "paused")
    assert volatile is None  # the durable tier caught up: the volatile copy is let go


async def test_an_in_process_journal_is_trimmed_inline_by_the_pause(nursery: trio.Nursery) -> None:
    """No I/O to wait for, so no task of its own: the journal is trimmed when the pause's ack leaves."""
    fences = Fences()
    journal = MemoryJournal(fences)
    storage = Storage(MemorySessionStore(fences), MemorySnapshotStore(fences), journal, MemoryEventSink())
    registry = make_registry(storage, CONFIG)
    await nursery.start(registry.run)
    sid = (await registry.create_session("alice", "demo", {}, {"n": 0})).id
    a = FakeLink("a")
    actor = await registry.tell(sid, Attach(a, "web", None))
    await settle()
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await settle()
    held_at_ack: list[int] = []
    deliver = a.deliver

    def watch(out: Any) -> None:
        if out.frame.get("t") == "ack" and out.frame.get("id") == 2:
            held_at_ack.append(journal.session_bytes(sid))
        deliver(out)

    a.deliver = watch  # type: ignore[method-assign]
    assert journal.session_bytes(sid) > 0
    actor.tell(PauseRequest(a, 2))
    await settle()
    assert held_at_ack == [0]


async def start_volatile_env(nursery: trio.Nursery, config: ActorConfig = CONFIG) -> Env:
    """The embedded default's snapshots: a volatile tier in this process's memory over a durable one (here in
    memory too, standing in for the SQLite file), as storage.production assembles them."""
    fences = Fences()
    journal = CountingJournal()
    journal.inner = MemoryJournal(fences)
    snapshots = LayeredSnapshotStore(VolatileSnapshotStore(fences), MemorySnapshotStore(fences))
    storage = Storage(MemorySessionStore(fences), snapshots, journal, MemoryEventSink())
    registry = make_registry(storage, config)
    await nursery.start(registry.run)
    return Env(registry, storage, journal)


def tiers(env: Env) -> tuple[Snapshot | None, Snapshot | None]:
    """(volatile, durable) snapshots of the one session of `env`."""
    layered = env.storage.snapshots
    assert isinstance(layered, LayeredSnapshotStore)
    fast, durable = layered.fast, layered.durable
    assert isinstance(fast, VolatileSnapshotStore) and isinstance(durable, MemorySnapshotStore)
    (sid,) = durable._snapshots or fast._snapshots
    return fast._snapshots.get(sid), durable._snapshots.get(sid)


async def test_a_volatile_claim_survives_an_actor_crash_and_the_durable_tier_catches_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_volatile_env(nursery)
    sid = await env.session({"n": 0})
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, a)
    await env.attach(sid, b)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    actor.tell(PauseRequest(a, 2))
    await settle()
    actor.tell(ClaimRequest(b, 1))
    await settle()
    assert b.of("ack") == [{"t": "ack", "id": 1, "version": 1}]
    volatile, durable = tiers(env)
    assert volatile is not None and (volatile.status, volatile.active) == ("active", "b")
    assert durable is not None and (durable.status, durable.active) == ("paused", None)  # the pause's
    assert actor.state is not None and actor.checkpoints.held_bytes(actor.state) == actor.state.approx_bytes > 0
    before = actor.budget_bytes  # the volatile copy counts

    actor.tell(Crash())
    await settle()
    described = await env.state(sid)
    assert (described["status"], described["active"], described["version"]) == ("active", "b", 1)
    actor.tell(ClaimRequest(b, 1))  # the claim's answer survived too
    await settle()
    assert b.of("ack")[-1] == {"t": "ack", "id": 1, "version": 1}

    # No change since the pause, but the durable tier is behind: the periodic checkpoint catches it up, and the
    # volatile copy is let go.
    await trio.sleep(CONFIG.checkpoint_every_s * 1.2)
    await settle()
    volatile, durable = tiers(env)
    assert volatile is None
    assert durable is not None and (durable.status, durable.active, durable.version) == ("active", "b", 1)
    assert actor.budget_bytes < before
    stored = await env.storage.sessions.get_session(sid)
    assert stored is not None and (stored.status, stored.active) == ("active", "b")


async def test_a_volatile_claim_is_written_durably_on_passivation(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_volatile_env(nursery, replace(CONFIG, checkpoint_every_s=3600.0))
    sid = await env.session({"n": 0})
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    actor.tell(PauseRequest(a, 1))
    actor.tell(ClaimRequest(a, 2))
    actor.tell(Detach(a))
    with trio.fail_after(CONFIG.passivate_after_s + 10):
        await actor.stopped.wait()
    volatile, durable = tiers(env)
    assert volatile is None
    assert durable is not None and (durable.status, durable.active) == ("active", "a")
    described = await env.state(sid)  # re-activates from the durable tier
    assert (described["status"], described["active"]) == ("active", "a")


async def test_a_restart_from_the_volatile_tier_still_owes_a_durable_checkpoint(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A fresh actor (the last one's passivation failed to write) that loads the volatile snapshot knows the
    durable tier is behind, though its version is not."""
    env = await start_volatile_env(nursery)
    sid = await env.session({"n": 0})
    layered = env.storage.snapshots
    assert isinstance(layered, LayeredSnapshotStore)
    await layered.fast.save_snapshot(
        Snapshot(session_id=sid, version=0, state={"n": 0}, status="active", active="b", acked={"b": [[1, 0]]})
    )
    actor = await env.attach(sid, FakeLink("a"))
    assert actor.state is not None and actor.state.active == "b"
    await trio.sleep(CONFIG.checkpoint_every_s * 1.2)
    await settle()
    volatile, durable = tiers(env)
    assert volatile is None and durable is not None and durable.active == "b"


# ---- supervision --------------------------------------------------------------------------------------


async def test_crash_restarts_from_snapshot_and_journal(env: Env) -> None:
    sid, other = await env.session({"n": 0}), await env.session({"o": 1})
    a, b, c = FakeLink("a"), FakeLink("b"), FakeLink("c")
    actor = await env.attach(sid, a)
    await env.attach(sid, b)
    other_actor = await env.attach(other, c)
    for op_id in range(1, 4):
        actor.tell(ChangeRequest(a, op_id, inc(), None))
        await settle()
    await env.handoff(sid, "b")  # a snapshot at version 3
    actor.tell(ChangeRequest(a, 4, inc(10), None))
    await settle()
    acked = a.of("ack")[-1]["version"]
    actor.tell(Crash())
    await settle()
    assert env.registry.lookup(sid) is actor and not actor.failed
    described = await env.state(sid)
    assert (described["state"], described["version"], described["active"]) == ({"n": 13}, acked, "b")
    for link in (a, b):
        # The fresh welcome replaced every queued frame it supersedes; acks stay, in order before it.
        welcomes = link.of("welcome")
        assert welcomes[-1]["mode"] == "full" and welcomes[-1]["state"] == {"n": 13} and welcomes[-1]["version"] == 4
        assert {f["t"] for f in link.queue} <= {"welcome", "ack"} and link.queue[-1]["t"] == "welcome"
    assert [f["id"] for f in a.of("ack")] == [1, 2, 3, 4]
    assert len(c.of("welcome")) == 1 and env.registry.lookup(other) is other_actor
    assert (await env.state(other))["state"] == {"o": 1}
    # The restarted actor keeps serving, remembers acked ids, and keeps the order.
    actor.tell(ChangeRequest(a, 4, inc(10), None))
    actor.tell(ChangeRequest(a, 5, inc(), None))
    await settle()
    assert a.of("ack")[-2:] == [{"t": "ack", "id": 4, "version": 4}, {"t": "ack", "id": 5, "version": 5}]
    assert replay(b).state == {"n": 14}
    assert [key for key, _ in env.storage.events.events].count("actor.crashed") == 1  # type: ignore[attr-defined]


async def test_crash_twice_without_a_checkpoint_replays_the_journal_once(env: Env) -> None:
    """Restore must not replay the journal onto the stored snapshot object itself (memory storage
    hands back the same object): the next restart would apply those changes a second time."""
    sid = await env.session({"n": 0})
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    for op_id in range(1, 4):
        actor.tell(ChangeRequest(a, op_id, inc(), None))
    await settle()
    for _ in range(2):
        actor.tell(Crash())
        await settle()
        described = await env.state(sid)
        assert (described["state"], described["version"]) == ({"n": 3}, 3)


async def test_restart_budget_spent_closes_links_with_1011(nursery: trio.Nursery) -> None:
    env = await start_env(nursery, ActorConfig(max_restarts=2, restart_window_s=60.0))
    sid = await env.session()
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    for _ in range(2):
        actor.tell(Crash())
        await settle()
        assert a.closed is None
    actor.tell(Crash())
    await settle()
    assert actor.failed and actor.stopped.is_set()
    assert a.closed is not None and a.closed[0] == 1011
    assert env.registry.lookup(sid) is None


# ---- passivation and shutdown -------------------------------------------------------------------------


async def test_idle_actor_passivates_with_a_final_checkpoint(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery)
    sid = await env.session({"n": 0})
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    actor.tell(Detach(a))
    await trio.sleep(1)
    assert env.registry.lookup(sid) is actor
    with trio.fail_after(CONFIG.passivate_after_s + 10):
        await actor.stopped.wait()
    assert env.registry.lookup(sid) is None
    snapshot = await env.storage.snapshots.load_snapshot(sid)
    assert snapshot is not None and (snapshot.version, snapshot.state) == (1, {"n": 1})
    described = await env.state(sid)  # re-activates
    assert (described["state"], described["version"]) == ({"n": 1}, 1)
    assert env.registry.lookup(sid) is not actor


async def test_actor_with_devices_does_not_passivate(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery)
    sid = await env.session()
    actor = await env.attach(sid, FakeLink("a"))
    await trio.sleep(CONFIG.passivate_after_s * 5)
    assert env.registry.lookup(sid) is actor and not actor.stopped.is_set()


async def test_periodic_checkpoint(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    env = await start_env(nursery)
    sid = await env.session()
    a = FakeLink("a")
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await trio.sleep(CONFIG.checkpoint_every_s + 1)
    snapshot = await env.storage.snapshots.load_snapshot(sid)
    assert snapshot is not None and snapshot.version == 1
    assert await env.storage.journal.read_after(sid, 0) == []  # trimmed


async def test_shutdown_checkpoints_and_closes_1001(nursery: trio.Nursery) -> None:
    env = await start_env(nursery)
    sid1, sid2 = await env.session(), await env.session()
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid1, a)
    await env.attach(sid2, b)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await settle()
    await env.registry.shutdown(5.0)
    assert a.closed is not None and a.closed[0] == 1001
    assert b.closed is not None and b.closed[0] == 1001
    snapshot = await env.storage.snapshots.load_snapshot(sid1)
    assert snapshot is not None and snapshot.version == 1
    assert env.registry.live() == []
    with pytest.raises(Exception, match="shutting down"):
        await env.registry.get(sid1)


# ---- backpressure and replacement ---------------------------------------------------------------------


async def test_slow_consumer_gets_one_resync_then_4008(env: Env) -> None:
    sid = await env.session({"n": 0})
    slow = FakeLink("slow", limit=2)
    await env.attach(sid, slow)  # queue: [welcome]
    await env.change(sid, inc(), None)  # queue: [welcome, patch 1]
    await env.change(sid, inc(), None)  # overflow: replaced by one fresh welcome
    assert slow.resyncs == 1 and slow.resyncing and slow.closed is None
    assert [(f["t"], f["version"]) for f in slow.queue] == [("welcome", 2)]
    assert slow.queue[0]["mode"] == "full" and slow.queue[0]["state"] == {"n": 2}
    await env.change(sid, inc(), None)  # fits: [welcome, patch 3]
    await env.change(sid, inc(), None)  # overflows again before the welcome was written
    assert slow.closed is not None and slow.closed[0] == 4008
    assert replay(slow).version == 3


async def test_slow_consumer_that_caught_up_is_resynced_again_not_closed(env: Env) -> None:
    sid = await env.session({"n": 0})
    slow = FakeLink("slow", limit=1)
    await env.attach(sid, slow)
    await env.change(sid, inc(), None)
    assert slow.resyncs == 1
    slow.flush()  # the welcome was written
    await env.change(sid, inc(), None)
    await env.change(sid, inc(), None)
    assert slow.resyncs == 2 and slow.closed is None
    assert replay(slow).state == {"n": 3}


async def test_replaced_link_is_closed_4009(env: Env) -> None:
    sid = await env.session()
    old, new, other = FakeLink("a"), FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, old)
    await env.attach(sid, other)
    await env.attach(sid, new)
    assert old.closed is not None and old.closed[0] == 4009
    assert new.of("welcome") and new.closed is None
    actor.tell(Detach(old))  # the old connection's goodbye must not remove the new one
    actor.tell(ChangeRequest(old, 1, inc(), None))  # nor may it still write
    await settle()
    described = await env.state(sid)
    assert [d["device"] for d in described["devices"]] == ["a", "b"] and described["version"] == 0
    await env.change(sid, inc(), None)
    assert new.of("patch") and not old.of("patch")


# ---- regressions: per-turn delivery rules and shutdown -------------------------------------------------


async def test_a_device_attached_in_a_turn_sees_nothing_before_its_welcome(env: Env) -> None:
    sid = await env.session({"n": 0})
    a, b = FakeLink("a"), FakeLink("b")
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    actor.tell(Attach(b, "web", None))  # same turn, after the change
    await settle()
    assert b.frames[0]["t"] == "welcome"
    assert b.of("patch") == []


async def test_resync_in_a_group_commit_turn_sends_no_stale_patches(env: Env) -> None:
    sid = await env.session({"n": 0})
    a, slow = FakeLink("a"), FakeLink("slow", limit=3)
    actor = await env.attach(sid, a)
    await env.attach(sid, slow)  # [welcome 0]
    await env.change(sid, inc(), None)  # [welcome 0, patch 1]
    for op_id in range(1, 4):  # one turn: versions 2, 3, 4; patch 2 fits, patch 3 overflows
        actor.tell(ChangeRequest(a, op_id, inc(), None))
    await settle()
    assert slow.resyncs == 1
    replica = replay(slow)  # raises on a patch that is not the next version
    assert replica.version == 4


async def test_asks_queued_behind_a_shutdown_are_failed_at_once(env: Env) -> None:
    sid = await env.session()
    actor = await env.registry.get(sid)
    shutdown, change = Shutdown(), RestChange(inc(), None)
    actor.tell(shutdown)
    actor.tell(change)  # same turn, after the Shutdown
    with trio.fail_after(1):
        await shutdown.reply.wait()
        with pytest.raises(ActorUnavailable):
            await change.reply.wait()
