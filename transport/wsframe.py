"""Server-to-client WebSocket data frames (RFC 6455 §5.2), built without wsproto: sans-I/O, for the fast path.

A server frame is never masked, and sessiond negotiates no extension, so a complete, final frame is a two to ten
byte header and the payload. wsproto builds the same bytes through several layers of Python per message; these
are what `transport/connection.py` writes straight to the socket (runtime/directstream.py).
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_FIN = 0x80
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


def data_frame(payload: bytes, *, binary: bool) -> bytes:
    """One complete (FIN) unmasked text or binary frame. A text payload must be UTF-8: ours come from orjson."""
    first = _FIN | (OP_BINARY if binary else OP_TEXT)
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 0x10000:
        return _LEN16.pack(first, 126, size) + payload
    return _LEN64.pack(first, 127, size) + payload


def control_frame(opcode: int, payload: bytes) -> bytes:
    """A close, ping or pong frame; its payload is at most 125 bytes (RFC 6455 §5.5)."""
    if len(payload) > 125:
        raise ValueError("a control frame carries at most 125 bytes")
    return bytes((_FIN | opcode, len(payload))) + payload
