"""Sans-I/O codec of wire protocol v1 (DESIGN §3): parse and validate client frames, encode server frames.

Pure functions and one small class, no trio and no sockets, so the hot path is testable in isolation.
Decoding turns anything a peer can send into either a `ClientFrame` or a `ProtocolError("bad_frame")`;
encoding is lazy and cached per format, because one server frame (a patch) goes to many devices.
Raw size limits are the caller's job (it knows the configured maximum before it pays for a parse).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgpack
import orjson

from protocol import codes
from protocol.frames import DEVICE_KINDS, Auth, Claim, ClientFrame, Hello, Op, Pause, ProtocolError

JSON = Any

JSON_SUBPROTOCOL = "sessiond.v1.json"
MSGPACK_SUBPROTOCOL = "sessiond.v1.msgpack"
SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

MAX_DEPTH = 64  # container nesting of a whole frame (the frame object itself is level 1)
MAX_OPS = 1000
MAX_PATH = 1024
MAX_ID = 2**53  # ids stay exact in JavaScript numbers

_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DEVICE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def dumps_kept(value: Any) -> bytes:
    """`orjson.dumps` for bytes that will be kept (a journal entry, a replay patch, a buffered event).

    orjson returns its output in a buffer of at least 4 KiB, whatever the length: measured here (orjson 3.13), 100k
    kept 26-byte results cost 393 MB of RSS, against 7 MB for exact-size copies. `bytes(memoryview(...))` makes
    that copy; `bytes(b)`, `b[:]` and `b + b""` return the same object. Frames written at once need no copy.
    """
    return bytes(memoryview(orjson.dumps(value)))


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """The first subprotocol the client offered that we speak (client preference wins).

    Returns None when the client offered some but none we speak (refuse the upgrade), and
    JSON_SUBPROTOCOL when it offered none at all: then the caller must use JSON but must *not* echo a
    subprotocol in the handshake (RFC 6455), so it has to look at whether `offered` was empty.
    """
    for candidate in offered:
        candidate = candidate.strip()
        if candidate in SUBPROTOCOLS:
            return candidate
    return None if offered else JSON_SUBPROTOCOL


# ---------------------------------------------------------------------------------------------- decoding


def _bad(message: str) -> ProtocolError:
    return ProtocolError(codes.BAD_FRAME, message)


def _json_depth_ok(value: JSON, level: int) -> bool:
    """True if nothing inside container `value` (which sits at `level`) nests deeper than MAX_DEPTH."""
    if level > MAX_DEPTH:
        return False
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if (kind is dict or kind is list) and not _json_depth_ok(item, level + 1):
            return False
    return True


def _brackets(data: str | bytes) -> int:
    """Opening brackets in a JSON text: an upper bound of its nesting depth (strings may hold some too)."""
    if isinstance(data, str):
        return data.count("{") + data.count("[")
    raw = data if isinstance(data, bytes) else bytes(data)
    return raw.count(b"{") + raw.count(b"[")


def _loads_json(data: str | bytes) -> JSON:
    """orjson already refuses NaN/Infinity, lone surrogates and bad UTF-8; only the depth needs a look."""
    try:
        obj = orjson.loads(data)
    except Exception as exc:  # any parser complaint means the peer sent garbage
        raise _bad(f"unparseable JSON: {str(exc)[:200]}") from None
    # Fast path: a text with at most MAX_DEPTH opening brackets cannot nest deeper than that.
    kind = type(obj)
    if (kind is dict or kind is list) and _brackets(data) > MAX_DEPTH and not _json_depth_ok(obj, 1):
        raise _too_deep(obj)
    return obj


def _too_deep(obj: JSON) -> ProtocolError:
    """Parsed, but nested too deeply to keep: an op is refused as `invalid_op` with its id (the client can tell
    which request failed), anything else as `bad_frame`, with the id when one can be read."""
    message = f"nesting deeper than {MAX_DEPTH}"
    if type(obj) is not dict:
        return _bad(message)
    code = codes.INVALID_OP if obj.get("t") == "op" else codes.BAD_FRAME
    return ProtocolError(code, message, id=_frame_id(obj))


_SCALARS = frozenset({str, int, bool, type(None)})
# A msgpack float32/float64 whose exponent bits are all ones (NaN or ±Infinity), wherever it may hide.
# (A superset: float64 needs the next byte >= 0xf0; a false hit only costs the slow walk.)
_MAYBE_NONFINITE = re.compile(rb"[\xca\xcb][\x7f\xff][\x80-\xff]")


def _msgpack_ok(value: JSON, level: int) -> str | None:
    """Why container `value` (at `level`) is not plain JSON: non-str key, non-finite float, bytes, ext
    type, too deep; None if it is. The slow path (see _loads_msgpack), so scalars are checked inline."""
    if level > MAX_DEPTH:
        return f"nesting deeper than {MAX_DEPTH}"
    if type(value) is dict:
        for key in value:
            if type(key) is not str:
                return "non-string map key"
        items = value.values()
    else:
        items = value
    for item in items:
        kind = type(item)
        if kind is dict or kind is list:
            why = _msgpack_ok(item, level + 1)
            if why is not None:
                return why
        elif kind is float:
            if not math.isfinite(item):
                return "non-finite float"
        elif kind not in _SCALARS:
            return f"value of type {kind.__name__} is not JSON"
    return None


def _loads_msgpack(data: str | bytes) -> JSON:
    if isinstance(data, str):
        raise _bad("msgpack frames must be binary")
    size = len(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=size,
            max_bin_len=0,  # bytes are not JSON
            max_ext_len=0,  # neither are ext types (timestamps included)
            max_array_len=size,
            max_map_len=size // 2,
        )
    except Exception as exc:  # any unpacker complaint means the peer sent garbage
        raise _bad(f"unparseable msgpack: {type(exc).__name__}: {str(exc)[:200]}") from None
    kind = type(obj)
    if kind is not dict and kind is not list:
        return obj if kind in _SCALARS or (kind is float and math.isfinite(obj)) else _not_json(obj)
    if _MAYBE_NONFINITE.search(data) is None:
        # No NaN/Infinity bit pattern anywhere, so a C-speed orjson.dumps checks the rest (str keys,
        # no bytes or ext types) and its output bounds the depth; the Python walk is the slow path.
        try:
            text = orjson.dumps(obj)
        except Exception:
            return _not_json(obj)
        if _brackets(text) <= MAX_DEPTH:
            return obj
    why = _msgpack_ok(obj, 1)
    if why is not None:
        raise _too_deep(obj) if why.startswith("nesting") else _bad(why)
    return obj


def _not_json(obj: JSON) -> NoReturn:
    """Raise the reason why a decoded msgpack value is not plain JSON."""
    why = _msgpack_ok([obj], 0) or "value is not JSON-representable"
    raise _bad(why)


def _frame_id(obj: dict[str, JSON]) -> int | None:
    value = obj.get("id")
    if type(value) is int and 0 <= value < MAX_ID:
        return value
    return None


def _request_id(obj: dict[str, JSON]) -> int:
    value = obj.get("id")
    if type(value) is not int or not 0 <= value < MAX_ID:
        raise _bad("'id' must be an integer in [0, 2**53)")
    return value


def _parse_hello(obj: dict[str, JSON]) -> Hello:
    session = obj.get("session")
    if type(session) is not str or _SESSION_RE.fullmatch(session) is None:
        raise _bad("'session' must be 1-128 of [A-Za-z0-9_-]")
    device = obj.get("device")
    if type(device) is not str or _DEVICE_RE.fullmatch(device) is None:
        raise _bad("'device' must be 1-64 of [A-Za-z0-9._-]")
    token = obj.get("token")
    if token is not None and type(token) is not str:
        raise _bad("'token' must be a string")
    kind = obj.get("kind")
    if kind is None:
        kind = "other"
    elif type(kind) is not str or kind not in DEVICE_KINDS:
        raise _bad(f"'kind' must be one of {', '.join(sorted(DEVICE_KINDS))}")
    resume = obj.get("resume")
    version: int | None = None
    epoch: str | None = None
    if resume is not None:
        if type(resume) is not dict:
            raise _bad("'resume' must be an object")
        version = resume.get("version")
        if type(version) is not int or version < 0:
            raise _bad("'resume.version' must be an integer >= 0")
        epoch = resume.get("epoch")
        if epoch is not None and (type(epoch) is not str or len(epoch) > 64):
            raise _bad("'resume.epoch' must be a string of at most 64 characters")
    return Hello(session=session, device=device, token=token, kind=kind, resume=version, resume_epoch=epoch)


def _check_op(item: JSON) -> dict[str, JSON]:
    """Shape-check one state op; returns it with unknown keys dropped and `by` filled in for inc."""
    if type(item) is not dict:
        raise _bad("each op must be an object")
    name = item.get("op")
    path = item.get("path")
    if type(path) is not str or len(path) > MAX_PATH:
        raise _bad(f"op 'path' must be a string of at most {MAX_PATH} characters")
    if name == "set":
        if "value" not in item:
            raise _bad("set needs a 'value'")
        return item if len(item) == 3 else {"op": "set", "path": path, "value": item["value"]}
    if name == "del":
        return item if len(item) == 2 else {"op": "del", "path": path}
    if name == "inc":
        by = item.get("by")
        if by is None:
            by = 1
        elif type(by) is not int and type(by) is not float:
            raise _bad("inc 'by' must be a number")
        elif len(item) == 3:
            return item
        return {"op": "inc", "path": path, "by": by}
    raise _bad("op 'op' must be set, del or inc")


def _parse_op(obj: dict[str, JSON]) -> Op:
    request_id = _request_id(obj)
    ops = obj.get("ops")
    if type(ops) is not list or not ops:
        raise _bad("'ops' must be a non-empty list")
    if len(ops) > MAX_OPS:
        raise _bad(f"at most {MAX_OPS} ops per frame")
    checked = [_check_op(item) for item in ops]
    base = obj.get("base")
    if base is not None and (type(base) is not int or base < 0):
        raise _bad("'base' must be an integer >= 0")
    return Op(id=request_id, ops=checked, base=base)


def _parse_pause(obj: dict[str, JSON]) -> Pause:
    return Pause(id=_request_id(obj))


def _parse_claim(obj: dict[str, JSON]) -> Claim:
    return Claim(id=_request_id(obj))


def _parse_auth(obj: dict[str, JSON]) -> Auth:
    token = obj.get("token")
    if type(token) is not str:
        raise _bad("'token' must be a string")
    return Auth(token=token)


_PARSERS: dict[str, Callable[[dict[str, JSON]], ClientFrame]] = {
    "op": _parse_op,
    "hello": _parse_hello,
    "pause": _parse_pause,
    "claim": _parse_claim,
    "auth": _parse_auth,
}


def _loads(data: str | bytes, subprotocol: str) -> JSON:
    if subprotocol == JSON_SUBPROTOCOL:
        return _loads_json(data)
    if subprotocol == MSGPACK_SUBPROTOCOL:
        return _loads_msgpack(data)
    raise ValueError(f"unknown subprotocol {subprotocol!r}")


def decode(data: str | bytes, subprotocol: str) -> ClientFrame:
    """Parse and validate one client frame. Raises only ProtocolError (`bad_frame`; `invalid_op` for an op whose
    value nests too deeply).

    Optional fields given as null count as absent. Unknown keys are ignored (and dropped from ops).
    The error carries the frame's `id` whenever a valid one could be read. An unknown `subprotocol`
    is the caller's bug and raises ValueError.
    """
    obj = _loads(data, subprotocol)
    if type(obj) is not dict:
        raise _bad("a frame must be an object")
    kind = obj.get("t")
    if type(kind) is not str:
        raise ProtocolError(codes.BAD_FRAME, "'t' must be a string", id=_frame_id(obj))
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(codes.BAD_FRAME, f"unknown frame type {kind[:32]!r}", id=_frame_id(obj))
    try:
        return parser(obj)
    except ProtocolError as exc:
        exc.id = _frame_id(obj)
        raise


def decode_server_message(data: str | bytes, subprotocol: str) -> list[dict[str, JSON]]:
    """Client side / tests: one server message (a frame or a batch array) as a list of frame dicts."""
    obj = _loads(data, subprotocol)
    frames = obj if type(obj) is list else [obj]
    for frame in frames:
        if type(frame) is not dict or type(frame.get("t")) is not str:
            raise _bad("every server frame must be an object with a string 't'")
    return frames


# ---------------------------------------------------------------------------------------------- encoding


def _encode_json(frame: dict[str, JSON]) -> str:
    return orjson.dumps(frame).decode()


def _encode_msgpack(frame: dict[str, JSON]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def encode(frame: dict[str, JSON], subprotocol: str) -> str | bytes:
    """One server frame in the connection's format: JSON text or msgpack bytes."""
    if subprotocol == JSON_SUBPROTOCOL:
        return _encode_json(frame)
    if subprotocol == MSGPACK_SUBPROTOCOL:
        return _encode_msgpack(frame)
    raise ValueError(f"unknown subprotocol {subprotocol!r}")


