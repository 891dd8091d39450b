"""Registry: activation on first use (once, even when raced), retirement, creation, shutdown."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from actors.config import ActorConfig
from actors.messages import ActorUnavailable, Attach, Crash, Describe, End, Outgoing, Overloaded, RestChange
from actors.registry import Registry, new_session_id
from actors.session_actor import SessionActor
from storage.memory import memory_storage
from storage.ports import Storage
from tests.actors.fakes import CountingJournal, FakeLink, make_registry

CONFIG = ActorConfig(mailbox_size=4, passivate_after_s=30.0, storage_timeout_s=2.0)


async def start(nursery: trio.Nursery, config: ActorConfig = CONFIG) -> tuple[Registry, Storage]:
    storage = memory_storage()
    registry = make_registry(storage, config)
    await nursery.start(registry.run)
    return registry, storage


def test_session_ids_are_url_safe_and_distinct() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 22 and all(c.isalnum() or c in "-_" for c in i) for i in ids)


async def test_create_session_stores_record_user_snapshot_and_event(nursery: trio.Nursery) -> None:
    registry, storage = await start(nursery)
    record = await registry.create_session("bob", "n", {"m": 1}, {"s": 2})
    assert await storage.sessions.get_session(record.id) == record
    assert (record.owner, record.status, record.version) == ("bob", "active", 0)
    assert "bob" in storage.sessions.users  # type: ignore[attr-defined]
    snapshot = await storage.snapshots.load_snapshot(record.id)
    assert snapshot is not None and (snapshot.version, snapshot.state) == (0, {"s": 2})
    key, body = storage.events.events[-1]  # type: ignore[attr-defined]
    assert key == "session.created" and body["session"] == record.id and body["owner"] == "bob"


async def test_concurrent_lookups_activate_once(nursery: trio.Nursery) -> None:
    registry, _ = await start(nursery)
    record = await registry.create_session("bob", "n", {}, {})
    found: list[SessionActor] = []

    async def lookup() -> None:
        found.append(await registry.get(record.id))

    async with trio.open_nursery() as inner:
        for _ in range(10):
            inner.start_soon(lookup)
    assert len(found) == 10 and len({id(a) for a in found}) == 1
    assert registry.live() == [found[0]]


async def test_lookup_of_a_retiring_actor_waits_for_a_fresh_one(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    registry, _ = await start(nursery)
    record = await registry.create_session("bob", "n", {}, {"n": 1})
    first = await registry.get(record.id)
    await trio.sleep(CONFIG.passivate_after_s + 1)
    assert first.stopped.is_set() and registry.lookup(record.id) is None
    second = await registry.get(record.id)
    assert second is not first and not second.stopped.is_set()


async def test_a_full_mailbox_is_overloaded_not_a_hang(nursery: trio.Nursery) -> None:
    registry, _ = await start(nursery)
    record = await registry.create_session("bob", "n", {}, {})
    actor = await registry.get(record.id)
    for _ in range(CONFIG.mailbox_size):  # the mailbox holds exactly mailbox_size, waiting reader or not
        actor.tell(Attach(FakeLink("a"), "web", None))
    with pytest.raises(Overloaded):
        actor.tell(Describe())
    await trio.testing.wait_all_tasks_blocked()
    assert actor.statistics()["messages_handled"] == CONFIG.mailbox_size


async def test_statistics(nursery: trio.Nursery) -> None:
    registry, _ = await start(nursery)
    record = await registry.create_session("bob", "n", {}, {})
    actor = await registry.tell(record.id, Attach(FakeLink("a"), "web", None))
    await trio.testing.wait_all_tasks_blocked()
    stats = actor.statistics()
    assert stats["session"] == record.id and stats["devices"] == ["a"] and stats["version"] == 0
    assert stats["mailbox_depth"] == 0 and stats["failed"] is False


async def test_tell_to_a_stopped_actor_is_unavailable(nursery: trio.Nursery) -> None:
    registry, _ = await start(nursery)
    record = await registry.create_session("bob", "n", {}, {})
    actor = await registry.get(record.id)
    await registry.ask(record.id, End())
    await actor.stopped.wait()
    with pytest.raises(ActorUnavailable):
        actor.tell(Describe())


async def test_shutdown_without_actors_returns(nursery: trio.Nursery) -> None:
    registry, _ = await start(nursery)
    with trio.fail_after(2):
        await registry.shutdown(1.0)
    with pytest.raises(ActorUnavailable):
        await registry.get("anything")


async def test_failed_session_marks_expire_and_are_bounded(nursery: trio.Nursery) -> None:
    """A failed session is refused for one restart window; the marks must not pile up for good (§5.5)."""
    from actors import registry as registry_module

    registry, _ = await start(nursery, ActorConfig(restart_window_s=0.05))
    registry._failed = {"old": trio.current_time() - 1, "live": trio.current_time() + 60}
    registry.forget_failures()
    assert registry._failed.keys() == {"live"}
    registry._failed = {f"s{i}": trio.current_time() + 60 for i in range(registry_module.MAX_FAILED + 5)}
    registry.forget_failures()
    assert len(registry._failed) == registry_module.MAX_FAILED and "s0" not in registry._failed


# ---- the memory budget (issue 8): everything an actor keeps in this process counts -----------------------------

BUDGET = ActorConfig(memory_budget_bytes=20_000, passivate_after_s=600.0, checkpoint_every_s=600.0)


async def overwrite(registry: Registry, session_id: str, times: int, size: int = 1000) -> None:
    """`times` REST changes to one key: the state stays about `size` bytes, the history grows."""
    for i in range(times):
        await registry.ask(session_id, RestChange([{"op": "set", "path": "/k", "value": f"{i}" + "x" * size}], None))


async def restarted(actor: SessionActor) -> None:
    """Crash the actor: it restores from snapshot + journal, with an exact size for its state (live, the size is
    a running estimate that only grows) and the journal's changes in its replay window."""
    before = actor.state
    actor.tell(Crash())
    with trio.fail_after(5):
        while actor.state is before or actor.state is None:
            await trio.sleep(0.01)  # polled: the restart is the actor's own
    await trio.testing.wait_all_tasks_blocked()


