"""What can be put in a session actor's mailbox, the port through which it reaches a device, and the reference
through which transport and api reach it.

The actor knows devices only through `DeviceLink`: a local WebSocket (transport's Connection) or a device on
another pod (`actors.remote.RemoteLink`). Transport and api know actors only through `ActorRef`: the local
actor or a relay to the owner pod. Neither side can tell which, so one code path serves both (DESIGN §6).
Actors import neither transport nor api (DESIGN §1 dependency direction).
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


class SessionNotFound(LookupError):
    """No such session, or it has ended."""


class AnswerTimeout(ActorUnavailable):
    """No answer in time. The request may still be carried out (it may sit in a mailbox, or its answer got lost):
    its outcome is unknown, unlike a refusal."""


class NotOwner(ActorUnavailable):
    """The pod asked does not place the session on itself (views differ for a moment): ask again."""


class Outgoing:
    """One server→client frame shared by every device it goes to; transport fills `encoded` once per format.

    `born`: wall clock of the turn that accepted the change it announces (the relay publish for a frame from
    another pod), for the delivery latency metric; 0.0 when not measured.
    """

    __slots__ = ("born", "encoded", "frame")

    def __init__(self, frame: dict[str, JSON], born: float = 0.0) -> None:
        self.frame = frame
        self.encoded: dict[str, bytes] = {}  # payload bytes per subprotocol (JSON as UTF-8)
        self.born = born


class DeviceLink(Protocol):
    """A connected device as the actor sees it; every method is non-blocking.

    The link owns its send queue: when it overflows, the link drops what a welcome supersedes and sends the
    actor a `Resync` (DESIGN §5.5), so the actor never decides for a device it cannot see.
    """

    @property
    def device(self) -> str: ...

    @property
    def link_id(self) -> str:
        """Serialisable and unique in the cluster: `pod/connection`."""
        ...

    @property
    def queued_bytes(self) -> int:
        """Encoded bytes waiting in this pod's memory for the device (its send queue; 0 when the queue is on
        another pod). Read by the memory budget, not per frame: it must be cheap."""
        ...

    def deliver(self, out: Outgoing) -> None:
        """Queue a frame for the device. A welcome supersedes the patches queued before it."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close with `code` soon."""
        ...


class ActorRef(Protocol):
    """A session actor as transport and api see it: on this pod, or relayed to its owner pod."""

    @property
    def session_id(self) -> str: ...

    @property
    def gone(self) -> bool:
        """True once the actor takes no more messages (stopping, moved, or its pod left)."""
        ...

    def tell(self, message: Message) -> None:
        """Non-blocking; raises Overloaded (mailbox full) or ActorUnavailable."""
        ...

    async def ask(self, message: AskMessage, timeout_s: float = 10.0) -> Any: ...


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
            raise AnswerTimeout("the session did not answer in time")
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


@dataclass(slots=True)  # not frozen: built for every change (a frozen init costs 3x); never mutated
class ChangeRequest:
    link: DeviceLink
    op_id: int
    ops: list[dict[str, JSON]]
    base: int | None
    size: int | None = None  # the frame's length: an upper bound of the ops' size


@dataclass(frozen=True, slots=True)
class Resync:
    """The device's send queue overflowed: it needs a fresh full welcome (its queued patches were dropped)."""

    link: DeviceLink


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
    key: int | None = None  # the Idempotency-Key, hashed (actors.session.rest_key)


@dataclass(frozen=True, slots=True)
class RestHandoff:
    device: str
    reply: Reply = field(default_factory=Reply)
    key: int | None = None


@dataclass(frozen=True, slots=True)
class Describe:
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class End:
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Peek:
    """(version, active, status) of a live actor, for lists (no state copy)."""

    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Checkpoint, release the lease and stop. Devices on this pod are closed with `local_code` (1001 when the
    process shuts down), devices on other pods with 1013 (they resume through the session's next owner)."""

    reply: Reply = field(default_factory=Reply)
    local_code: int = 1001
    reason: str = "server shutting down"


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The session's lease is gone (not renewed in time, or taken over): stop at once, write nothing more."""


@dataclass(frozen=True, slots=True)
class Passivate:
    """The registry asks an idle actor to checkpoint and stop (memory budget, least recently used first)."""


@dataclass(frozen=True, slots=True)
class Crash:
    """Test hook: raise inside the actor, to exercise supervision."""


Message = (
    Attach | Detach | ChangeRequest | Resync | PauseRequest | ClaimRequest | RestChange | RestHandoff | Describe
    | Peek | End | Shutdown | Passivate | LeaseLost | Crash
)
AskMessage = RestChange | RestHandoff | Describe | Peek | End | Shutdown
