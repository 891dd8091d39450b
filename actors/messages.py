"""What can be put in a session actor's mailbox, and the port through which it reaches a device.

The actor knows devices only through `DeviceLink` (implemented by transport), so actors import
neither transport nor api (DESIGN §1 dependency direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

JSON = Any


class Overloaded(Exception):
    """The actor's mailbox is full: the caller should back off (never a hang)."""


class ActorUnavailable(Exception):
    """The actor could not answer (storage down, failed session, shutting down)."""


class Outgoing:
    """One server→client frame shared by every device it goes to; transport fills `encoded` once per format."""

    __slots__ = ("encoded", "frame")

    def __init__(self, frame: dict[str, JSON]) -> None:
        self.frame = frame
        self.encoded: dict[str, str | bytes] = {}


class DeviceLink(Protocol):
    """A connected device as the actor sees it; every method is non-blocking."""

    @property
    def device(self) -> str: ...

    @property
    def resyncing(self) -> bool:
        """True while a welcome that replaced an overflowed queue has not been written yet."""
        ...

    def deliver(self, out: Outgoing) -> bool:
        """Queue a frame (encoding it now); False when the send queue is full (nothing queued)."""
        ...

    def resync(self, out: Outgoing) -> None:
        """Drop every queued frame and queue `out` (a fresh full welcome) instead."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close with `code` soon."""
        ...


class Reply:
    """A one-shot answer slot for `ask`."""

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self, timeout_s: float = math.inf) -> Any:
        with trio.move_on_after(timeout_s):
            await self._event.wait()
        if not self._event.is_set():
            raise ActorUnavailable("the session did not answer in time")
        if self._error is not None:
            raise self._error
        return self._value


# ---- device messages (tell) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attach:
    link: DeviceLink
    kind: str
    resume: int | None
    resume_epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Detach:
    link: DeviceLink


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    link: DeviceLink
    op_id: int
    ops: list[dict[str, JSON]]
    base: int | None
    size: int | None = None  # the frame's length: an upper bound of the ops' size


@dataclass(frozen=True, slots=True)
class PauseRequest:
    link: DeviceLink
    op_id: int


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    link: DeviceLink
    op_id: int


# ---- API messages (ask: carry a Reply) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestChange:
    ops: list[dict[str, JSON]]
    base: int | None
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class RestHandoff:
    device: str
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Describe:
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class End:
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Checkpoint and stop (process shutdown): devices are closed with 1001."""

    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Passivate:
    """The registry asks an idle actor to checkpoint and stop (memory budget, least recently used first)."""


@dataclass(frozen=True, slots=True)
class Crash:
    """Test hook: raise inside the actor, to exercise supervision."""


Message = (
    Attach | Detach | ChangeRequest | PauseRequest | ClaimRequest | RestChange | RestHandoff | Describe | End
    | Shutdown | Passivate | Crash
)
AskMessage = RestChange | RestHandoff | Describe | End | Shutdown
