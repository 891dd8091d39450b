"""Test doubles for the actor runtime: a DeviceLink that records frames, and a journal that counts writes.

`FakeLink` follows the `DeviceLink` docstrings: `deliver` queues (encoding now, so a frame that is
mutated later is caught) and answers False when the queue is full; `resync` drops the queue and queues
one welcome, and `resyncing` stays True until that welcome is "written" (`flush`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from actors.messages import Outgoing
from actors.ops import apply_ops
from storage.memory import MemoryJournal
from storage.ports import Change

JSON = Any


class FakeLink:
    """A connected device: `queue` is its send queue, `sent` what was written to the socket."""

    def __init__(self, device: str, limit: int = 10_000) -> None:
        self._device = device
        self.limit = limit
        self.queue: list[dict[str, JSON]] = []
        self.sent: list[dict[str, JSON]] = []
        self.closed: tuple[int, str] | None = None
        self.resyncs = 0
        self._resync_pending = False

    @property
    def device(self) -> str:
        return self._device

    @property
    def resyncing(self) -> bool:
        return self._resync_pending

    def deliver(self, out: Outgoing) -> bool:
        if len(self.queue) >= self.limit:
            return False
        self.queue.append(self._encode(out))
        return True

    def resync(self, out: Outgoing) -> None:
        self.resyncs += 1
        self.queue = [self._encode(out)]
        self._resync_pending = True

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def flush(self) -> list[dict[str, JSON]]:
        """The writer task drained the queue to the socket."""
        frames, self.queue = self.queue, []
        self.sent.extend(frames)
        self._resync_pending = False
        return frames

    @property
    def frames(self) -> list[dict[str, JSON]]:
        """Everything addressed to this device so far, written or still queued, in order."""
        return [*self.sent, *self.queue]

    def of(self, kind: str) -> list[dict[str, JSON]]:
        return [f for f in self.frames if f["t"] == kind]

    @staticmethod
    def _encode(out: Outgoing) -> dict[str, JSON]:
        data = out.encoded.get("json")
        if data is None:
            data = out.encoded["json"] = orjson.dumps(out.frame)
        frame: dict[str, JSON] = orjson.loads(data)
        return frame


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

    async def append(self, session_id: str, changes: Sequence[Change]) -> None:
        self.appends.append(list(changes))
        await self.inner.append(session_id, changes)

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        return await self.inner.read_after(session_id, version)

    async def trim(self, session_id: str, upto_version: int) -> None:
        await self.inner.trim(session_id, upto_version)

    async def delete(self, session_id: str) -> None:
        await self.inner.delete(session_id)