def encode_bytes(frame: dict[str, JSON], subprotocol: str) -> bytes:
    """One server frame as the bytes of its WebSocket payload (JSON as UTF-8): what the send fast path frames."""
    if subprotocol == JSON_SUBPROTOCOL:
        return orjson.dumps(frame)
    if subprotocol == MSGPACK_SUBPROTOCOL:
        return _encode_msgpack(frame)
    raise ValueError(f"unknown subprotocol {subprotocol!r}")


class Encoded:
    """One server→client frame, encoded lazily and at most once per format, shared by every recipient.

    `frame` is the dict itself; treat it as read-only once wrapped, or the cached encodings lie.
    """

    __slots__ = ("_binary", "_text", "frame")

    def __init__(self, frame: dict[str, JSON]) -> None:
        self.frame = frame
        self._text: str | None = None
        self._binary: bytes | None = None

    def text(self) -> str:
        text = self._text
        if text is None:
            text = self._text = _encode_json(self.frame)
        return text

    def binary(self) -> bytes:
        binary = self._binary
        if binary is None:
            binary = self._binary = _encode_msgpack(self.frame)
        return binary

    def for_subprotocol(self, subprotocol: str) -> str | bytes:
        if subprotocol == JSON_SUBPROTOCOL:
            return self.text()
        if subprotocol == MSGPACK_SUBPROTOCOL:
            return self.binary()
        raise ValueError(f"unknown subprotocol {subprotocol!r}")

    def __repr__(self) -> str:
        return f"Encoded({self.frame!r})"