async def passivated(actor: SessionActor) -> None:
    with trio.fail_after(5):
        await actor.stopped.wait()


async def test_the_budget_counts_the_replay_window(nursery: trio.Nursery) -> None:
    """A small state with a large replay window is over the budget: passivated (the journal does not count here:
    this one is not in-process memory the registry can see)."""
    storage = dataclasses.replace(memory_storage(), journal=CountingJournal())
    registry = make_registry(storage, BUDGET)
    await nursery.start(registry.run)
    record = await registry.create_session("bob", "n", {}, {})
    actor = await registry.get(record.id)
    await overwrite(registry, record.id, 40)
    await restarted(actor)
    assert actor.state is not None and actor.state.approx_bytes < 2_000 < 20_000 < actor.state.replay_bytes
    assert registry.enforce_memory_budget() == 1
    await passivated(actor)


async def test_the_budget_counts_the_send_queues_of_local_devices(nursery: trio.Nursery) -> None:
    """Frames queued for a device that does not read are this pod's memory: they push the total over the
    budget, and an idle actor is passivated (the connected one never is)."""
    registry, _ = await start(nursery, BUDGET)
    busy, idle = [await registry.create_session("bob", "n", {}, {"n": 0}) for _ in range(2)]
    reader = FakeLink("slow")
    connected = await registry.tell(busy.id, Attach(reader, "web", None))
    other = await registry.get(idle.id)
    await trio.testing.wait_all_tasks_blocked()
    assert registry.enforce_memory_budget() == 0
    reader.deliver(Outgoing({"t": "presence", "devices": [], "active": None, "pad": "x" * 30_000}))
    assert connected.budget_bytes > reader.queued_bytes > 30_000 > connected.state_bytes
    assert registry.enforce_memory_budget() == 1
    await passivated(other)
    assert not connected.stopped.is_set()


async def test_the_budget_counts_the_in_memory_journal(nursery: trio.Nursery) -> None:
    """The embedded store's journal holds every change since the last checkpoint in this process: counted."""
    registry, storage = await start(nursery, dataclasses.replace(BUDGET, replay_window=1))
    record = await registry.create_session("bob", "n", {}, {})
    actor = await registry.get(record.id)
    await overwrite(registry, record.id, 40)
    await restarted(actor)
    assert actor.state is not None and actor.state_bytes < 4_000
    assert storage.journal.session_bytes(record.id) > 20_000  # type: ignore[attr-defined]
    assert registry.enforce_memory_budget() == 1
    await passivated(actor)
    assert storage.journal.session_bytes(record.id) == 0  # type: ignore[attr-defined]  # its checkpoint trimmed it
