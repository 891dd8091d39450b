"""SessionState: the decision logic of one session actor, as a plain object with no I/O.

Each command method changes the state and appends effects (data) to `self.effects`; the async actor
runtime drains them after every turn: first the durable ones (journal, synchronous checkpoint), then the
sends. Acks and patches therefore never leave before the change they announce is stored (DESIGN §5).
Tests and the hypothesis model drive this class directly, without trio or sockets.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from protocol import codes
from protocol.codec import dumps_kept
from protocol.ops import InvalidOp, TooLarge, apply_ops
from storage.ports import Change, SessionRecord, Snapshot

JSON = Any
REST_DEVICE = "@rest"  # author of changes made over REST; not a valid device id, so never mistaken for one
# A client may pipeline hundreds of ops and retransmit them all after a drop: each must get its own version back
# (the TypeScript SDK's exactly-once test sends 300 at once), so the live window is wide; snapshots keep fewer.
ACKED_PER_DEVICE = 512  # answers (op id -> version) remembered live per device, for the most recent devices
ACKED_IN_SNAPSHOT = 64  # per device, the newest ones in a snapshot; the last is the device's high-water mark
ACKED_DEVICES = 256  # devices whose op ids are remembered (least recently used dropped)
ACKED_FULL_DEVICES = 32  # of those, the most recently active keep ACKED_PER_DEVICE answers; older ones their last
ANSWERS_OVERHEAD_BYTES = 400  # per device with full answers: its id string, the Answers object, two arrays, a slot
HIGH_WATER_BYTES = 160  # per device with only its high-water mark: its id string, one int, a dict slot
_HW_SHIFT = 64  # a high-water mark packed in one int: op id << 64 | version (both below 2**63)
_HW_MASK = (1 << _HW_SHIFT) - 1
REST_KEYS = 1024  # REST Idempotency-Keys remembered per session (live and in snapshots), oldest dropped


class Answers:
    """One device's newest answered op ids (increasing: op ids only grow per device) and their versions.

    Two flat int64 arrays, 16 bytes an answer: as an OrderedDict of ints, 512 answers for each of 256 devices
    came to ~13 MB per session, and a soak's hostile clients (fresh device ids) filled it (issue 8).
    """

    __slots__ = ("ids", "versions")

    def __init__(self, pairs: list[tuple[int, int]] | None = None) -> None:
        self.ids = array("q")
        self.versions = array("q")
        for op_id, version in pairs or ():
            self.add(op_id, version)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Answers) and self.ids == other.ids and self.versions == other.versions

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def high(self) -> int:
        """The high-water mark: every id at or below it was answered."""
        return self.ids[-1]

    def add(self, op_id: int, version: int) -> int:
        """Remember an answer; returns how many answers this added net (0 when the oldest was dropped)."""
        if self.ids and op_id <= self.ids[-1]:
            return 0  # not newer than the high-water mark: it is answered already (keeps the arrays sorted)
        self.ids.append(op_id)
        self.versions.append(version)
        if len(self.ids) > ACKED_PER_DEVICE:
            del self.ids[0]
            del self.versions[0]
            return 0
        return 1

    def answer(self, op_id: int) -> int:
        """The version acked for `op_id` (at or below `high`): its own if kept, else the next kept id's, an upper
        bound of its own."""
        return self.versions[bisect_left(self.ids, op_id)]

    def pairs(self, newest: int | None = None) -> list[tuple[int, int]]:
        """The answers as (op id, version) pairs, oldest first; only the `newest` N when given (a snapshot keeps
        ACKED_IN_SNAPSHOT of up to ACKED_PER_DEVICE: slicing the arrays first spares building the rest).

        Tuples, built by `zip` in C: JSON writes them as the same arrays, and a list comprehension building a list
        per pair was 6.5 % of the server's CPU under `bench handoff --redis` (py-spy --gil; 20.8 against 11.2 µs
        for 256 pairs, timeit)."""
        ids, versions = self.ids, self.versions
        if newest is not None and len(ids) > newest:
            start = len(ids) - newest
            ids, versions = ids[start:], versions[start:]
        return list(zip(ids, versions, strict=True))


def rest_key(idempotency_key: str) -> int:
    """An Idempotency-Key as the op id of a REST change: 53 bits of blake2b (journaled like a device's op id)."""
    digest = hashlib.blake2b(idempotency_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 11


def _copy_json(value: dict[str, JSON]) -> dict[str, JSON]:
    result: dict[str, JSON] = orjson.loads(orjson.dumps(value))
    return result


# ---- effects -------------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class Send:
    """One frame to one connected device. `opens`: the welcome of a join, the first frame of a new connection
    (frames to the device before it in the same turn were meant for an older connection)."""

    device: str
    frame: dict[str, JSON]
    opens: bool = False


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class Broadcast:
    """One frame, encoded once, to every connected device except `exclude`. `json`: its JSON encoding when it
    exists already (a patch's, kept for replay): the fan-out sends those very bytes (frame once, issue 9)."""

    frame: dict[str, JSON]
    exclude: str | None = None
    json: bytes | None = field(default=None, compare=False)  # a cache of `frame`'s encoding, not part of it


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class Journal:
    change: Change


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Write a snapshot; `sync` ones complete before this turn's sends (handoff, DESIGN §5)."""

    reason: str
    sync: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    routing_key: str
    fields: dict[str, JSON]


@dataclass(frozen=True, slots=True)
class Close:
    """Close every connection of the session (device None) or one device's, with a close code."""

    code: int
    reason: str
    device: str | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The session ended: delete its data and stop the actor."""


Effect = Send | Broadcast | Journal | Checkpoint | Publish | Close | Stop


# ---- results of requests (what REST returns; WebSocket requests answer with frames) --------------


@dataclass(frozen=True, slots=True)
class Rejected:
    code: str  # DESIGN §3 error code
    message: str
    version: int | None = None


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class Accepted:
    version: int
    active: str | None = None


Result = Accepted | Rejected


def error_frame(rejected: Rejected, op_id: int | None) -> dict[str, JSON]:
    frame: dict[str, JSON] = {"t": "error", "code": rejected.code, "message": rejected.message}
    if op_id is not None:
        frame["id"] = op_id
    if rejected.version is not None:
        frame["version"] = rejected.version
    return frame


@dataclass(slots=True)
class DeviceInfo:
    device: str
    kind: str

    def as_json(self) -> dict[str, str]:
        return {"device": self.device, "kind": self.kind}


@dataclass(slots=True)
class SessionState:
    """The live session. Only the actor that owns it calls its methods, one at a time."""

    id: str
    owner: str
    name: str
    metadata: dict[str, JSON]
    status: str
    state: dict[str, JSON]
    version: int
    active: str | None
    created_at: float
    updated_at: float
    replay_window: int = 1000
    max_state_bytes: int = 1 << 20
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    # Each patch encoded (JSON bytes): bytes are not tracked by the cyclic GC. As dicts and lists, the windows of
    # all sessions were long-lived containers that every young collection walked and that made collections
    # frequent: the GC pauses behind the delivery tail (issue 9). Decoded only for a replay welcome.
    # Made at the first patch: an empty deque is 760 bytes, and most actors are idle (issue 9: 6 KiB per actor).
    replay: deque[bytes] | tuple[()] = ()
    replay_sizes: deque[int] | tuple[()] = ()  # each replay patch's ops size (bytes, about)
    replay_bytes: int = 0  # their sum: the window is bounded in bytes as well as in patches (§5.5)
    acked: OrderedDict[str, Answers] = field(default_factory=OrderedDict)  # recently active devices, LRU
    acked_count: int = 0  # answers held in `acked`, for the memory budget (acked_bytes)
    # Devices not among the ACKED_FULL_DEVICES most recently active: their last answer only (packed, _HW_SHIFT).
    # Devices that come and go with fresh ids (a soak, hostile clients) filled `acked` for hours, ~1.4 KB each.
    high_water: OrderedDict[str, int] = field(default_factory=OrderedDict)
    rest_keys: OrderedDict[int, int] = field(default_factory=OrderedDict)  # hashed Idempotency-Key -> version
    approx_bytes: int = 0
    checkpointed_version: int = 0
    # This incarnation of the session: the fencing token of the lease it was restored under (DESIGN §6), so a
    # new one at every activation, on whichever pod. A device may only resume (replay) within the epoch its
    # version came from; after a restore that lost changes (embedded journal gone with the process, a Redis
    # without persistence) version numbers can repeat with other contents.
    epoch: str = "0"
    journal_gap: tuple[int, int] | None = None  # set by restore when the journal skipped versions

    # ---- construction and snapshots ----------------------------------------------------------

    @classmethod
    def restore(
        cls,
        record: SessionRecord,
        snapshot: Snapshot | None,
        journal: list[Change],
        *,
        replay_window: int = 1000,
        max_state_bytes: int = 1 << 20,
        epoch: int = 0,
    ) -> SessionState:
        """Rebuild from the newest snapshot plus the journal after it (DESIGN §5 recovery); `epoch` is the lease
        token the actor holds."""
        s = cls(
            id=record.id,
            owner=record.owner,
            name=record.name,
            metadata=record.metadata,
            status=record.status,
            state={},
            version=0,
            active=record.active,
            created_at=record.created_at,
            updated_at=record.updated_at,
            replay_window=replay_window,
            max_state_bytes=max_state_bytes,
            epoch=str(epoch),
        )
        if snapshot is not None:
            # Our own copy: the journal replays onto it, and a store may hand the same object to the next restore.
            s.state = _copy_json(snapshot.state)
            s.version = snapshot.version
            s.status = snapshot.status if record.status != "ended" else "ended"
            s.active = snapshot.active
            for device, pairs in snapshot.acked.items():
                if device == REST_DEVICE:  # Idempotency-Keys: no order among them, oldest first as saved
                    s.rest_keys = OrderedDict((int(i), int(v)) for i, v in pairs)
                elif pairs:
                    answers = s.acked[device] = Answers(sorted((int(i), int(v)) for i, v in pairs))
                    s.acked_count += len(answers)
                    s._demote_beyond_full()
        s.checkpointed_version = s.version
        for change in journal:
            if change.version <= s.version:
                continue  # already in the snapshot (or a duplicate write); the journal is ordered
            if change.version != s.version + 1:
                s.journal_gap = (s.version, change.version)  # changes are missing: stop here, loudly (the actor logs)
                break
            apply_ops(s.state, change.ops)
            s.version = change.version
            if change.op_id is not None:
                s._remember(change.device, change.op_id, change.version)
            s._keep_for_replay(dumps_kept(s._patch(change.device, change.ops)), len(orjson.dumps(change.ops)))
        s.approx_bytes = len(orjson.dumps(s.state))
        return s

    def snapshot(self) -> Snapshot:
        """A snapshot of this moment; state is deep-copied through orjson so later ops cannot alter it."""
        return Snapshot(
            epoch=int(self.epoch),
            session_id=self.id,
            version=self.version,
            state=orjson.loads(orjson.dumps(self.state)),
            status=self.status,
            active=self.active,
            acked={
                **{device: [(hw >> _HW_SHIFT, hw & _HW_MASK)] for device, hw in self.high_water.items()},
                **{device: answers.pairs(ACKED_IN_SNAPSHOT) for device, answers in self.acked.items()},
                **({REST_DEVICE: list(self.rest_keys.items())} if self.rest_keys else {}),
            },
        )

    def record(self) -> SessionRecord:
        return SessionRecord(
            id=self.id,
            owner=self.owner,
            name=self.name,
            metadata=self.metadata,
            status=self.status,
            version=self.version,
            active=self.active,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

    def describe(self) -> dict[str, JSON]:
        """The session as REST shows it (DESIGN §4)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "metadata": self.metadata,
            "status": self.status,
            "state": self.state,
            "version": self.version,
            "active": self.active,
            "devices": self._device_list(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    # ---- devices ------------------------------------------------------------------------------

    def join(self, device: str, kind: str, resume: int | None, now: float, resume_epoch: str | None = None) -> None:
        """A device connected: it gets a welcome, the others a presence frame."""
        self.devices[device] = DeviceInfo(device, kind)
        if resume_epoch != self.epoch:
            resume = None  # another incarnation's version numbers: only the full state is safe
        self.effects.append(Send(device, self.welcome(device, resume), opens=True))
        self.effects.append(Broadcast(self._presence(), exclude=device))
        self.effects.append(Publish("device.joined", {"device": device, "kind": kind}))

    def leave(self, device: str, now: float) -> None:
        if self.devices.pop(device, None) is None:
            return
        self.effects.append(Broadcast(self._presence()))
        self.effects.append(Publish("device.left", {"device": device}))

    def resync(self, device: str) -> None:
        """The device's send queue overflowed (or its actor restarted): a fresh full welcome replaces it all."""
        self.effects.append(Send(device, self.welcome(device)))

    def welcome(self, device: str, resume: int | None = None) -> dict[str, JSON]:
        """Replay when the device's version is still in the window, else the full state."""
        frame: dict[str, JSON] = {
            "t": "welcome",
            "session": self.id,
            "device": device,
            "epoch": self.epoch,
            "version": self.version,
            "active": self.active,
            "devices": self._device_list(),
        }
        if resume is not None and resume <= self.version:
            missing = self.version - resume
            if missing == 0:
                frame["mode"] = "replay"
                frame["patches"] = []
                return frame
            if missing <= len(self.replay):
                first = len(self.replay) - missing
                replay_size = sum(islice(self.replay_sizes, first, None))
                # Only when it is smaller than the state itself: 400 changes of one 60 KB key replay as 24 MB.
                if replay_size < 1024 or replay_size < len(orjson.dumps(self.state)):
                    frame["mode"] = "replay"
                    frame["patches"] = [orjson.loads(patch) for patch in islice(self.replay, first, None)]
                    return frame
        frame["mode"] = "full"
        # A copy: effects are sent after the turn, when later changes of the same turn have moved the state on.
        frame["state"] = _copy_json(self.state)
        return frame

    # ---- changes ------------------------------------------------------------------------------

    def change(
        self,
        device: str,
        op_id: int | None,
        ops: list[dict[str, JSON]],
        base: int | None,
        now: float,
        size_hint: int | None = None,
    ) -> Result:
        """Apply one change atomically (a WebSocket `op` when op_id is set, else REST PATCH).

        `size_hint`: an upper bound of the ops' encoded size (the frame's length), saving an encode here.
        """
        if self.status == "ended":
            return self._reject(device, op_id, Rejected(codes.E_NOT_FOUND, "session ended"))
        if op_id is not None:
            answered = self._answered(device, op_id)
            if answered is not None:
                return Accepted(answered)
        if base is not None and base != self.version:
            return self._reject(
                device, op_id, Rejected(codes.CONFLICT, f"base {base} is not the current version", self.version)
            )
        if size_hint is None:
            try:
                size_hint = len(orjson.dumps(ops))
            except TypeError as exc:  # e.g. an integer beyond 64 bits: storable nowhere
                return self._reject(device, op_id, Rejected(codes.INVALID_OP, str(exc), self.version))
        estimate = self.approx_bytes + size_hint
        try:
            # The running estimate only grows; only when it crosses the limit do we measure exactly.
            apply_ops(self.state, ops, self._size_check if estimate > self.max_state_bytes else None)
        except InvalidOp as exc:
            return self._reject(device, op_id, Rejected(exc.code, str(exc), self.version))
        if estimate <= self.max_state_bytes:
            self.approx_bytes = estimate  # otherwise _size_check has just measured it exactly
        self.version += 1
        self.updated_at = now
        if op_id is not None:
            self._remember(device, op_id, self.version)
        patch = self._patch(device, ops)
        encoded = dumps_kept(patch)  # exact-size bytes (see dumps_kept), kept for replay and sent as they are
        self._keep_for_replay(encoded, size_hint)
        self.effects.append(Journal(Change(self.version, device, op_id, ops, size_hint)))  # size: memory journal
        if op_id is not None:
            self.effects.append(Send(device, {"t": "ack", "id": op_id, "version": self.version}))
        self.effects.append(Broadcast(patch, exclude=device, json=encoded))
        return Accepted(self.version)

    def _keep_for_replay(self, patch: bytes, size: int) -> None:
        """Keep an encoded patch (`size`: its ops' size) for resuming devices, within `replay_window` patches and
        `max_state_bytes` bytes."""
        replay, sizes = self.replay, self.replay_sizes
        if not isinstance(replay, deque) or not isinstance(sizes, deque):
            replay, sizes = self.replay, self.replay_sizes = deque(), deque()
        replay.append(patch)
        sizes.append(size)
        self.replay_bytes += size
        while replay and (len(replay) > self.replay_window or self.replay_bytes > self.max_state_bytes):
            replay.popleft()
            self.replay_bytes -= sizes.popleft()

    def _size_check(self, state: dict[str, JSON]) -> None:
        size = len(orjson.dumps(state))
        if size > self.max_state_bytes:
            raise TooLarge(f"state would exceed {self.max_state_bytes} bytes")
        self.approx_bytes = size

    # ---- handoff --------------------------------------------------------------------------------

    def pause(self, device: str, op_id: int, now: float) -> Result:
        """The active device pauses: snapshot first, then everyone hears the session is free."""
        if self.status == "ended":
            return self._reject(device, op_id, Rejected(codes.E_NOT_FOUND, "session ended"))
        answered = self._answered(device, op_id)
        if answered is not None:
            return Accepted(answered, self.active)
        if self.active is not None and self.active != device:
            return self._reject(
                device, op_id, Rejected(codes.CONFLICT, f"only the active device ({self.active}) may pause")
            )
        self.status = "paused"
        self._set_active(None, now, checkpoint="pause")
        self._remember(device, op_id, self.version)
        self.effects.append(Send(device, {"t": "ack", "id": op_id, "version": self.version}))
        return Accepted(self.version, None)

    def claim(self, device: str, op_id: int | None, now: float, rest_key: int | None = None) -> Result:
        """`device` becomes active (a WebSocket claim, or REST handoff when op_id is None, with its hashed
        Idempotency-Key when it has one)."""
        if self.status == "ended":
            return self._reject(device, op_id, Rejected(codes.E_NOT_FOUND, "session ended"))
        if op_id is not None:
            answered = self._answered(device, op_id)
            if answered is not None:
                return Accepted(answered, self.active)
        if rest_key is not None and rest_key in self.rest_keys:
            return Accepted(self.rest_keys[rest_key], device)  # the first answer; nothing changes
        self.status = "active"
        self._set_active(device, now)
        if op_id is not None:
            self._remember(device, op_id, self.version)
            self.effects.append(Send(device, {"t": "ack", "id": op_id, "version": self.version}))
        if rest_key is not None:
            self._remember(REST_DEVICE, rest_key, self.version)  # saved by the handoff's snapshot
        return Accepted(self.version, device)

    def _set_active(self, device: str | None, now: float, checkpoint: str = "handoff") -> None:
        previous = self.active
        self.active = device
        self.updated_at = now
        self.effects.append(Checkpoint(checkpoint, sync=True))
        self.effects.append(Broadcast({"t": "handoff", "active": device, "version": self.version}))
        self.effects.append(Publish("session.handoff", {"from": previous, "to": device, "version": self.version}))

    # ---- end ----------------------------------------------------------------------------------

    def end(self, now: float) -> None:
        """Deleted over REST: devices get `ended`, then close 4010; the actor stops."""
        self.status = "ended"
        self.updated_at = now
        self.effects.append(Broadcast({"t": "ended"}))
        self.effects.append(Close(4010, "session ended"))
        self.effects.append(Publish("session.ended", {"version": self.version}))
        self.effects.append(Stop())

    # ---- helpers ------------------------------------------------------------------------------

    def take_effects(self) -> list[Effect]:
        effects, self.effects = self.effects, []
        return effects

    def _reject(self, device: str, op_id: int | None, rejected: Rejected) -> Rejected:
        if op_id is not None:
            self.effects.append(Send(device, error_frame(rejected, op_id)))
        return rejected

    def _answered(self, device: str, op_id: int) -> int | None:
        """The original answer to a retransmitted request: its ack again, nothing applied (DESIGN §3).

        Op ids only grow per device, so an id at or below the device's high-water mark was answered before. Its
        exact version is kept for the newest ACKED_PER_DEVICE (ACKED_IN_SNAPSHOT after a restore); an older one is
        acked with the version of the next answered id, an upper bound of its own.
        """
        if device == REST_DEVICE:  # an Idempotency-Key: exact match only (keys do not grow)
            return self.rest_keys.get(op_id)
        known = self.acked.get(device)
        if known is not None:
            if not known or op_id > known.high:
                return None
            version = known.answer(op_id)
        else:
            hw = self.high_water.get(device)
            if hw is None or op_id > hw >> _HW_SHIFT:
                return None
            version = hw & _HW_MASK  # its own version when it is the mark, else an upper bound of it
        self.effects.append(Send(device, {"t": "ack", "id": op_id, "version": version}))
        return version

    def _remember(self, device: str, op_id: int, version: int) -> None:
        if device == REST_DEVICE:
            self.rest_keys[op_id] = version
            if len(self.rest_keys) > REST_KEYS:
                self.rest_keys.popitem(last=False)
            return
        answers = self.acked.get(device)
        if answers is None:
            hw = self.high_water.pop(device, None)
            answers = self.acked[device] = Answers([(hw >> _HW_SHIFT, hw & _HW_MASK)] if hw is not None else None)
            self.acked_count += len(answers)
            self._demote_beyond_full()
        else:
            self.acked.move_to_end(device)
        self.acked_count += answers.add(op_id, version)

    def _demote_beyond_full(self) -> None:
        """Keep full answers for the ACKED_FULL_DEVICES most recently active devices; older ones keep their
        high-water mark, and only ACKED_DEVICES devices in all are remembered."""
        while len(self.acked) > ACKED_FULL_DEVICES:
            device, answers = self.acked.popitem(last=False)
            self.acked_count -= len(answers)
            if answers:
                self.high_water[device] = answers.high << _HW_SHIFT | answers.versions[-1]
                self.high_water.move_to_end(device)
        while len(self.high_water) + len(self.acked) > ACKED_DEVICES and self.high_water:
            self.high_water.popitem(last=False)

    @property
    def acked_bytes(self) -> int:
        """About what the remembered answers take (counted in the memory budget, §5.5)."""
        full = len(self.acked) * ANSWERS_OVERHEAD_BYTES + self.acked_count * 16
        return full + len(self.high_water) * HIGH_WATER_BYTES

    def _patch(self, device: str, ops: list[dict[str, JSON]]) -> dict[str, JSON]:
        return {"t": "patch", "version": self.version, "device": device, "ops": ops}

    def _device_list(self) -> list[dict[str, str]]:
        return [info.as_json() for info in self.devices.values()]

    def _presence(self) -> dict[str, JSON]:
        return {"t": "presence", "devices": self._device_list(), "active": self.active}
