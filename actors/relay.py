"""The relay wire format between pods (DESIGN §6): plain functions and data, no I/O.

One pub/sub message carries every item one pod has for another at that moment: MessagePack of
`[from_pod, sent_at, [item, ...]]`, each item a short list whose first element names it.

Edge pod (where the device is connected) -> owner pod (where its session's actor lives):
- `["a", req, session, conn, device, kind, resume, epoch]`: attach a device; the link's message 1
- `["m", conn, seq, what, args]`: a device's message: `op` [op_id, ops, base, size], `pause` / `claim` op_id,
  `resync` / `detach` None
- `["q", req, session, what, args]`: an ask (REST): `change` [ops, base, key], `handoff` [device, key],
  `describe`, `end`, `peek` [sessions], `stats` (`key`: the hashed Idempotency-Key or None)
Owner pod -> edge pod:
- `["f", frame, [conn, seq, conn, seq, ...]]`: one frame for several devices of that pod (a patch crosses once)
- `["c", conn, code, reason]`: close a device's connection
- `["r", req, status, value]`: the answer to an `a` or `q`; status `ok`, or an error kind of `REPLY_ERRORS`

`seq` numbers every message of one link (device connection) in each direction, starting at 1 with the attach
and the first frame. Pub/sub is at-most-once: a gap means something was lost, and the link is cut (the device
reconnects, resumes and retransmits), never silently continued.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack

from actors.session import Accepted, Rejected

JSON = Any
Item = list[Any]

# Error kinds of an `r` item: what the asking side raises for each.
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"
OVERLOADED = "overloaded"
NOT_OWNER = "not_owner"  # the receiving pod does not place the session on itself (views differ for a moment)
TIMEOUT = "timeout"  # the owner's actor did not answer in time: the outcome is unknown
REPLY_ERRORS = frozenset({NOT_FOUND, UNAVAILABLE, OVERLOADED, NOT_OWNER, TIMEOUT})


class BadRelayMessage(ValueError):
    """Not a relay message of this version (dropped and counted, never a crash)."""


def encode(pod: str, items: list[Item]) -> bytes:
    data: bytes = msgpack.packb([pod, time.time(), items], use_bin_type=True)
    return data


def decode(data: bytes) -> tuple[str, float, list[Item]]:
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadRelayMessage(f"undecodable relay message: {exc}") from exc
    if (
        not isinstance(message, list)
        or len(message) != 3
        or not isinstance(message[0], str)
        or not _is_number(message[1])
        or not isinstance(message[2], list)
    ):
        raise BadRelayMessage("not a relay envelope")
    items = [item for item in message[2] if isinstance(item, list) and item and isinstance(item[0], str)]
    return message[0], float(message[1]), items


def result_to_wire(result: Accepted | Rejected) -> list[Any]:
    if isinstance(result, Accepted):
        return ["acc", result.version, result.active]
    return ["rej", result.code, result.message, result.version]


def result_from_wire(value: Any) -> Accepted | Rejected:
    if isinstance(value, list) and len(value) == 3 and value[0] == "acc":
        _, version, active = value
        if _is_int(version) and (active is None or isinstance(active, str)):
            return Accepted(version, active)
    elif isinstance(value, list) and len(value) == 4 and value[0] == "rej":
        _, code, message, version = value
        if isinstance(code, str) and isinstance(message, str) and (version is None or _is_int(version)):
            return Rejected(code, message, version)
    raise BadRelayMessage(f"not a change result: {value!r}"[:200])


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)
