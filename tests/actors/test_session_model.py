"""Stateful hypothesis test of SessionState against DESIGN §5: random devices, ops, reconnects and restores.

Effects are routed the way the runtime routes them: a Send or Broadcast goes to the connection(s) open
when the effect was made, and frames are encoded only when the turn is "flushed" (several commands may
share a turn). Each device applies what reaches it to a `Replica`, which asserts one order (no gap, no
duplicate); after every flush every connected replica must equal the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from actors.session import (
    REST_DEVICE,
    Accepted,
    Broadcast,
    Checkpoint,
    Journal,
    Rejected,
    Send,
    SessionState,
)
from protocol.ops import InvalidOp, apply_ops
from storage.ports import Change, SessionRecord, Snapshot
from tests.actors.fakes import Replica

JSON = Any
DEVICES = ("a", "b", "c")
MAX_STATE = 300
WINDOW = 3
T = 1000.0

# ---- strategies ---------------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "n", "x/y", "m~n"])
paths = st.lists(KEYS, min_size=1, max_size=3).map(
    lambda tokens: "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens)
)
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text("xyz", max_size=4)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(KEYS, inner, max_size=2), max_leaves=4
)
valid_op = st.one_of(
    st.builds(lambda p, v: {"op": "set", "path": p, "value": v}, paths, values),
    st.builds(lambda p: {"op": "del", "path": p}, paths),
    st.builds(lambda p, by: {"op": "inc", "path": p, "by": by}, paths, st.integers(-3, 3)),
    st.builds(lambda v: {"op": "set", "path": "", "value": v}, st.dictionaries(KEYS, values, max_size=2)),
)
invalid_op = st.sampled_from(
    [
        {"op": "inc", "path": "/n", "by": "1"},
        {"op": "set", "path": "", "value": [1]},
        {"op": "del", "path": ""},
        {"op": "bad", "path": "/a"},
        {"op": "set", "path": "a", "value": 1},
        {"op": "set", "path": "/~2", "value": 1},
        {"op": "set", "path": "/big", "value": "z" * (MAX_STATE + 10)},
    ]
)
op_lists = st.lists(valid_op, min_size=1, max_size=3) | st.lists(valid_op | invalid_op, min_size=1, max_size=3)


def copy(value: JSON) -> JSON:
    return orjson.loads(orjson.dumps(value))


@dataclass
class Client:
    replica: Replica
    epoch: int = 0
    next_id: int = 1
    sent: dict[int, list[dict[str, JSON]]] = field(default_factory=dict)


class SessionModel(RuleBasedStateMachine):
    @initialize(initial=st.dictionaries(KEYS, values, max_size=2))
    def start(self, initial: dict[str, JSON]) -> None:
        self.record = SessionRecord("s1", "alice", "demo", {}, "active", 0, None, 1.0, 1.0)
        self.s = SessionState.restore(
            self.record,
            Snapshot("s1", 0, copy(initial), "active", None),
            [],
            replay_window=WINDOW,
            max_state_bytes=MAX_STATE,
        )
        self.model: dict[str, JSON] = copy(initial)
        self.model_active: str | None = None
        self.model_status = "active"
        self.journal: list[Change] = []
        self.snapshots: list[Snapshot] = [self.s.snapshot()]  # newest last; one at every handoff (sync)
        self.clients: dict[str, Client] = {}  # connected devices
        self.offline: dict[str, Client] = {}  # devices that were connected once
        self.epochs = 0
        self.outbox: list[tuple[str, int, dict[str, JSON]]] = []
        self.sync_checkpoint = False
        self.accepted: dict[str, dict[int, int]] = {d: {} for d in DEVICES}

    # ---- plumbing ---------------------------------------------------------------------------------

    def route(self) -> None:
        """Address this command's effects to the connections open now; check the journal as it grows."""
        for effect in self.s.take_effects():
            if isinstance(effect, Journal):
                change = effect.change
                assert change.version == len(self.journal) + 1, "versions are contiguous"
                if change.op_id is not None:
                    assert all((c.device, c.op_id) != (change.device, change.op_id) for c in self.journal), (
                        "an acked op id was applied twice"
                    )
                self.journal.append(change)
            elif isinstance(effect, Send):
                client = self.clients.get(effect.device)
                if client is not None:
                    self.outbox.append((effect.device, client.epoch, effect.frame))
            elif isinstance(effect, Broadcast):
                for device, client in self.clients.items():
                    if device != effect.exclude:
                        self.outbox.append((device, client.epoch, effect.frame))
            elif isinstance(effect, Checkpoint) and effect.sync:
                self.sync_checkpoint = True

    @rule()
    def flush(self) -> None:
        """End of the turn: the sync checkpoint is written, then frames are encoded and delivered."""
        if self.sync_checkpoint:  # handoff is not journaled: only snapshots from here on know about it
            self.snapshots = [self.s.snapshot()]
            self.sync_checkpoint = False
        outbox, self.outbox = self.outbox, []
        for device, epoch, frame in outbox:
            client = self.clients.get(device)
            if client is not None and client.epoch == epoch:
                client.replica.receive(orjson.loads(orjson.dumps(frame)))

    def expect(self, result: Accepted | Rejected, ops: list[dict[str, JSON]], version_before: int) -> None:
        """The model: the change applies to a copy exactly when the server accepted it."""
        trial = copy(self.model)
        try:
            apply_ops(trial, ops)
            error = None if len(orjson.dumps(trial)) <= MAX_STATE else "too_large"
        except InvalidOp as exc:
            error = exc.code
        if isinstance(result, Accepted):
            assert error in (None, "too_large"), ops  # the size estimate may let a deep path overshoot a bit
            assert result.version == version_before + 1 == self.s.version
            self.model = trial
        else:
            assert result.code == error, (result, ops)
            assert self.s.version == version_before
        assert self.s.state == self.model

    # ---- device commands --------------------------------------------------------------------------

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), ops=op_lists, based=st.booleans())
    def op(self, data: st.DataObject, ops: list[dict[str, JSON]], based: bool) -> None:
        device = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[device]
        op_id = client.next_id
        client.next_id += 1
        client.sent[op_id] = ops
        client.replica.send(op_id, ops)
        base = client.replica.version if based else None
        before = self.s.version
        result = self.s.change(device, op_id, ops, base, T)
        if base is not None and base != before:
            assert result == Rejected("conflict", result.message, before)  # type: ignore[union-attr]
            client.replica.pending.pop(op_id)
        else:
            self.expect(result, ops, before)
            if isinstance(result, Accepted):
                self.accepted[device][op_id] = result.version
            else:
                client.replica.pending.pop(op_id)
        self.route()

    @precondition(lambda self: any(self.accepted[d] for d in self.clients))
    @rule(data=st.data())
    def retransmit(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(d for d in self.clients if self.accepted[d])))
        op_id = data.draw(st.sampled_from(sorted(self.accepted[device])))
        client = self.clients[device]
        ops = client.sent[op_id]
        before = (self.s.version, orjson.dumps(self.s.state))
        result = self.s.change(device, op_id, ops, None, T)
        assert result == Accepted(self.accepted[device][op_id])
        assert (self.s.version, orjson.dumps(self.s.state)) == before
        effects = list(self.s.effects)
        assert not any(isinstance(e, Journal) for e in effects)
        self.route()

    @rule(ops=op_lists)
    def rest_change(self, ops: list[dict[str, JSON]]) -> None:
        before = self.s.version
        self.expect(self.s.change(REST_DEVICE, None, ops, None, T), ops, before)
        self.route()

    @rule(device=st.sampled_from(DEVICES), resume=st.booleans())
    def join(self, device: str, resume: bool) -> None:
        """Connect (or reconnect: a new connection replaces the open one)."""
        client = self.clients.pop(device, None) or self.offline.pop(device, None)
        if client is None or not resume or client.replica.state is None:
            old = client
            client = Client(Replica(device))
            if old is not None:
                client.next_id, client.sent = old.next_id, old.sent
        self.epochs += 1
        client.epoch = self.epochs
        self.clients[device] = client
        self.s.join(device, "web", client.replica.version if resume and client.replica.state is not None else None, T)
        self.route()
        for op_id in sorted(client.replica.pending):  # the ack was lost with the old connection: send again
            assert self.s.change(device, op_id, client.sent[op_id], None, T) == Accepted(self.accepted[device][op_id])
            assert not any(isinstance(e, Journal) for e in self.s.effects)
            self.route()

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(self.clients)))
        self.offline[device] = self.clients.pop(device)
        self.s.leave(device, T)
        self.route()

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[device]
        client.next_id += 1
        result = self.s.pause(device, client.next_id - 1, T)
        if self.model_active in (None, device):
            assert result == Accepted(self.s.version, None)
            self.model_active, self.model_status = None, "paused"
        else:
            assert isinstance(result, Rejected) and result.code == "conflict"
        assert (self.s.active, self.s.status) == (self.model_active, self.model_status)
        self.route()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), rest=st.booleans())
    def claim(self, data: st.DataObject, rest: bool) -> None:
        device = data.draw(st.sampled_from(sorted(self.clients) if not rest else DEVICES))
        op_id = None
        if not rest:
            op_id = self.clients[device].next_id
            self.clients[device].next_id += 1
        assert self.s.claim(device, op_id, T) == Accepted(self.s.version, device)
        self.model_active, self.model_status = device, "active"
        self.route()

    # ---- checkpoints and restarts -----------------------------------------------------------------

    @rule()
    def checkpoint(self) -> None:
        self.snapshots.append(self.s.snapshot())

    @rule(data=st.data(), overlap=st.booleans())
    def restart(self, data: st.DataObject, overlap: bool) -> None:
        """A crash: rebuild from any snapshot since the last handoff + the journal; devices get full welcomes."""
        self.flush()
        snap = data.draw(st.sampled_from(self.snapshots))
        journal = self.journal if overlap else [c for c in self.journal if c.version > snap.version]
        restored = SessionState.restore(self.s.record(), snap, journal, replay_window=WINDOW, max_state_bytes=MAX_STATE)
        assert orjson.dumps(restored.state) == orjson.dumps(self.s.state)
        assert (restored.version, restored.active, restored.status) == (self.s.version, self.s.active, self.s.status)
        assert restored.acked == self.s.acked
        assert restored.checkpointed_version == snap.version
        self.s = restored
        for device in self.clients:
            self.s.join(device, "web", None, T)
        self.s.take_effects()
        for device, client in self.clients.items():
            client.replica.receive(orjson.loads(orjson.dumps(self.s.welcome(device))))
        self.snapshots = [self.s.snapshot()]

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def replicas_match_after_a_flush(self) -> None:
        if self.outbox or self.sync_checkpoint:
            return
        assert self.s.state == self.model
        assert [c.version for c in self.journal] == list(range(1, self.s.version + 1))
        for device, client in self.clients.items():
            replica = client.replica
            assert replica.state is not None, f"{device} never got a welcome"
            assert (replica.version, replica.state) == (self.s.version, self.s.state), device
            assert replica.active == self.s.active, device
            assert not replica.pending, f"{device} still waits for acks"


TestSessionModel = SessionModel.TestCase
TestSessionModel.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
