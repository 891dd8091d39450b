"""Table-driven tests of the v1 wire codec: every validation rule in both subprotocols, encoding, batching."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest

from protocol import codec
from protocol.codec import (
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    SUBPROTOCOLS,
    Encoded,
    choose_subprotocol,
    decode,
    decode_server_message,
    error_frame,
    join_batch,
)
from protocol.frames import Auth, Claim, Hello, Op, Pause, ProtocolError

BOTH = pytest.mark.parametrize("sp", SUBPROTOCOLS)


def enc(obj: Any, sp: str) -> str | bytes:
    """Encode a test frame the way a client would for `sp`."""
    if sp == JSON_SUBPROTOCOL:
        return orjson.dumps(obj).decode()
    return msgpack.packb(obj, use_bin_type=True)


def nested(depth: int) -> Any:
    """`depth` nested lists (depth 1 == [])."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# ---------------------------------------------------------------------------------------------- subprotocols


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([], JSON_SUBPROTOCOL),
        ([JSON_SUBPROTOCOL], JSON_SUBPROTOCOL),
        ([MSGPACK_SUBPROTOCOL], MSGPACK_SUBPROTOCOL),
        ([MSGPACK_SUBPROTOCOL, JSON_SUBPROTOCOL], MSGPACK_SUBPROTOCOL),
        ([JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL], JSON_SUBPROTOCOL),
        (["chat", " sessiond.v1.msgpack"], MSGPACK_SUBPROTOCOL),
        (["chat"], None),
        (["sessiond.v2.json"], None),
    ],
)
def test_choose_subprotocol(offered: list[str], expected: str | None) -> None:
    assert choose_subprotocol(offered) == expected


# ---------------------------------------------------------------------------------------------- valid frames

