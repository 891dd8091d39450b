"""SessionState, the pure decision logic of a session (DESIGN §2, §3, §5): commands in, effects out."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import orjson
import pytest

from actors.session import (
    ACKED_IN_SNAPSHOT,
    REST_DEVICE,
    Accepted,
    Answers,
    Broadcast,
    Checkpoint,
    Close,
    Effect,
    Journal,
    Publish,
    Rejected,
    Send,
    SessionState,
    Stop,
    rest_key,
)
from storage.ports import Change, SessionRecord, Snapshot

JSON = Any
T = 1000.0


def record(status: str = "active") -> SessionRecord:
    return SessionRecord("s1", "alice", "demo", {"k": "v"}, status, 0, None, 1.0, 1.0)


def new_state(
    state: dict[str, JSON] | None = None, *, replay_window: int = 1000, max_state_bytes: int = 1 << 20
) -> SessionState:
    snap = Snapshot("s1", 0, state if state is not None else {}, "active", None)
    return SessionState.restore(record(), snap, [], replay_window=replay_window, max_state_bytes=max_state_bytes)


def with_devices(*devices: str, **kwargs: Any) -> SessionState:
    s = new_state(**kwargs)
    for device in devices:
        s.join(device, "web", None, T)
    s.take_effects()
    return s


def frames_to(effects: list[Effect], device: str) -> list[dict[str, JSON]]:
    """The frames a device would receive from these effects (Send to it, Broadcast not excluding it)."""
    out = []
    for e in effects:
        if (isinstance(e, Send) and e.device == device) or (isinstance(e, Broadcast) and e.exclude != device):
            out.append(e.frame)
    return out


def sync_checkpoint_at(effects: list[Effect]) -> int:
    return next(i for i, e in enumerate(effects) if isinstance(e, Checkpoint) and e.sync)


def inc(path: str = "/n", by: int = 1) -> list[dict[str, JSON]]:
    return [{"op": "inc", "path": path, "by": by}]


# ---- changes ------------------------------------------------------------------------------------------


def test_each_change_is_one_version_step() -> None:
    s = with_devices("a")
    assert s.change("a", 1, inc(), None, T) == Accepted(1)
    assert s.change("a", 2, [*inc(), *inc("/m")], None, T) == Accepted(2)
    assert s.change(REST_DEVICE, None, inc(), None, T + 1) == Accepted(3)
    assert (s.version, s.state) == (3, {"n": 3, "m": 1})
    assert s.updated_at == T + 1


def test_change_acks_sender_and_patches_others_after_the_journal() -> None:
    s = with_devices("a", "b")
    ops = [{"op": "set", "path": "/x", "value": {"y": 1}}]
    s.change("a", 7, ops, None, T)
    effects = s.take_effects()
    assert effects == [
        Journal(Change(1, "a", 7, ops)),
        Send("a", {"t": "ack", "id": 7, "version": 1}),
        Broadcast({"t": "patch", "version": 1, "device": "a", "ops": ops}, exclude="a"),
    ]
    assert frames_to(effects, "b") == [{"t": "patch", "version": 1, "device": "a", "ops": ops}]
    assert frames_to(effects, "a") == [{"t": "ack", "id": 7, "version": 1}]


def test_journal_precedes_every_send_in_a_sequence_of_changes() -> None:
    s = with_devices("a", "b")
    for i in range(1, 4):
        s.change("a" if i % 2 else "b", i, inc(), None, T)
    effects = s.take_effects()
    for index, effect in enumerate(effects):
        if isinstance(effect, Send | Broadcast) and effect.frame["t"] in ("ack", "patch"):
            version = effect.frame["version"]
            journaled = [e.change.version for e in effects[:index] if isinstance(e, Journal)]
            assert version in journaled


def test_rest_change_is_not_acked_but_broadcast_to_all() -> None:
    s = with_devices("a", "b")
    assert s.change(REST_DEVICE, None, inc(), None, T) == Accepted(1)
    effects = s.take_effects()
    assert [type(e) for e in effects] == [Journal, Broadcast]
    assert (
        frames_to(effects, "a")
        == frames_to(effects, "b")
        == [{"t": "patch", "version": 1, "device": REST_DEVICE, "ops": inc()}]
    )


def test_retransmit_gets_the_original_ack_and_is_not_applied_again() -> None:
    s = with_devices("a", "b")
    s.change("a", 1, inc(), None, T)
    s.change("b", 1, inc(), None, T)  # same id from another device is another change
    s.take_effects()
    assert s.change("a", 1, inc(), None, T) == Accepted(1)
    assert s.take_effects() == [Send("a", {"t": "ack", "id": 1, "version": 1})]
    assert (s.version, s.state) == (2, {"n": 2})


def test_base_conflict_carries_the_current_version() -> None:
    s = with_devices("a")
    s.change("a", 1, inc(), None, T)
    s.take_effects()
    result = s.change("a", 2, inc(), 0, T)
    assert result == Rejected("conflict", result.message, 1)
    assert s.take_effects() == [
        Send("a", {"t": "error", "id": 2, "code": "conflict", "message": result.message, "version": 1})
    ]
    assert s.change("a", 3, inc(), 1, T) == Accepted(2)


@pytest.mark.parametrize(
    "ops, code",
    [
        ([{"op": "inc", "path": "/n"}, {"op": "inc", "path": "/s"}], "invalid_op"),
        ([{"op": "set", "path": "/s/x", "value": 1}], "invalid_op"),
        ([{"op": "nope", "path": "/n"}], "invalid_op"),
        ([{"op": "inc", "path": "/n", "by": 1 << 70}], "invalid_op"),  # not encodable: a REST body can carry it
        ([{"op": "del", "path": "/n"}, {"op": "set", "path": "/big", "value": "x" * 300}], "too_large"),
    ],
)
def test_rejected_changes_change_nothing(ops: list[dict[str, JSON]], code: str) -> None:
    s = with_devices("a", "b", max_state_bytes=200)
    s.change("a", 1, [{"op": "set", "path": "/s", "value": "str"}, *inc()], None, T)
    s.take_effects()
    before = (orjson.dumps(s.state), s.version, s.updated_at, orjson.dumps(s.snapshot().acked))
    result = s.change("a", 2, ops, None, T + 5)
    assert isinstance(result, Rejected) and result.code == code and result.version == 1
    assert (orjson.dumps(s.state), s.version, s.updated_at, orjson.dumps(s.snapshot().acked)) == before
    effects = s.take_effects()
    assert len(effects) == 1 and isinstance(effects[0], Send) and effects[0].device == "a"
    assert effects[0].frame["t"] == "error" and effects[0].frame["code"] == code and effects[0].frame["id"] == 2
    assert s.change("a", 2, inc(), None, T) == Accepted(2)  # a refused id is not remembered as acked


def test_rest_rejection_has_no_frames() -> None:
    s = with_devices("a")
    assert isinstance(s.change(REST_DEVICE, None, [{"op": "x", "path": ""}], None, T), Rejected)
    assert s.take_effects() == []


def test_state_limit_counts_the_whole_state_not_only_the_change() -> None:
    s = with_devices("a", max_state_bytes=100)
    for i in range(4):  # 4 x '"kN":"x..x",' = 93 bytes
        assert isinstance(s.change("a", i, [{"op": "set", "path": f"/k{i}", "value": "x" * 15}], None, T), Accepted)
    result = s.change("a", 9, [{"op": "set", "path": "/k9", "value": "x" * 15}], None, T)
    assert isinstance(result, Rejected) and result.code == "too_large"
    assert len(orjson.dumps(s.state)) <= 100
    assert isinstance(s.change("a", 10, [{"op": "del", "path": "/k0"}], None, T), Accepted)
    assert isinstance(s.change("a", 11, [{"op": "set", "path": "/k9", "value": "x" * 15}], None, T), Accepted)


# ---- joining ------------------------------------------------------------------------------------------


def test_join_sends_full_welcome_and_presence_to_others() -> None:
    s = with_devices("a")
    s.change("a", 1, inc(), None, T)
    s.take_effects()
    s.join("b", "ios", None, T)
    effects = s.take_effects()
    devices = [{"device": "a", "kind": "web"}, {"device": "b", "kind": "ios"}]
    assert effects[0] == Send(
        "b",
        {
            "t": "welcome",
            "session": "s1",
            "device": "b",
            "epoch": s.epoch,
            "version": 1,
            "active": None,
            "devices": devices,
            "mode": "full",
            "state": {"n": 1},
        },
        opens=True,
    )
    assert effects[1] == Broadcast({"t": "presence", "devices": devices, "active": None}, exclude="b")
    assert effects[2] == Publish("device.joined", {"device": "b", "kind": "ios"})


def test_welcome_state_is_a_copy_of_that_moment() -> None:
    s = with_devices("a")
    s.join("b", "web", None, T)
    s.change("a", 1, [{"op": "set", "path": "/x", "value": 1}], None, T)  # same turn, after the join
    welcome = s.take_effects()[0]
    assert isinstance(welcome, Send) and welcome.frame["version"] == 0
    assert welcome.frame["state"] == {}


def test_welcome_resume_at_current_version_is_an_empty_replay() -> None:
    s = with_devices("a")
    for i in range(3):
        s.change("a", i, inc(), None, T)
    frame = s.welcome("b", 3)
    assert (frame["mode"], frame["patches"], frame["version"]) == ("replay", [], 3)
    assert "state" not in frame


def test_welcome_replays_the_missing_patches() -> None:
    s = with_devices("a", replay_window=5)
    for i in range(1, 9):
        s.change("a", i, inc(by=i), None, T)
    frame = s.welcome("b", 5)
    assert frame["mode"] == "replay"
    assert [p["version"] for p in frame["patches"]] == [6, 7, 8]
    assert [p["ops"] for p in frame["patches"]] == [inc(by=6), inc(by=7), inc(by=8)]
    assert [p["version"] for p in s.welcome("b", 3)["patches"]] == [4, 5, 6, 7, 8]  # exactly the window


@pytest.mark.parametrize("resume", [0, 2, 9, 100])
def test_welcome_beyond_the_window_or_ahead_is_full(resume: int) -> None:
    s = with_devices("a", replay_window=5)
    for i in range(1, 9):
        s.change("a", i, inc(), None, T)
    frame = s.welcome("b", resume)
    assert frame["mode"] == "full" and frame["state"] == {"n": 8} and frame["version"] == 8


def test_join_with_resume_sends_replay() -> None:
    s = with_devices("a")
    s.change("a", 1, inc(), None, T)
    s.change("a", 2, inc(), None, T)
    s.take_effects()
    s.join("b", "web", 1, T, s.epoch)
    welcome = s.take_effects()[0]
    assert isinstance(welcome, Send)
    assert welcome.frame["mode"] == "replay" and [p["version"] for p in welcome.frame["patches"]] == [2]


def test_resume_from_another_epoch_gets_the_full_state() -> None:
    """Versions of another incarnation (e.g. before a crash that lost the journal) may repeat with other contents."""
    s = with_devices("a")
    s.change("a", 1, inc(), None, T)
    s.change("a", 2, inc(), None, T)
    s.take_effects()
    for epoch in (None, "older-incarnation"):
        s.join("b", "web", 1, T, epoch)
        welcome = s.take_effects()[0]
        assert isinstance(welcome, Send) and welcome.frame["mode"] == "full" and welcome.frame["state"] == {"n": 2}


def test_leave_broadcasts_presence_once() -> None:
    s = with_devices("a", "b")
    s.leave("b", T)
    assert s.take_effects() == [
        Broadcast({"t": "presence", "devices": [{"device": "a", "kind": "web"}], "active": None}),
        Publish("device.left", {"device": "b"}),
    ]
    s.leave("b", T)
    assert s.take_effects() == []


# ---- handoff ------------------------------------------------------------------------------------------


def test_claim_makes_active_with_sync_checkpoint_before_the_handoff_broadcast() -> None:
    s = with_devices("a", "b")
    s.change("a", 1, inc(), None, T)
    s.take_effects()
    assert s.claim("b", 5, T) == Accepted(1, "b")
    effects = s.take_effects()
    assert (s.active, s.status) == ("b", "active")
    checkpoint = sync_checkpoint_at(effects)
    handoff = effects.index(Broadcast({"t": "handoff", "active": "b", "version": 1}))
    assert checkpoint < handoff
    assert Send("b", {"t": "ack", "id": 5, "version": 1}) in effects
    assert Publish("session.handoff", {"from": None, "to": "b", "version": 1}) in effects


def test_rest_handoff_has_no_ack() -> None:
    s = with_devices("a")
    assert s.claim("a", None, T) == Accepted(0, "a")
    assert not any(isinstance(e, Send) for e in s.take_effects())


def test_pause_only_by_the_active_device() -> None:
    s = with_devices("a", "b")
    s.claim("a", 1, T)
    s.take_effects()
    result = s.pause("b", 2, T)
    assert isinstance(result, Rejected) and result.code == "conflict"
    assert (s.active, s.status) == ("a", "active")
    assert [type(e) for e in s.take_effects()] == [Send]
    assert s.pause("a", 3, T) == Accepted(0, None)
    assert (s.active, s.status) == (None, "paused")
    effects = s.take_effects()
    assert sync_checkpoint_at(effects) < effects.index(Broadcast({"t": "handoff", "active": None, "version": 0}))
    assert Send("a", {"t": "ack", "id": 3, "version": 0}) in effects


def test_pause_when_none_is_active_is_allowed() -> None:
    s = with_devices("a")
    assert s.pause("a", 1, T) == Accepted(0, None)
    assert s.status == "paused"
    assert s.claim("a", 2, T) == Accepted(0, "a")
    assert s.status == "active"


def test_changes_are_accepted_while_paused() -> None:
    s = with_devices("a")
    s.pause("a", 1, T)
    assert s.change("a", 2, inc(), None, T) == Accepted(1)


# ---- ending -------------------------------------------------------------------------------------------


def test_end_broadcasts_ended_closes_4010_and_stops() -> None:
    s = with_devices("a", "b")
    s.end(T)
    effects = s.take_effects()
    assert s.status == "ended"
    assert effects[0] == Broadcast({"t": "ended"})
    assert effects[1] == Close(4010, "session ended")
    assert isinstance(effects[-1], Stop)
    for request in (
        lambda: s.change("a", 1, inc(), None, T),
        lambda: s.claim("a", 2, T),
        lambda: s.pause("a", 3, T),
    ):
        result = request()
        assert isinstance(result, Rejected) and result.code == "not_found"
    assert s.status == "ended" and s.version == 0


# ---- snapshots and restore ----------------------------------------------------------------------------


def _journal(effects: list[Effect]) -> list[Change]:
    return [e.change for e in effects if isinstance(e, Journal)]


def _same(a: SessionState, b: SessionState) -> None:
    assert orjson.dumps(a.state) == orjson.dumps(b.state)
    assert (a.version, a.status, a.active) == (b.version, b.status, b.active)
    assert a.acked == b.acked
    assert list(a.replay)[-len(b.replay) :] == list(b.replay) or not b.replay


def test_snapshot_is_a_deep_copy() -> None:
    s = with_devices("a")
    s.change("a", 1, [{"op": "set", "path": "/x", "value": {"y": [1]}}], None, T)
    snap = s.snapshot()
    s.change("a", 2, [{"op": "set", "path": "/x/z", "value": 2}], None, T)
    s.state["x"]["y"].append(2)
    assert snap.state == {"x": {"y": [1]}} and snap.version == 1
    assert snap.acked == {"a": [(1, 1)]}


def test_a_snapshot_read_back_from_json_restores_the_same_answers() -> None:
    """The actor's snapshot holds its idempotency pairs as tuples; a store writes them as JSON arrays and reads
    lists back. Both restore the same answers, and the JSON is the same bytes as with lists."""
    s = with_devices("a", "b")
    for i in range(1, 6):
        s.change("a" if i % 2 else "b", i, inc(), None, T)
    s.take_effects()
    snap = s.snapshot()
    raw = orjson.dumps(snap)
    assert raw == orjson.dumps({**orjson.loads(raw), "acked": {d: [list(p) for p in v] for d, v in snap.acked.items()}})
    back = Snapshot(**orjson.loads(raw))
    assert all(type(pair) is list for pairs in back.acked.values() for pair in pairs)
    live, from_json = SessionState.restore(s.record(), snap, []), SessionState.restore(s.record(), back, [])
    assert from_json.acked == live.acked and from_json.high_water == live.high_water
    assert from_json.change("b", 4, inc(), None, T) == Accepted(4)  # a retransmit: answered, not applied again
    assert from_json.version == 5


@pytest.mark.parametrize("snap_at", [0, 2, 4, 6])
@pytest.mark.parametrize("overlap", [False, True])
def test_restore_from_snapshot_and_journal_equals_live(snap_at: int, overlap: bool) -> None:
    s = with_devices("a", "b")
    s.claim("b", None, T)  # handoff is not journaled: its sync Checkpoint makes every later snapshot carry it
    journal: list[Change] = []
    snapshots = {0: s.snapshot()}
    for i in range(1, 7):
        device = "a" if i % 2 else "b"
        s.change(device, i, [*inc(), {"op": "set", "path": f"/k{i}", "value": {"i": i}}], None, T)
        journal += _journal(s.take_effects())
        snapshots[i] = s.snapshot()
    snap = snapshots[snap_at]
    after = journal if overlap else [c for c in journal if c.version > snap.version]
    restored = SessionState.restore(s.record(), snap, after)
    _same(s, restored)
    assert restored.checkpointed_version == snap_at
    # The restored state answers a retransmit exactly like the live one.
    assert restored.change("a", 5, inc(), None, T) == Accepted(5)
    assert restored.version == 6


def test_answers_pairs_newest_n_oldest_first() -> None:
    answers = Answers([(i, 10 * i) for i in range(1, 6)])
    assert answers.pairs() == [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]
    assert answers.pairs(2) == [(4, 40), (5, 50)]
    assert answers.pairs(9) == answers.pairs()
    assert answers.pairs(0) == []


def test_old_op_ids_are_answered_not_applied_after_a_restore() -> None:
    """Issue 8 review: a snapshot keeps only the newest ACKED_IN_SNAPSHOT op ids per device. An older id (a
    client retransmitting a long backlog after a restart) is still at or below the device's high-water mark, so
    it is acked and not applied again. Its exact version is kept only for the newest ids; an older one is acked
    with the version of the next id kept (an upper bound, never below its own)."""
    s = with_devices("a", "b")
    sent = 2 * ACKED_IN_SNAPSHOT + 10
    for op_id in range(1, sent + 1):
        s.change("a", op_id, inc(), None, T)
        s.change("b", op_id, inc("/m"), None, T)  # interleaved: a's op id n was applied at version 2n - 1
    snap = s.snapshot()
    s.change("a", sent + 1, inc(), None, T)  # after the snapshot: only in the journal
    journal = _journal(s.take_effects())
    restored = SessionState.restore(s.record(), snap, journal)
    assert len(snap.acked["a"]) == ACKED_IN_SNAPSHOT < sent
    version, state = restored.version, orjson.loads(orjson.dumps(restored.state))
    assert (version, state) == (2 * sent + 1, {"n": sent + 1, "m": sent})
    oldest_kept = sent - ACKED_IN_SNAPSHOT + 1
    for old in (1, 2, sent // 3, oldest_kept - 1):  # older than every id the snapshot kept
        result = restored.change("a", old, inc(), None, T)
        assert isinstance(result, Accepted), result
        assert 2 * old - 1 <= result.version <= 2 * oldest_kept - 1
        assert restored.take_effects() == [Send("a", {"t": "ack", "id": old, "version": result.version})]
    for kept in (oldest_kept, sent, sent + 1):  # kept in the snapshot, or in the journal: the exact answer
        assert restored.change("a", kept, inc(), None, T) == Accepted(min(2 * kept - 1, version))
        assert restored.take_effects() == [Send("a", {"t": "ack", "id": kept, "version": min(2 * kept - 1, version)})]
    assert (restored.version, restored.state) == (version, state)  # nothing applied, no version step
    assert restored.change("a", sent + 2, inc(), None, T) == Accepted(version + 1)  # a new id still applies


def test_retransmitted_pause_and_claim_are_answered_not_applied_live_and_after_a_restore() -> None:
    """DESIGN §3: a `pause` or `claim` retransmitted with an answered id gets its ack again, and no second
    handoff: no checkpoint, no broadcast, no event, no change of who is active, no version step."""
    s = with_devices("a", "b")
    s.change("a", 1, inc(), None, T)
    assert s.claim("a", 2, T) == Accepted(1, "a")
    assert s.pause("a", 3, T) == Accepted(1, None)
    assert s.claim("b", 7, T) == Accepted(1, "b")
    s.take_effects()
    snap = s.snapshot()  # what the handoff's sync checkpoint saved
    restored = SessionState.restore(s.record(), snap, [])
    for state in (s, restored):
        before = (state.version, state.active, state.status, orjson.loads(orjson.dumps(state.state)))
        assert before == (1, "b", "active", {"n": 1})
        assert state.claim("a", 2, T) == Accepted(1, "b")  # a's old claim: b stays active
        assert state.take_effects() == [Send("a", {"t": "ack", "id": 2, "version": 1})]
        assert state.pause("a", 3, T) == Accepted(1, "b")  # a's old pause: b stays active, nothing paused
        assert state.take_effects() == [Send("a", {"t": "ack", "id": 3, "version": 1})]
        assert state.claim("b", 7, T) == Accepted(1, "b")
        assert state.take_effects() == [Send("b", {"t": "ack", "id": 7, "version": 1})]
        assert (state.version, state.active, state.status, state.state) == before
    assert restored.pause("b", 8, T) == Accepted(1, None)  # a new id is carried out
    assert restored.status == "paused"


def test_restore_does_not_alter_the_snapshot_it_was_given() -> None:
    """A store may hand back the same Snapshot object twice (MemorySnapshotStore does): replaying the
    journal onto it in place would apply those changes twice on the next restore."""
    snap = Snapshot("s1", 0, {"n": 0}, "active", None)
    journal = [Change(1, "a", 1, inc()), Change(2, "a", 2, inc())]
    first = SessionState.restore(record(), snap, journal)
    first.change("a", 3, inc(), None, T)
    second = SessionState.restore(record(), snap, journal)
    assert snap.state == {"n": 0}
    assert (second.state, second.version) == ({"n": 2}, 2)


def test_restore_of_an_ended_record_stays_ended() -> None:
    s = SessionState.restore(record("ended"), Snapshot("s1", 0, {}, "active", None), [])
    assert s.status == "ended"


def test_restore_keeps_the_replay_window_bounded() -> None:
    journal = [Change(v, "a", v, inc()) for v in range(1, 21)]
    s = SessionState.restore(record(), None, journal, replay_window=5)
    assert s.version == 20 and s.state == {"n": 20}
    assert [orjson.loads(patch)["version"] for patch in s.replay] == [16, 17, 18, 19, 20]
    assert s.welcome("b", 14)["mode"] == "full"
    assert s.welcome("b", 15)["mode"] == "replay"


def test_replay_is_bounded_even_when_built_directly() -> None:
    s = SessionState("s1", "o", "n", {}, "active", {}, 0, None, 0.0, 0.0, replay_window=3)
    for i in range(10):
        s.change("a", i, inc(), None, T)
    assert len(s.replay) == 3


def test_describe_and_record() -> None:
    s = with_devices("a")
    s.change("a", 1, inc(), None, T)
    described = s.describe()
    assert described["version"] == 1 and described["state"] == {"n": 1}
    assert described["devices"] == [{"device": "a", "kind": "web"}]
    assert s.record().version == 1 and s.record().owner == "alice"


def test_acked_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import actors.session as session

    monkeypatch.setattr(session, "ACKED_PER_DEVICE", 3)
    monkeypatch.setattr(session, "ACKED_FULL_DEVICES", 2)
    monkeypatch.setattr(session, "ACKED_DEVICES", 3)
    s = new_state()
    for i in range(5):
        s.change("a", i, inc(), None, T)
    assert s.acked["a"].ids.tolist() == [2, 3, 4] and s.acked_count == 3
    s.change("b", 0, inc(), None, T)
    s.change("a", 5, inc(), None, T)  # a becomes the most recent
    s.change("c", 0, inc(), None, T)  # b is demoted to its high-water mark
    assert list(s.acked) == ["a", "c"] and list(s.high_water) == ["b"]
    assert s.acked_count == 4
    assert s.acked_bytes == 2 * session.ANSWERS_OVERHEAD_BYTES + 4 * 16 + session.HIGH_WATER_BYTES
    assert s.change("b", 0, inc(), None, T) == Accepted(6)  # b's answer, from its high-water mark
    s.take_effects()
    s.change("d", 0, inc(), None, T)  # d full; a demoted; b (oldest high-water mark) forgotten: 3 devices in all
    assert list(s.acked) == ["c", "d"] and list(s.high_water) == ["a"]
    s.change("a", 6, inc(), None, T)  # a comes back: full again, from its mark on; c demoted
    assert s.acked["a"].ids.tolist() == [5, 6] and list(s.high_water) == ["c"]


def test_many_devices_answers_stay_small_and_are_counted() -> None:
    """Issue 8 soak: devices joining with fresh ids (hostile clients, the soak's short device lives) filled up to
    ~13 MB of answers per session, outside the memory budget; then ~1.4 KB per device for hours. Now the
    ACKED_FULL_DEVICES most recent keep ACKED_PER_DEVICE answers, older ones their high-water mark, and the
    budget counts them."""
    import tracemalloc

    from actors.session import ACKED_DEVICES, ACKED_FULL_DEVICES, ACKED_PER_DEVICE

    s = new_state()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for device in range(ACKED_DEVICES + 50):
        for op_id in range(ACKED_PER_DEVICE + 10):
            s._remember(f"dev-{device:04d}", op_id, op_id + 1)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(s.acked) == ACKED_FULL_DEVICES and s.acked_count == ACKED_FULL_DEVICES * ACKED_PER_DEVICE
    assert len(s.acked) + len(s.high_water) == ACKED_DEVICES
    assert held < 1.5 * s.acked_bytes, (held, s.acked_bytes)  # the estimate the budget uses is honest
    assert s.acked_bytes < 512 << 10
    assert s.acked["dev-0299"].answer(ACKED_PER_DEVICE) == ACKED_PER_DEVICE + 1
    assert s.acked["dev-0299"].answer(0) == 11  # dropped: the oldest kept id's version, an upper bound
    oldest_kept = "dev-0050"  # of 306 devices, the newest 256: the oldest of them keeps only its mark
    assert s.high_water[oldest_kept] >> 64 == ACKED_PER_DEVICE + 9
    assert s.change(oldest_kept, 3, inc(), None, T) == Accepted(ACKED_PER_DEVICE + 10)  # an upper bound
    assert "dev-0049" not in s.high_water and "dev-0049" not in s.acked


def test_restore_stops_at_a_journal_gap_and_says_so() -> None:
    from storage.ports import Change, SessionRecord

    record = SessionRecord("s1", "alice", "", {}, "active", 0, None, T, T)
    journal = [Change(v, "a", v, [{"op": "set", "path": f"/k{v}", "value": v}]) for v in (1, 2, 4, 5)]
    s = SessionState.restore(record, None, journal)
    assert s.version == 2 and s.state == {"k1": 1, "k2": 2}
    assert s.journal_gap == (2, 4)


def test_replay_window_is_bounded_in_bytes_and_a_big_replay_becomes_the_full_state() -> None:
    """Issue 8's measurement: 400 changes of 60 KB to one key keep a 60 KB state, but the window held 24 MB and a
    device resuming from the start got a 22.9 MB replay. The window now holds at most max_state_bytes, and a
    replay larger than the state is sent as the state."""
    s = with_devices("a")
    blob = "x" * 60_000
    for op_id in range(1, 401):
        s.change("a", op_id, [{"op": "set", "path": "/blob", "value": f"{op_id}{blob}"}], None, T)
    s.take_effects()
    assert s.replay_bytes <= s.max_state_bytes and len(s.replay) == len(s.replay_sizes) < 20
    assert s.replay_bytes == sum(s.replay_sizes)
    s.join("b", "web", 0, T, s.epoch)  # far behind: the window no longer holds version 1
    s.join("c", "web", 395, T, s.epoch)  # 5 patches of 60 KB against a 60 KB state: the state is smaller
    s.join("d", "web", 400, T, s.epoch)  # up to date: an empty replay
    welcomes = {e.device: e.frame for e in s.take_effects() if isinstance(e, Send)}
    assert welcomes["b"]["mode"] == "full" and welcomes["c"]["mode"] == "full"
    assert welcomes["d"]["mode"] == "replay" and welcomes["d"]["patches"] == []
    small = with_devices("a")
    for op_id in range(1, 6):
        small.change("a", op_id, inc(), None, T)
    small.take_effects()
    small.join("e", "web", 2, T, small.epoch)  # 3 tiny patches: replayed
    (welcome,) = [e.frame for e in small.take_effects() if isinstance(e, Send)]
    assert welcome["mode"] == "replay" and [p["version"] for p in welcome["patches"]] == [3, 4, 5]


def test_rest_idempotency_keys_answer_retries_and_survive_restores() -> None:
    """DESIGN §4: a retried PATCH / handoff with the same Idempotency-Key gets the first answer and changes nothing,
    also after a restore from the journal or from a snapshot (a restart, or a move to another pod)."""
    s = with_devices("a")
    k1, k2, k3 = rest_key("k1"), rest_key("k2"), rest_key("k3")
    assert s.change(REST_DEVICE, k1, inc(), None, T) == Accepted(1)
    assert s.change(REST_DEVICE, k1, inc(), None, T) == Accepted(1)  # the retry: nothing applied
    assert s.change(REST_DEVICE, k2, inc(), None, T) == Accepted(2)
    assert s.state == {"n": 2} and s.version == 2
    assert s.claim("a", None, T, k3) == Accepted(2, "a")
    assert s.claim("a", None, T, k3) == Accepted(2, "a") and s.active == "a"
    journal = _journal(s.take_effects())
    assert [c.op_id for c in journal] == [k1, k2]  # keys are journaled with their change
    from_journal = SessionState.restore(s.record(), Snapshot("s1", 0, {}, "active", None), journal)
    from_snapshot = SessionState.restore(s.record(), s.snapshot(), [])
    for restored in (from_journal, from_snapshot):
        assert restored.change(REST_DEVICE, k1, inc(), None, T) == Accepted(1)
        assert restored.change(REST_DEVICE, k2, inc(), None, T) == Accepted(2)
        assert restored.state == {"n": 2}
    assert from_snapshot.claim("b", None, T, k3) == Accepted(2, "b") and from_snapshot.active == "a"
    assert s.change(REST_DEVICE, None, inc(), None, T) == Accepted(3)  # no key: applied every time


def test_the_replay_window_holds_nothing_the_cyclic_gc_walks() -> None:
    """Every session keeps up to replay_window patches: kept as dicts and lists they were long-lived containers
    that lengthened and multiplied the GC's pauses (issue 9). Kept encoded; a replay welcome decodes them."""
    s = with_devices("a", "b")
    for i in range(1, 51):
        s.change("a", i, [{"op": "set", "path": "/d/a", "value": {"t": i, "n": i}}], None, T)
    s.take_effects()
    assert len(s.replay) == 50 and not any(gc.is_tracked(patch) for patch in s.replay)
    welcome = s.welcome("b", 47)
    assert welcome["mode"] == "replay" and welcome["patches"] == [
        {"t": "patch", "version": v, "device": "a", "ops": [{"op": "set", "path": "/d/a", "value": {"t": v, "n": v}}]}
        for v in (48, 49, 50)
    ]
    tracemalloc.start()  # and each is an exact-size copy, not orjson's 4 KiB output buffer (dumps_kept)
    try:
        for i in range(51, 251):
            s.change("a", i, [{"op": "inc", "path": "/n"}], None, T)
        s.take_effects()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 200 * 1024, held  # 200 patches kept: about 0.2 KB each, not 4 KB


def test_a_patch_is_encoded_once_for_replay_and_fan_out() -> None:
    """Issue 9 "frame once": the bytes kept for replay are the bytes the devices are sent."""
    s = with_devices("a", "b")
    s.change("a", 1, [{"op": "set", "path": "/x", "value": {"y": 1}}], None, T)
    [broadcast] = [e for e in s.take_effects() if isinstance(e, Broadcast)]
    assert broadcast.json is not None and orjson.loads(broadcast.json) == broadcast.frame
    assert broadcast.json is s.replay[-1]


def test_a_retransmitted_pipeline_of_300_gets_each_op_its_own_version_back() -> None:
    """CI finding: with 64 live answers per device, the TypeScript SDK's exactly-once test (300 incs in flight,
    retransmitted after each cut) got 169 distinct versions for 300 ops: older retransmits were acked with an
    upper bound. Nothing was applied twice, but a client must get each op's own version back."""
    s = with_devices("a")
    for op_id in range(1, 301):
        s.change("a", op_id, inc(), None, T)
    s.take_effects()
    versions = [s.change("a", op_id, inc(), None, T) for op_id in range(1, 301)]  # all retransmitted
    assert versions == [Accepted(v) for v in range(1, 301)]
    assert s.version == 300
