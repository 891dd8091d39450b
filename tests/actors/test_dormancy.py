"""Dormant actors: an idle actor gives its task back and keeps its state, devices, lease and alarms; the next
message starts a new task (issue 9: at most 6 KiB per idle actor, and a task is most of an actor's memory)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio
import trio.testing

from actors.messages import ChangeRequest, Crash, Detach
from actors.session_actor import SessionActor
from tests.actors.fakes import FakeLink
from tests.actors.test_session_actor import CONFIG, Env, inc, settle, start_env

DORMANT_AFTER = CONFIG.dormant_after_s
QUIET = dataclasses.replace(CONFIG, checkpoint_every_s=1000.0)  # no periodic checkpoint waking the actor


def actor_tasks(env: Env) -> int:
    """Tasks the registry hosts for actors (its timer heap's task is the one other child)."""
    nursery = env.registry._nursery
    assert nursery is not None
    return len(nursery.child_tasks) - 1


async def dormant_actor(env: Env, link: FakeLink) -> tuple[str, SessionActor]:
    sid = await env.session({"n": 0})
    actor = await env.attach(sid, link)
    assert not actor.dormant and actor_tasks(env) == 1
    await trio.sleep(DORMANT_AFTER + 0.5)
    assert actor.dormant and actor_tasks(env) == 0
    assert actor.statistics()["dormant"] is True  # the admin view says so
    return sid, actor


async def test_an_idle_actor_gives_its_task_back_and_the_next_message_wakes_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery, QUIET)
    a = FakeLink("a")
    sid, actor = await dormant_actor(env, a)
    for op_id in (1, 2):
        actor.tell(ChangeRequest(a, op_id, inc(), None))
        await settle()
        assert not actor.dormant and actor_tasks(env) == 1
        assert [f["id"] for f in a.of("ack")][-1] == op_id
        await trio.sleep(DORMANT_AFTER + 0.5)
        assert actor.dormant and actor_tasks(env) == 0
    assert (await env.state(sid))["state"] == {"n": 2}
    assert env.registry.lookup(sid) is actor  # the same actor throughout: nothing was reloaded


async def test_a_busy_actor_stays_awake(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    env = await start_env(nursery, QUIET)
    a = FakeLink("a")
    sid = await env.session({"n": 0})
    actor = await env.attach(sid, a)
    for op_id in range(1, 21):  # a change every half of the dormancy delay, for ten delays
        actor.tell(ChangeRequest(a, op_id, inc(), None))
        await trio.sleep(DORMANT_AFTER / 2)
        assert not actor.dormant
    assert len(a.of("ack")) == 20


async def test_a_dormant_actor_still_checkpoints_then_passivates(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery)
    a = FakeLink("a")
    sid = await env.session({"n": 0})
    actor = await env.attach(sid, a)
    actor.tell(ChangeRequest(a, 1, inc(), None))
    await trio.sleep(DORMANT_AFTER + 0.5)
    assert actor.dormant and await env.storage.snapshots.load_snapshot(sid) is not None
    assert (await env.storage.snapshots.load_snapshot(sid)).version == 0  # type: ignore[union-attr]
    await trio.sleep(CONFIG.checkpoint_every_s * 1.1 + DORMANT_AFTER)  # the periodic checkpoint wakes it
    snapshot = await env.storage.snapshots.load_snapshot(sid)
    assert snapshot is not None and (snapshot.version, snapshot.state) == (1, {"n": 1})
    assert actor.dormant and actor_tasks(env) == 0  # and it went back to sleep

    actor.tell(Detach(a))
    await trio.sleep(DORMANT_AFTER + 0.5)
    assert actor.dormant
    with trio.fail_after(CONFIG.passivate_after_s + 10):
        await actor.stopped.wait()
    assert env.registry.lookup(sid) is None and actor_tasks(env) == 0
    assert env.registry.leases.token_of(sid) is None


async def test_a_lease_lost_while_dormant_stops_the_actor(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery)
    a = FakeLink("a")
    sid, actor = await dormant_actor(env, a)
    actor.lease_lost()
    await settle()
    assert actor.stopped.is_set() and env.registry.lookup(sid) is None
    assert a.closed is not None and a.closed[0] == 1013


async def test_mail_that_arrives_while_the_task_unwinds_is_served(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await start_env(nursery, QUIET)
    a = FakeLink("a")
    sid = await env.session({"n": 0})
    actor = await env.attach(sid, a)
    original = SessionActor.fall_asleep
    late: list[bool] = []

    def fall_asleep_with_late_mail(self: SessionActor) -> bool:
        if not late:  # the first time: a message slips in after the serving loop decided to sleep
            self.tell(ChangeRequest(a, 1, inc(), None))
            late.append(original(self))
            return late[0]
        return original(self)

    monkeypatch.setattr(SessionActor, "fall_asleep", fall_asleep_with_late_mail)
    await trio.sleep(DORMANT_AFTER + 0.5)
    assert late == [False], late  # it stayed awake ...
    assert [f["id"] for f in a.of("ack")] == [1]  # ... and served the message
    await trio.sleep(DORMANT_AFTER + 0.5)
    assert actor.dormant and actor_tasks(env) == 0
    assert (await env.state(sid))["state"] == {"n": 1}


async def test_the_restart_budget_spans_dormant_spells(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_env(nursery, dataclasses.replace(QUIET, max_restarts=2))
    a = FakeLink("a")
    _, actor = await dormant_actor(env, a)
    for _ in range(2):
        actor.tell(Crash())
        await trio.sleep(DORMANT_AFTER + 0.5)
        assert actor.dormant and a.closed is None
    actor.tell(Crash())  # the third crash in the window, though each came to a fresh task
    await settle()
    assert actor.failed and actor.stopped.is_set()
    assert a.closed is not None and a.closed[0] == 1011


async def test_stopping_the_registry_ends_a_dormant_actor(autojump_clock: trio.testing.MockClock) -> None:
    state: dict[str, Any] = {}
    async with trio.open_nursery() as outer:
        env = await start_env(outer)
        a = FakeLink("a")
        sid, actor = await dormant_actor(env, a)
        assert env.registry.leases.token_of(sid) is not None
        state.update(env=env, sid=sid, actor=actor)
        outer.cancel_scope.cancel()  # no shutdown(): the registry's nursery is simply cancelled
    env, sid, actor = state["env"], state["sid"], state["actor"]
    assert actor.stopped.is_set() and not actor.dormant
    assert env.registry.leases.token_of(sid) is None
    assert env.registry.lookup(sid) is None