VALID: list[tuple[dict[str, Any], Any]] = [
    ({"t": "hello", "session": "s1", "device": "d1"}, Hello(session="s1", device="d1")),
    (
        {"t": "hello", "session": "A_b-9", "device": "x.Y_z-1", "token": "tok", "kind": "ios"},
        Hello(session="A_b-9", device="x.Y_z-1", token="tok", kind="ios"),
    ),
    (
        {"t": "hello", "session": "s" * 128, "device": "d" * 64, "resume": {"version": 0}},
        Hello(session="s" * 128, device="d" * 64, resume=0),
    ),
    (
        {"t": "hello", "session": "s", "device": "d", "resume": {"version": 41, "x": 1}, "extra": [1]},
        Hello(session="s", device="d", resume=41),
    ),
    (
        {"t": "hello", "session": "s", "device": "d", "token": None, "kind": None, "resume": None},
        Hello(session="s", device="d"),
    ),
    *[({"t": "hello", "session": "s", "device": "d", "kind": k}, Hello("s", "d", kind=k)) for k in
      ("web", "ios", "android", "desktop", "other")],
    (
        {"t": "op", "id": 0, "ops": [{"op": "set", "path": "/a", "value": {"b": [1, 2.5, None, True]}}]},
        Op(id=0, ops=[{"op": "set", "path": "/a", "value": {"b": [1, 2.5, None, True]}}]),
    ),
    (
        {"t": "op", "id": 2**53 - 1, "base": 7, "ops": [{"op": "set", "path": "", "value": {}}]},
        Op(id=2**53 - 1, ops=[{"op": "set", "path": "", "value": {}}], base=7),
    ),
    (
        {"t": "op", "id": 1, "base": None, "ops": [{"op": "set", "path": "/a", "value": None}]},
        Op(id=1, ops=[{"op": "set", "path": "/a", "value": None}]),
    ),
    (
        {"t": "op", "id": 1, "base": 0, "ops": [{"op": "del", "path": "/a"}]},
        Op(id=1, ops=[{"op": "del", "path": "/a"}], base=0),
    ),
    (  # unknown keys inside ops are dropped
        {"t": "op", "id": 1, "ops": [{"op": "del", "path": "/a", "value": 3, "zz": 1}]},
        Op(id=1, ops=[{"op": "del", "path": "/a"}]),
    ),
    (
        {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/a", "value": 1, "by": 2}]},
        Op(id=1, ops=[{"op": "set", "path": "/a", "value": 1}]),
    ),
    (  # inc's `by` defaults to 1 and is filled in
        {"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}, {"op": "inc", "path": "/m", "by": None}]},
        Op(id=1, ops=[{"op": "inc", "path": "/n", "by": 1}, {"op": "inc", "path": "/m", "by": 1}]),
    ),
    (
        {"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n", "by": -2.5}, {"op": "inc", "path": "/m", "by": 3}]},
        Op(id=1, ops=[{"op": "inc", "path": "/n", "by": -2.5}, {"op": "inc", "path": "/m", "by": 3}]),
    ),
    (
        {"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n", "by": 3, "value": 9}]},
        Op(id=1, ops=[{"op": "inc", "path": "/n", "by": 3}]),
    ),
    (
        {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/" + "p" * 1023, "value": 1}] * 1000},
        Op(id=1, ops=[{"op": "set", "path": "/" + "p" * 1023, "value": 1}] * 1000),
    ),
    (  # nesting of exactly 64 levels: frame, ops list, op object, then 61 lists
        {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/a", "value": nested(61)}]},
        Op(id=1, ops=[{"op": "set", "path": "/a", "value": nested(61)}]),
    ),
    ({"t": "pause", "id": 5}, Pause(id=5)),
    ({"t": "claim", "id": 0, "extra": "x"}, Claim(id=0)),
    ({"t": "auth", "token": "abc"}, Auth(token="abc")),
    ({"t": "auth", "token": ""}, Auth(token="")),
]


@BOTH
@pytest.mark.parametrize(("frame", "expected"), VALID)
def test_valid_frames(sp: str, frame: dict[str, Any], expected: Any) -> None:
    assert decode(enc(frame, sp), sp) == expected


def test_json_accepts_bytes_and_str() -> None:
    frame = {"t": "pause", "id": 3}
    assert decode(orjson.dumps(frame), JSON_SUBPROTOCOL) == Pause(3)
    assert decode(orjson.dumps(frame).decode(), JSON_SUBPROTOCOL) == Pause(3)
    assert decode(bytearray(orjson.dumps(frame)), JSON_SUBPROTOCOL) == Pause(3)


def test_msgpack_float32_and_brackets_in_strings_are_fine() -> None:
    frame = {"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/[{" * 40, "by": 0.5}]}
    data = msgpack.packb(frame, use_single_float=True)
    assert decode(data, MSGPACK_SUBPROTOCOL) == Op(id=1, ops=[{"op": "inc", "path": "/[{" * 40, "by": 0.5}])
    # Bytes that look like a NaN float inside a string force the slow walk, which still accepts them.
    frame["ops"][0]["path"] = "\u00ca\u007f\u00ff"
    assert decode(msgpack.packb(frame), MSGPACK_SUBPROTOCOL).ops[0]["path"] == "\u00ca\u007f\u00ff"


def test_unknown_subprotocol_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="subprotocol"):
        decode("{}", "chat")


# ---------------------------------------------------------------------------------------------- invalid frames

OP_OK = {"op": "set", "path": "/a", "value": 1}

