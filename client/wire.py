"""Wire-level pieces of the client SDK: codecs, close-code policy, backoff, and the public value types.

Kept apart from the connection logic so they can be tested (and reused by the bench) without sockets. The SDK
ships alone as `sessiond-client` (clients/python): it imports only the pure `protocol` package it shares with the
server (codes, ops, frames, codec), never the server's own packages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson

from protocol import codes
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

JSON = Any

SUBPROTOCOLS = {"json": JSON_SUBPROTOCOL, "msgpack": MSGPACK_SUBPROTOCOL}

# Close codes after which reconnecting cannot help (DESIGN §3): bad token, not the owner, no such session, deleted.
FINAL_CLOSE_CODES: dict[int, str] = dict(codes.FINAL_CLOSES)
# Upgrade rejections (HTTP status) that are final for the same reasons.
FINAL_HTTP_STATUSES: dict[int, str] = {
    codes.HTTP_STATUS[code]: code for code in (codes.E_UNAUTHORIZED, codes.E_FORBIDDEN, codes.E_NOT_FOUND)
}


class DecodeError(ValueError):
    """A server message that is neither JSON nor MessagePack: a protocol violation, so the client reconnects."""


class SessionError(Exception):
    """A request failed or the session stopped. `code` is a DESIGN §3 error code or a client-side one
    (`ended`, `closed`, `disconnected`, `timeout`); `version` is the server's version when it sent one."""

    def __init__(self, code: str, message: str = "", version: int | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.version = version


@dataclass(frozen=True, slots=True)
class Patch:
    """One change applied to the local state: from another device, from a replay, or our own acked op."""

    version: int
    device: str | None
    ops: list[dict[str, JSON]] = field(default_factory=list)
    own: bool = False


class Codec:
    """Encodes outgoing frames for the negotiated subprotocol and decodes incoming messages.

    Decoding goes by message type, not by what we asked for: text is always JSON, binary is MessagePack
    when that was negotiated (JSON bytes otherwise), so a server that declined our subprotocol still works.
    """

    def __init__(self, negotiated: str | None) -> None:
        self.binary = negotiated == SUBPROTOCOLS["msgpack"]

    def encode(self, frame: dict[str, JSON]) -> str | bytes:
        if self.binary:
            return msgpack.packb(frame, use_bin_type=True)
        return orjson.dumps(frame).decode()

    def decode(self, message: str | bytes) -> list[dict[str, JSON]]:
        """All frames of one message (a single frame or a batch array, DESIGN §3), skipping non-objects.

        Raises DecodeError when the message is not valid JSON / MessagePack.
        """
        if isinstance(message, bytes) and self.binary:
            try:
                data = msgpack.unpackb(message, raw=False, strict_map_key=False)
            except Exception as exc:  # msgpack raises several unrelated types for bad input
                raise DecodeError(f"bad msgpack message: {exc}") from exc
        else:
            try:
                data = orjson.loads(message)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"bad json message: {exc}") from exc
        items = data if isinstance(data, list) else [data]
        return [item for item in items if isinstance(item, dict) and isinstance(item.get("t"), str)]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads a crowd of devices reconnecting after a pod restart over the whole window.
    """
    ceiling = min(cap, base * 2 ** min(max(attempt, 0), 60))
    return (rng or random).uniform(0.0, ceiling)
