"""Test doubles for the actor runtime: a DeviceLink that records frames, a journal that counts writes, and a
registry builder.

`FakeLink` follows the `DeviceLink` docstrings and keeps its frames in transport's real `SendQueue` (so the
overflow rules are the ones a WebSocket gets): `deliver` queues (encoding now, so a frame that is mutated later is
caught); an overflow drops what a welcome supersedes and tells the link's actor `Resync` (when `actor` is set);
a second overflow before that welcome was "written" (`flush`) closes it with 4008.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from actors.config import ActorConfig
from actors.leases import LeaseKeeper
from actors.messages import Outgoing, Resync
from actors.registry import Registry
from protocol.ops import apply_ops
from storage.memory import MemoryJournal, MemoryLeases
from storage.ports import Change, Storage
from transport.sendqueue import Push, SendQueue

JSON = Any


def make_registry(storage: Storage, config: ActorConfig, pod: str = "pod-a", ttl_s: float = 3.0) -> Registry:
    """A registry whose leases come from the storage (in-memory ones when it has none)."""
    keeper = LeaseKeeper(storage.leases or MemoryLeases(), storage.sessions, pod, ttl_s)
    return Registry(storage, config, keeper)


class FakeLink:
    """A connected device: `queue` is its send queue, `sent` what was written to the socket."""

    def __init__(self, device: str, limit: int = 10_000) -> None:
        self._device = device
        self.limit = limit
        self._queue = SendQueue(limit, 1 << 30)
        self.sent: list[dict[str, JSON]] = []
        self.closed: tuple[int, str] | None = None
        self.resyncs = 0
        self.actor: Any = None  # told `Resync` on an overflow

    @property
    def device(self) -> str:
        return self._device

    @property
    def link_id(self) -> str:
        return f"test/{self._device}/{id(self)}"

    @property
    def resyncing(self) -> bool:
        return self._queue.resyncing

    @property
    def queued_bytes(self) -> int:
        return self._queue.queued_bytes

    def deliver(self, out: Outgoing) -> None:
        outcome = self._queue.push(out.frame["t"], self._encode(out))
        if outcome is Push.RESYNC:
            self.resyncs += 1
            if self.actor is not None:
                self.actor.tell(Resync(self))
        elif outcome is Push.EVICT:
            self.close(4008, "slow_consumer")

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    @property
    def queue(self) -> list[dict[str, JSON]]:
        return [orjson.loads(data) for data in self._queue.peek()]

    def flush(self) -> list[dict[str, JSON]]:
        """The writer task drained the queue to the socket."""
        frames = [orjson.loads(data) for data in self._queue.take(1 << 30, 1 << 62)]
        self.sent.extend(frames)
        return frames

    @property
    def frames(self) -> list[dict[str, JSON]]:
        """Everything addressed to this device so far, written or still queued, in order."""
        return [*self.sent, *self.queue]

    def of(self, kind: str) -> list[dict[str, JSON]]:
        return [f for f in self.frames if f["t"] == kind]

    @staticmethod
    def _encode(out: Outgoing) -> bytes:
        data = out.encoded.get("json")
        if data is None:
            data = out.encoded["json"] = orjson.dumps(out.frame)
        return data if isinstance(data, bytes) else data.encode()


class Replica:
    """What a well-behaved client holds after applying the frames it received (DESIGN §3, §5.1)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.state: dict[str, JSON] | None = None
        self.version = -1
        self.active: str | None = None
        self.pending: dict[int, list[dict[str, JSON]]] = {}
        self.acked: dict[int, int] = {}

    def send(self, op_id: int, ops: list[dict[str, JSON]]) -> None:
        self.pending[op_id] = ops

    def receive(self, frame: dict[str, JSON]) -> None:
        """Apply one frame; raises AssertionError on anything that breaks one order (gap, duplicate)."""
        t = frame["t"]
        if t == "welcome":
            if frame["mode"] == "full":
                self.state = frame["state"]
            else:
                assert self.state is not None, "replay welcome without a state to replay onto"
                for patch in frame["patches"]:
                    self._patch(patch)
            assert self.version <= frame["version"] or frame["mode"] == "full"
            self.version = frame["version"]
            self.active = frame["active"]
        elif self.state is None:
            return  # before the first welcome nothing can be applied (a client ignores it)
        elif t == "patch":
            self._patch(frame)
        elif t == "ack":
            self._ack(frame)
        elif t in ("handoff", "presence"):
            self.active = frame["active"]

    def _patch(self, patch: dict[str, JSON]) -> None:
        assert self.state is not None
        assert patch["version"] == self.version + 1, f"{self.device}: patch {patch['version']} after {self.version}"
        apply_ops(self.state, patch["ops"])
        self.version = patch["version"]

    def _ack(self, frame: dict[str, JSON]) -> None:
        assert self.state is not None
        op_id, version = frame["id"], frame["version"]
        if op_id in self.acked:
            assert self.acked[op_id] == version, "a retransmit got a different ack"
            return
        ops = self.pending.pop(op_id, None)
        if ops is None:
            return  # pause/claim acks carry no change
        self.acked[op_id] = version
        if version == self.version + 1:
            apply_ops(self.state, ops)
            self.version = version
        else:
            assert version <= self.version, f"{self.device}: ack {version} after {self.version} (gap)"


class CountingJournal:
    """A MemoryJournal that counts `append` calls (group commit: one per actor turn)."""

    def __init__(self, inner: MemoryJournal | None = None) -> None:
        self.inner = inner or MemoryJournal()
        self.appends: list[list[Change]] = []

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        self.appends.append(list(changes))
        await self.inner.append(session_id, changes, token)

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        return await self.inner.read_after(session_id, version)

    async def trim(self, session_id: str, upto_version: int) -> None:
        await self.inner.trim(session_id, upto_version)

    async def delete(self, session_id: str) -> None:
        await self.inner.delete(session_id)