# (frame, id expected in the error or None, a word of the message)
INVALID: list[tuple[Any, int | None, str]] = [
    ([{"t": "pause", "id": 1}], None, "object"),
    ("hello", None, "object"),
    (3, None, "object"),
    (None, None, "object"),
    ({}, None, "'t'"),
    ({"t": 1, "id": 4}, 4, "'t'"),
    ({"t": None}, None, "'t'"),
    ({"t": ["op"]}, None, "'t'"),
    ({"t": "welcome", "id": 9}, 9, "unknown"),
    ({"t": "HELLO", "session": "s", "device": "d"}, None, "unknown"),
    ({"t": ""}, None, "unknown"),
    # hello
    ({"t": "hello", "device": "d"}, None, "session"),
    ({"t": "hello", "session": "", "device": "d"}, None, "session"),
    ({"t": "hello", "session": "s" * 129, "device": "d"}, None, "session"),
    ({"t": "hello", "session": "a.b", "device": "d"}, None, "session"),
    ({"t": "hello", "session": "a b", "device": "d"}, None, "session"),
    ({"t": "hello", "session": "s\n", "device": "d"}, None, "session"),
    ({"t": "hello", "session": "sé", "device": "d"}, None, "session"),
    ({"t": "hello", "session": 5, "device": "d"}, None, "session"),
    ({"t": "hello", "session": "s"}, None, "device"),
    ({"t": "hello", "session": "s", "device": ""}, None, "device"),
    ({"t": "hello", "session": "s", "device": "d" * 65}, None, "device"),
    ({"t": "hello", "session": "s", "device": "d/1"}, None, "device"),
    ({"t": "hello", "session": "s", "device": "d\n"}, None, "device"),
    ({"t": "hello", "session": "s", "device": ["d"]}, None, "device"),
    ({"t": "hello", "session": "s", "device": "d", "token": 5}, None, "token"),
    ({"t": "hello", "session": "s", "device": "d", "token": ["x"]}, None, "token"),
    ({"t": "hello", "session": "s", "device": "d", "kind": "tv"}, None, "kind"),
    ({"t": "hello", "session": "s", "device": "d", "kind": 1}, None, "kind"),
    ({"t": "hello", "session": "s", "device": "d", "kind": ["web"]}, None, "kind"),
    ({"t": "hello", "session": "s", "device": "d", "resume": 3}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": [3]}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": {}}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": {"version": -1}}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": {"version": "3"}}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": {"version": 1.0}}, None, "resume"),
    ({"t": "hello", "session": "s", "device": "d", "resume": {"version": True}}, None, "resume"),
    # op: id
    ({"t": "op", "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": -1, "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": 2**53, "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": 1.0, "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": "1", "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": True, "ops": [OP_OK]}, None, "'id'"),
    ({"t": "op", "id": None, "ops": [OP_OK]}, None, "'id'"),
    # op: ops list (the id is known from here on and must be in the error)
    ({"t": "op", "id": 7}, 7, "ops"),
    ({"t": "op", "id": 7, "ops": []}, 7, "ops"),
    ({"t": "op", "id": 7, "ops": {"op": "del", "path": "/a"}}, 7, "ops"),
    ({"t": "op", "id": 7, "ops": None}, 7, "ops"),
    ({"t": "op", "id": 7, "ops": [OP_OK] * 1001}, 7, "1000"),
    ({"t": "op", "id": 7, "ops": [OP_OK, 3]}, 7, "object"),
    ({"t": "op", "id": 7, "ops": [[OP_OK]]}, 7, "object"),
    ({"t": "op", "id": 7, "ops": [{"path": "/a", "value": 1}]}, 7, "set, del or inc"),
    ({"t": "op", "id": 7, "ops": [{"op": "add", "path": "/a", "value": 1}]}, 7, "set, del or inc"),
    ({"t": "op", "id": 7, "ops": [{"op": "SET", "path": "/a", "value": 1}]}, 7, "set, del or inc"),
    ({"t": "op", "id": 7, "ops": [{"op": ["set"], "path": "/a", "value": 1}]}, 7, "set, del or inc"),
    ({"t": "op", "id": 7, "ops": [{"op": "set", "value": 1}]}, 7, "path"),
    ({"t": "op", "id": 7, "ops": [{"op": "set", "path": 1, "value": 1}]}, 7, "path"),
    ({"t": "op", "id": 7, "ops": [{"op": "set", "path": None, "value": 1}]}, 7, "path"),
    ({"t": "op", "id": 7, "ops": [{"op": "set", "path": "/" + "p" * 1024, "value": 1}]}, 7, "path"),
    ({"t": "op", "id": 7, "ops": [{"op": "set", "path": "/a"}]}, 7, "value"),
    ({"t": "op", "id": 7, "ops": [{"op": "inc", "path": "/a", "by": "2"}]}, 7, "by"),
    ({"t": "op", "id": 7, "ops": [{"op": "inc", "path": "/a", "by": True}]}, 7, "by"),
    ({"t": "op", "id": 7, "ops": [{"op": "inc", "path": "/a", "by": [1]}]}, 7, "by"),
    ({"t": "op", "id": 7, "ops": [OP_OK], "base": -1}, 7, "base"),
    ({"t": "op", "id": 7, "ops": [OP_OK], "base": "3"}, 7, "base"),
    ({"t": "op", "id": 7, "ops": [OP_OK], "base": 1.5}, 7, "base"),
    ({"t": "op", "id": 7, "ops": [OP_OK], "base": False}, 7, "base"),
    # pause / claim / auth
    ({"t": "pause"}, None, "'id'"),
    ({"t": "pause", "id": "1"}, None, "'id'"),
    ({"t": "pause", "id": False}, None, "'id'"),
    ({"t": "claim", "id": -5}, None, "'id'"),
    ({"t": "claim", "id": 0.5}, None, "'id'"),
    ({"t": "auth"}, None, "token"),
    ({"t": "auth", "token": None}, None, "token"),
    ({"t": "auth", "token": 1, "id": 3}, 3, "token"),
]


