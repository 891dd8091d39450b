"""The client's local copy of a session, kept exact by version discipline (DESIGN §3, §5.1); no sockets here.

Every change moves `version` by exactly one. A patch that skips a version is a gap (the connection must be
dropped and resumed); our own op is applied when its ack says it is the next version (the server sends the
sender no patch for it); an ack that overtakes a not-yet-received patch is held until the gap fills. A replay
that does not line up, or ops that do not apply, mean our copy diverged: resync from a full welcome.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from client.wire import JSON, Patch, SessionError
from protocol.ops import InvalidOp, apply_ops

Frame = dict[str, JSON]
MAX_HELD = 1024


class ResyncNeeded(Exception):
    """The local copy cannot follow the stream: reconnect, with `resume` (replay) or without (full state)."""

    def __init__(self, resume: bool, why: str) -> None:
        super().__init__(why)
        self.resume = resume
        self.why = why


class PendingRequest:
    """An op/pause/claim awaiting its ack; kept (and retransmitted) until acked, whoever still waits on it."""

    __slots__ = ("done", "error", "frame", "version")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.done = trio.Event()
        self.version: int | None = None
        self.error: SessionError | None = None

    def resolve(self, version: int) -> None:
        if not self.done.is_set():
            self.version = version
            self.done.set()

    def fail(self, error: SessionError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def wait(self) -> int:
        await self.done.wait()
        if self.error is not None:
            raise SessionError(self.error.code, self.error.message, self.error.version)
        assert self.version is not None
        return self.version


class Replica:
    """state/version/active/devices of one session as seen by one device, plus its unacked requests."""

    def __init__(self, device: str, on_patch: Callable[[Patch], None] | None = None) -> None:
        self.device = device
        self.state: dict[str, JSON] = {}
        self.version = 0
        self.active: str | None = None
        self.devices: list[Frame] = []
        self.ended = False
        self.have_state = False
        self.epoch: str | None = None  # the server incarnation our version belongs to (sent back in resume)
        self.pending: dict[int, PendingRequest] = {}
        self.held: dict[int, list[Frame]] = {}
        self.held_since: float | None = None
        self.changed = trio.Event()  # set (and replaced) whenever `version` moves
        self._on_patch = on_patch

    # ---- frames -----------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        """Apply a server frame other than ack/error/authed (those need the caller's bookkeeping too)."""
        kind = frame["t"]
        if kind == "patch":
            self.on_patch(frame)
        elif kind == "welcome":
            self.on_welcome(frame)
        elif kind == "handoff":
            self.active = frame.get("active")
        elif kind == "presence":
            devices = frame.get("devices")
            self.devices = devices if isinstance(devices, list) else []
            if "active" in frame:
                self.active = frame.get("active")
        elif kind == "ended":
            self.ended = True
            self.fail_pending(SessionError("ended", "the session was deleted"))

    def on_welcome(self, frame: Frame) -> None:
        if frame.get("mode") == "replay":
            patches = frame.get("patches")
            for patch in patches if isinstance(patches, list) else []:
                version = patch.get("version") if isinstance(patch, dict) else None
                if version != self.version + 1:
                    raise ResyncNeeded(False, f"replay gap: got {version} at {self.version}")
                device = patch.get("device")
                self._apply(patch.get("ops") or [], version, device, own=device == self.device)
            if frame.get("version", self.version) != self.version:
                raise ResyncNeeded(False, f"replay ends at {self.version}, welcome says {frame.get('version')}")
        else:
            state, version = frame.get("state"), frame.get("version")
            if not isinstance(state, dict) or not isinstance(version, int):
                raise ResyncNeeded(False, "full welcome without state/version")
            self.state = state
            self.version = version
            self._bump()
        epoch = frame.get("epoch")
        self.epoch = epoch if isinstance(epoch, str) else None
        self.active = frame.get("active")
        devices = frame.get("devices")
        self.devices = devices if isinstance(devices, list) else []
        self.have_state = True
        self._drain_held()

    def on_patch(self, frame: Frame) -> None:
        version = frame.get("version")
        if not isinstance(version, int) or version <= self.version:
            return  # a duplicate (already in a welcome we got): nothing to do
        if version != self.version + 1:
            raise ResyncNeeded(True, f"gap: patch {version} at version {self.version}")
        self._apply(frame.get("ops") or [], version, frame.get("device"), own=False)
        self._drain_held()

    def on_ack(self, frame: Frame) -> None:
        request = self.pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
        version = frame.get("version")
        if request is None or not isinstance(version, int):
            return
        request.resolve(version)
        if request.frame["t"] != "op":
            return  # pause/claim change who is active, not the state
        ops = request.frame["ops"]
        if version == self.version + 1:
            self._apply(ops, version, self.device, own=True)
            self._drain_held()
        elif version > self.version + 1:
            # Our change overtook a patch still on its way: hold it until the gap fills (or resync).
            self.held[version] = ops
            if self.held_since is None:
                self.held_since = trio.current_time()
            if len(self.held) > MAX_HELD:
                raise ResyncNeeded(True, "too many acks ahead of the stream")
        # version <= self.version: already part of a welcome we received.

    def on_error(self, frame: Frame) -> SessionError | None:
        """Fail the request the error names; returns the error when it named none."""
        version = frame.get("version")
        error = SessionError(
            str(frame.get("code", "internal")),
            str(frame.get("message", "")),
            version if isinstance(version, int) else None,
        )
        request = self.pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
        if request is None:
            return error
        request.fail(error)
        return None

    def fail_pending(self, error: SessionError) -> None:
        pending, self.pending = self.pending, {}
        for request in pending.values():
            request.fail(error)

    def bump(self) -> None:
        """Wake everyone waiting on `changed` (also used when the session stops)."""
        self._bump()

    # ---- internals --------------------------------------------------------------------------------

    def _apply(self, ops: list[Frame], version: int, device: str | None, *, own: bool) -> None:
        try:
            apply_ops(self.state, ops)
        except InvalidOp as exc:
            raise ResyncNeeded(False, f"local state diverged at version {version}: {exc}") from exc
        self.version = version
        self._bump()
        if self._on_patch is not None:
            self._on_patch(Patch(version, device, ops, own))

    def _drain_held(self) -> None:
        if not self.held:
            return
        for version in [v for v in self.held if v <= self.version]:
            del self.held[version]
        while self.version + 1 in self.held:
            version = self.version + 1
            self._apply(self.held.pop(version), version, self.device, own=True)
        if not self.held:
            self.held_since = None

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
