"""Client-to-server WebSocket frames (RFC 6455 §5), parsed without wsproto: sans-I/O, for the fast path.

wsproto's pure-Python parser (a buffer object, a header object, an XorMaskerSimple and an incremental decoder
per frame) cost about 12% of server CPU. Nearly every read is one small, masked, final text frame, so `feed`
takes that case in a handful of integer operations on the bytes as read, unmasked with a single big-int XOR;
everything else goes through one plain loop that parses in place and copies only a partial frame.

This is the server's side only: every frame must be masked, and sessiond negotiates no extension, so any RSV
bit is a protocol error. Text is validated strictly, once per message (not incrementally per fragment).
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA
_FIN = 0x80
_RSV = 0x70
_MASKED = 0x80
_MAX_CONTROL = 125

_PROTOCOL_ERROR = 1002
_INVALID_DATA = 1007
_TOO_BIG = 1009

_TEXT_FRAME = _FIN | _OP_TEXT
_BINARY_FRAME = _FIN | _OP_BINARY

# Unmasking, the measured fastest way for each size. Up to 125 bytes: the frame's mask and payload read as one
# little-endian int, the 32-bit mask repeated by multiplying it with 0x...000100000001 (`_REPEAT[words]`), the
# XOR cut to the payload's length (`_LOW[size]`): no bytes built but the result. Up to 511 bytes: the same XOR
# with the repeated mask built as bytes. From 512 bytes, four strided `translate`s through a 256-byte XOR table
# beat the big-int conversions (about 1 ns a byte each way): 60 KiB in ~115 us against ~170 us.
_REPEAT = tuple(sum(1 << (32 * word) for word in range(words)) for words in range(_MAX_CONTROL // 4 + 2))
_LOW = tuple((1 << (8 * size)) - 1 for size in range(_MAX_CONTROL + 1))
_TRANSLATE_FROM = 512
_XOR_TABLES = tuple(bytes(byte ^ key for byte in range(256)) for key in range(256))


class PingFrame(NamedTuple):
    payload: bytes


class PongFrame(NamedTuple):
    payload: bytes


class CloseFrame(NamedTuple):
    code: int | None  # None when the close frame had an empty payload
    reason: str


Event: TypeAlias = str | bytes | PingFrame | PongFrame | CloseFrame


class WsViolation(Exception):
    """The peer broke the protocol: close with `close_code` (1002 protocol error, 1007 invalid UTF-8, 1009 too big).

    `events` holds what the same `feed` call had parsed before the violation, so a caller may still act on it.
    """

    __slots__ = ("close_code", "events", "reason")

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason
        self.events: list[Event] = []

    def __str__(self) -> str:
        return f"{self.reason} (close code {self.close_code})"


def _unmask(data: bytes | bytearray, start: int, size: int) -> bytes | bytearray:
    """The payload at `start` XORed with the mask in the four bytes before it, for more than 125 bytes."""
    mask = data[start - 4 : start]
    if size < _TRANSLATE_FROM:
        return (
            int.from_bytes(data[start : start + size], "big") ^ int.from_bytes((mask * (size // 4 + 1))[:size], "big")
        ).to_bytes(size, "big")
    out = bytearray(data[start : start + size])  # one C-level pass per mask byte over every fourth byte
    tables = _XOR_TABLES
    out[0::4] = out[0::4].translate(tables[mask[0]])
    out[1::4] = out[1::4].translate(tables[mask[1]])
    out[2::4] = out[2::4].translate(tables[mask[2]])
    out[3::4] = out[3::4].translate(tables[mask[3]])
    return out


def _valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4: what a peer may send (1004-1006 and 1015 are reserved or local-only, 1016-2999 unassigned)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _close_frame(payload: bytes) -> CloseFrame:
    """A close frame's payload: nothing, or a two-byte code and a UTF-8 reason."""
    if not payload:
        return CloseFrame(None, "")
    if len(payload) == 1:
        raise WsViolation(_PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not _valid_close_code(code):
        raise WsViolation(_PROTOCOL_ERROR, f"close frame with invalid code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsViolation(_INVALID_DATA, "close reason is not valid UTF-8") from None
    return CloseFrame(code, reason)


class FrameReader:
    """Parses what a client sends into messages and control frames; finished after a close frame or a violation."""

    __slots__ = ("_buf", "_done", "_fast", "_max", "_need", "_opcode", "_parts", "_size", "_small")

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._small = min(max_message_bytes, _MAX_CONTROL)  # the largest payload `feed` takes in one step
        self._fast = self._small  # that limit while nothing is buffered or open, else -1: one check in `feed`
        self._buf = bytearray()  # the start of a frame not yet complete
        self._need = 2  # how many bytes `_buf` must hold before parsing it again can get anywhere
        self._opcode = 0  # the opcode of the fragmented message being gathered; 0 when none is open
        self._parts: list[bytes | bytearray] = []  # its payloads so far
        self._size = 0  # their total size, checked against the cap before each fragment is buffered
        self._done = False

    def feed(self, data: bytes) -> list[Event]:
        """Every event `data` completes, in order. Raises `WsViolation`; once that or a close frame was seen,
        returns [] for good."""
        size = len(data) - 6
        # The common case, in place: `data` is exactly one small, masked, final text or binary frame.
        if 0 <= size <= self._fast and data[1] == _MASKED | size:
            first = data[0]
            if _TEXT_FRAME <= first <= _BINARY_FRAME:
                frame = int.from_bytes(data, "little")  # header, mask, payload: lowest bytes first
                payload = (
                    ((frame >> 48) ^ ((frame >> 16) & 0xFFFFFFFF) * _REPEAT[(size >> 2) + 1]) & _LOW[size]
                ).to_bytes(size, "little")
                if first == _BINARY_FRAME:
                    return [payload]
                try:
                    return [payload.decode("utf-8")]
                except UnicodeDecodeError:
                    pass  # the general path raises it, and finishes the reader
        return self._feed(data)

    def _feed(self, data: bytes) -> list[Event]:
        """Everything else: parse straight from `data` when nothing is buffered, keep only a partial frame."""
        if self._done:
            return []
        buf = self._buf
        source: bytes | bytearray = data
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            source = buf
        elif not data:
            return []
        events: list[Event] = []
        try:
            pos = self._parse(source, events)
        except WsViolation as exc:
            self._finish()
            exc.events = events
            raise
        if self._done:
            self._finish()
        elif buf:
            del buf[:pos]
        elif pos < len(data):
            buf += memoryview(data)[pos:]  # one copy of the partial frame, and nothing else
        self._fast = -1 if (buf or self._opcode or self._done) else self._small
        return events

    def _finish(self) -> None:
        """Drop all state: nothing the peer sends now is read."""
        self._done = True
        self._fast = -1
        self._buf.clear()
        self._parts = []

    def _parse(self, data: bytes | bytearray, events: list[Event]) -> int:
        """Append the events of every complete frame in `data` and return where the rest begins; checks each header
        before waiting for its payload, so an oversized or malformed frame fails at once."""
        end = len(data)
        pos = 0
        while True:
            avail = end - pos
            if avail < 2:
                self._need = 2
                return pos
            first = data[pos]
            size = data[pos + 1]
            if first & _RSV:
                raise WsViolation(_PROTOCOL_ERROR, "RSV bit set with no extension negotiated")
            if size < _MASKED:
                raise WsViolation(_PROTOCOL_ERROR, "unmasked client frame")
            size -= _MASKED
            if size < 126:
                start = pos + 6
            elif size == 126:
                if avail < 4:
                    self._need = 4
                    return pos
                size = (data[pos + 2] << 8) | data[pos + 3]
                if size < 126:
                    raise WsViolation(_PROTOCOL_ERROR, "payload length not in its shortest encoding")
                start = pos + 8
            else:
                if avail < 10:
                    self._need = 10
                    return pos
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if size >> 63:
                    raise WsViolation(_PROTOCOL_ERROR, "64-bit payload length with the most significant bit set")
                if size < 65536:
                    raise WsViolation(_PROTOCOL_ERROR, "payload length not in its shortest encoding")
                start = pos + 14
            opcode = first & 0x0F
            if opcode >= _OP_CLOSE:
                if opcode > _OP_PONG:
                    raise WsViolation(_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                if first < _FIN:
                    raise WsViolation(_PROTOCOL_ERROR, "fragmented control frame")
                if size > _MAX_CONTROL:
                    raise WsViolation(_PROTOCOL_ERROR, "control frame payload over 125 bytes")
            elif opcode == _OP_CONTINUATION:
                if not self._opcode:
                    raise WsViolation(_PROTOCOL_ERROR, "continuation frame with no message open")
                if self._size + size > self._max:
                    raise WsViolation(_TOO_BIG, f"message over {self._max} bytes")
            elif opcode <= _OP_BINARY:
                if self._opcode:
                    raise WsViolation(_PROTOCOL_ERROR, "new message before the fragmented one finished")
                if size > self._max:
                    raise WsViolation(_TOO_BIG, f"message over {self._max} bytes")
            else:
                raise WsViolation(_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            stop = start + size
            if stop > end:
                self._need = stop - pos
                return pos
            pos = stop
            payload: bytes | bytearray
            if size <= _MAX_CONTROL:
                frame = int.from_bytes(data[start - 4 : stop], "little")  # mask, payload
                payload = (((frame >> 32) ^ (frame & 0xFFFFFFFF) * _REPEAT[(size >> 2) + 1]) & _LOW[size]).to_bytes(
                    size, "little"
                )
            else:
                payload = _unmask(data, start, size)

            if opcode == _OP_CONTINUATION:
                self._parts.append(payload)
                self._size += size
                if first >= _FIN:
                    message = b"".join(self._parts)
                    events.append(_text(message) if self._opcode == _OP_TEXT else message)
                    self._opcode = 0
                    self._parts = []
                    self._size = 0
            elif opcode <= _OP_BINARY:
                if first < _FIN:  # the first fragment of a message
                    self._opcode = opcode
                    self._parts = [payload]
                    self._size = size
                elif opcode == _OP_TEXT:
                    events.append(_text(payload))
                else:
                    events.append(bytes(payload))
            elif opcode == _OP_PING:
                events.append(PingFrame(bytes(payload)))
            elif opcode == _OP_PONG:
                events.append(PongFrame(bytes(payload)))
            else:
                events.append(_close_frame(bytes(payload)))
                self._done = True
                return pos


def _text(payload: bytes | bytearray) -> str:
    """A whole text message, strictly UTF-8."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WsViolation(_INVALID_DATA, "text message is not valid UTF-8") from None