@BOTH
@pytest.mark.parametrize(("frame", "error_id", "word"), INVALID)
def test_invalid_frames(sp: str, frame: Any, error_id: int | None, word: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(enc(frame, sp), sp)
    assert info.value.code == "bad_frame"
    assert info.value.id == error_id
    assert word in info.value.message
    assert info.value.close is None


TOO_DEEP = [  # 65 levels and more: parsed, then refused
    {"t": "op", "id": 7, "ops": [{"op": "set", "path": "/a", "value": nested(62)}]},
    {"t": "op", "id": 7, "ops": [{"op": "set", "path": "/a", "value": {"x": nested(61)}}]},
    {"t": "op", "id": 7, "ops": [{"op": "set", "path": "/a", "value": nested(70)}]},
]


@BOTH
@pytest.mark.parametrize("frame", TOO_DEEP)
def test_an_op_nested_too_deeply_is_invalid_op_with_its_id(sp: str, frame: Any) -> None:
    """The client must be able to tell which request failed (issue 8): `invalid_op` with the op's id."""
    with pytest.raises(ProtocolError) as info:
        decode(enc(frame, sp), sp)
    assert (info.value.code, info.value.id) == ("invalid_op", 7)
    assert "nesting" in info.value.message


@BOTH
def test_other_frames_nested_too_deeply_are_bad_frames_with_their_id(sp: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(enc({"t": "auth", "token": "x", "id": 4, "junk": nested(70)}, sp), sp)
    assert (info.value.code, info.value.id) == ("bad_frame", 4)


JSON_GARBAGE: list[str | bytes] = [
    "",
    "{",
    "{}}",
    '{"t":"pause","id":1} x',
    "{'t': 'pause'}",
    '{"t":"op","id":1,"ops":[{"op":"inc","path":"/a","by":NaN}]}',
    '{"t":"op","id":1,"ops":[{"op":"inc","path":"/a","by":Infinity}]}',
    '{"t":"op","id":1,"ops":[{"op":"inc","path":"/a","by":1e400}]}',
    '{"t":"auth","token":"\\ud800"}',
    b'{"t":"auth","token":"\xff"}',
    "\ud800",
    "[" * 100_000,
    "[" * 70 + "]" * 70,
]


@pytest.mark.parametrize("data", JSON_GARBAGE)
def test_json_garbage(data: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, JSON_SUBPROTOCOL)
    assert info.value.code == "bad_frame"


def ops_frame(value: Any) -> dict[str, Any]:
    return {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/a", "value": value}]}


MSGPACK_GARBAGE: list[tuple[bytes | str, str]] = [
    (b"", "unparseable"),
    (b"\xc1", "unparseable"),  # never-used type byte
    (b"\x82\xa1t", "unparseable"),  # truncated
    (msgpack.packb({"t": "pause", "id": 1}) + b"\x00", "unparseable"),  # extra data
    (b"\xa2\xff\xfe", "unparseable"),  # invalid UTF-8 str
    (b"\xdd\xff\xff\xff\xff", "unparseable"),  # array32 announcing 4G items
    (b"\xdb\xff\xff\xff\xff", "unparseable"),  # str32 announcing 4G bytes
    (b"\x91" * 5000 + b"\x90", "unparseable"),  # deeper than the unpacker's own stack
    (msgpack.packb({"t": "pause", "id": 1}).decode("latin-1"), "binary"),  # a text frame
    (msgpack.packb(ops_frame(b"raw bytes"), use_bin_type=True), "unparseable"),
    (msgpack.packb(ops_frame(b""), use_bin_type=True), "bytes"),
    (msgpack.packb(ops_frame(msgpack.ExtType(5, b"abcd"))), "unparseable"),
    (msgpack.packb(ops_frame(msgpack.ExtType(5, b""))), "ExtType"),
    (msgpack.packb(ops_frame(msgpack.Timestamp(1, 0))), "unparseable"),
    (msgpack.packb(ops_frame({1: 2})), "unparseable"),  # strict_map_key
    (msgpack.packb(ops_frame({b"": 2}), use_bin_type=True), "key"),
    (msgpack.packb(ops_frame(float("nan"))), "non-finite"),
    (msgpack.packb(ops_frame(float("inf"))), "non-finite"),
    (msgpack.packb(ops_frame([1.0, float("-inf")]), use_single_float=True), "non-finite"),
    (msgpack.packb({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/a", "by": float("nan")}]}), "non-finite"),
    (msgpack.packb({"t": "hello", "session": "s", "device": "d", "x": float("nan")}), "non-finite"),
    (msgpack.packb(float("nan")), "non-finite"),
    (msgpack.packb(b"", use_bin_type=True), "bytes"),
]


@pytest.mark.parametrize(("data", "word"), MSGPACK_GARBAGE)
def test_msgpack_garbage(data: bytes | str, word: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, MSGPACK_SUBPROTOCOL)
    assert info.value.code == "bad_frame"
    assert word in info.value.message


# ---------------------------------------------------------------------------------------------- encoding


@pytest.fixture
def encode_counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"json": 0, "msgpack": 0}
    real_json, real_msgpack = codec._encode_json, codec._encode_msgpack

    def count_json(frame: dict[str, Any]) -> str:
        counts["json"] += 1
        return real_json(frame)

    def count_msgpack(frame: dict[str, Any]) -> bytes:
        counts["msgpack"] += 1
        return real_msgpack(frame)

    monkeypatch.setattr(codec, "_encode_json", count_json)
    monkeypatch.setattr(codec, "_encode_msgpack", count_msgpack)
    return counts


def test_encoded_is_lazy_and_encodes_once_per_format(encode_counts: dict[str, int]) -> None:
    frame = {"t": "patch", "version": 3, "device": "d", "ops": [{"op": "set", "path": "/é", "value": [1.5]}]}
    encoded = Encoded(frame)
    assert encode_counts == {"json": 0, "msgpack": 0}
    texts = [encoded.for_subprotocol(JSON_SUBPROTOCOL) for _ in range(100)]
    blobs = [encoded.for_subprotocol(MSGPACK_SUBPROTOCOL) for _ in range(100)]
    assert encode_counts == {"json": 1, "msgpack": 1}
    assert all(t is texts[0] for t in texts) and all(b is blobs[0] for b in blobs)
    assert encoded.text() is texts[0] and encoded.binary() is blobs[0]
    assert isinstance(texts[0], str) and orjson.loads(texts[0]) == frame
    assert isinstance(blobs[0], bytes) and msgpack.unpackb(blobs[0]) == frame
    assert encoded.frame is frame
    with pytest.raises(ValueError):
        encoded.for_subprotocol("chat")
    with pytest.raises(AttributeError):
        encoded.extra = 1  # type: ignore[attr-defined]


def test_server_frame_helpers() -> None:
    assert error_frame("bad_frame", "nope").frame == {"t": "error", "code": "bad_frame", "message": "nope"}
    assert error_frame("conflict", "base", id=4, version=9).frame == {
        "t": "error", "code": "conflict", "message": "base", "id": 4, "version": 9,
    }
    exc = ProtocolError("bad_frame", "x", id=2)
    assert codec.error_from(exc).frame == {"t": "error", "code": "bad_frame", "message": "x", "id": 2}
    # the frames encode in both formats
    ended = codec.Encoded({"t": "ended"})
    for sp in SUBPROTOCOLS:
        assert decode_server_message(ended.for_subprotocol(sp), sp) == [{"t": "ended"}]


# ---------------------------------------------------------------------------------------------- batching


def frames_for(count: int) -> list[dict[str, Any]]:
    return [{"t": "ack", "id": i, "version": i} for i in range(count)]


@BOTH
@pytest.mark.parametrize("count", [2, 3, 15, 16, 17, 255, 65535, 65536])
def test_join_batch_decodes_to_the_frames(sp: str, count: int) -> None:
    frames = frames_for(count)
    items = [Encoded(f).for_subprotocol(sp) for f in frames]
    message = join_batch(items, sp)
    if sp == JSON_SUBPROTOCOL:
        assert isinstance(message, str)
        assert orjson.loads(message) == frames
    else:
        assert isinstance(message, bytes)
        assert msgpack.unpackb(message) == frames
    if count <= 16:
        assert decode_server_message(message, sp) == frames


@pytest.mark.parametrize(
    ("count", "header"),
    [(1, None), (2, b"\x92"), (15, b"\x9f"), (16, b"\xdc\x00\x10"), (65535, b"\xdc\xff\xff"),
     (65536, b"\xdd\x00\x01\x00\x00")],
)
def test_msgpack_array_headers(count: int, header: bytes | None) -> None:
    item = msgpack.packb({"t": "ended"})
    message = join_batch([item] * count, MSGPACK_SUBPROTOCOL)
    if header is None:
        assert message is item
    else:
        assert isinstance(message, bytes)
        assert message.startswith(header) and len(message) == len(header) + count * len(item)
        assert msgpack.unpackb(message) == [{"t": "ended"}] * count


@BOTH
def test_single_item_batch_is_the_item_itself(sp: str) -> None:
    item = Encoded({"t": "ended"}).for_subprotocol(sp)
    assert join_batch([item], sp) is item
    assert decode_server_message(item, sp) == [{"t": "ended"}]


def test_join_batch_rejects_bugs() -> None:
    with pytest.raises(ValueError):
        join_batch([], JSON_SUBPROTOCOL)
    with pytest.raises(ValueError):
        join_batch(["{}", "{}"], "chat")


@BOTH
def test_decode_server_message_rejects_non_frames(sp: str) -> None:
    for bad in ([1, 2], [{"t": 1}], {"x": 1}, "str"):
        with pytest.raises(ProtocolError):
            decode_server_message(enc(bad, sp), sp)


def test_dumps_kept_holds_exact_size_bytes_not_orjsons_4_kib_buffers() -> None:
    """orjson returns small outputs in a buffer of at least 4 KiB; what is kept (journal entries, replay patches,
    buffered events) must be copied to its size, or 1000 kept 26-byte patches cost 4 MB."""
    import tracemalloc

    from protocol.codec import dumps_kept

    ops = [{"op": "inc", "path": "/n"}]
    assert dumps_kept(ops) == orjson.dumps(ops)
    tracemalloc.start()
    try:
        kept = [dumps_kept(ops) for _ in range(1000)]
        exact = tracemalloc.get_traced_memory()[0]
        raw = [orjson.dumps(ops) for _ in range(1000)]
        both = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == len(raw) == 1000
    assert exact < 200_000, exact  # about 60 bytes each
    assert both - exact > 10 * exact  # the measurement can tell: raw orjson outputs really are that large
