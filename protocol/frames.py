"""Client→server frames of wire protocol v1 (DESIGN §3) as frozen dataclasses, and the error type.

Server→client frames are plain dicts built by the actor and wrapped in `codec.Encoded`, so each is
encoded once for every device that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = Any

DEVICE_KINDS = frozenset({"web", "ios", "android", "desktop", "other"})


class ProtocolError(Exception):
    """The peer sent something we refuse. `code` is a DESIGN §3 error code; `close` a close code or None."""

    def __init__(self, code: str, message: str, *, id: int | None = None, close: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.close = close


@dataclass(frozen=True, slots=True)
class Hello:
    session: str
    device: str
    token: str | None = None
    kind: str = "other"
    resume: int | None = None  # the client's last version when resuming
    resume_epoch: str | None = None  # the `epoch` of the welcome that version came from


@dataclass(slots=True)  # not frozen: decoded for every request (a frozen init costs 3x); never mutated
class Op:
    id: int
    ops: list[dict[str, JSON]]  # shape-checked: op in set/del/inc, path str, value/by present
    base: int | None = None


@dataclass(slots=True)  # not frozen: decoded for every request (a frozen init costs 3x); never mutated
class Pause:
    id: int


@dataclass(slots=True)  # not frozen: decoded for every request (a frozen init costs 3x); never mutated
class Claim:
    id: int


@dataclass(frozen=True, slots=True)
class Auth:
    token: str


ClientFrame = Hello | Op | Pause | Claim | Auth