def _msgpack_array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 0x10000:
        return b"\xdc" + count.to_bytes(2, "big")
    if count < 0x100000000:
        return b"\xdd" + count.to_bytes(4, "big")
    raise ValueError("too many frames for one msgpack array")


def join_batch(items: Sequence[str | bytes], subprotocol: str) -> str | bytes:
    """Several already-encoded frames as one WebSocket message (an array), without re-encoding them.

    A single item is returned as itself; an empty batch is the caller's bug (ValueError).
    """
    count = len(items)
    if count == 1:
        return items[0]
    if count == 0:
        raise ValueError("empty batch")
    if subprotocol == JSON_SUBPROTOCOL:
        if isinstance(items[0], bytes):  # payload bytes (the server's send path)
            return b"[" + b",".join(items) + b"]"  # type: ignore[arg-type]
        return "[" + ",".join(items) + "]"  # type: ignore[arg-type]
    if subprotocol == MSGPACK_SUBPROTOCOL:
        return _msgpack_array_header(count) + b"".join(items)  # type: ignore[arg-type]
    raise ValueError(f"unknown subprotocol {subprotocol!r}")


# ---------------------------------------------------------------------------------------------- server frames
# The session's frames (welcome, ack, patch, handoff, presence, ended) are built by actors.session, which owns
# their contents; the transport itself only answers with errors (and `authed`).


def error_frame(code: str, message: str, *, id: int | None = None, version: int | None = None) -> Encoded:
    frame: dict[str, JSON] = {"t": "error", "code": code, "message": message}
    if id is not None:
        frame["id"] = id
    if version is not None:
        frame["version"] = version
    return Encoded(frame)


def error_from(exc: ProtocolError, *, version: int | None = None) -> Encoded:
    """The error frame that answers a ProtocolError raised by `decode` (or by the server)."""
    return error_frame(exc.code, exc.message, id=exc.id, version=version)
