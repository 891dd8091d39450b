"""Property tests: `decode` raises nothing but ProtocolError on any input, and valid frames round-trip."""

from __future__ import annotations

import string
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, SUBPROTOCOLS, Encoded, decode
from protocol.frames import DEVICE_KINDS, Auth, Claim, Hello, Op, Pause, ProtocolError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_protocol_error(data: str | bytes, sp: str) -> Any:
    try:
        return decode(data, sp)
    except ProtocolError as exc:
        assert exc.code == "bad_frame"
        assert exc.id is None or (type(exc.id) is int and 0 <= exc.id < 2**53)
        return exc


# ---------------------------------------------------------------------------------------------- raw input


@FUZZ
@given(data=st.binary(max_size=512), sp=st.sampled_from(SUBPROTOCOLS))
def test_arbitrary_bytes(data: bytes, sp: str) -> None:
    decode_or_protocol_error(data, sp)


@FUZZ
@given(text=st.text(max_size=512), sp=st.sampled_from(SUBPROTOCOLS))
def test_arbitrary_text(text: str, sp: str) -> None:
    decode_or_protocol_error(text, sp)


@FUZZ
@given(
    prefix=st.sampled_from([b"{", b"[", b'{"t":"op","id":1,"ops":[', b"\x83\xa1t\xa2op"]),
    tail=st.binary(max_size=64),
)
def test_plausible_prefixes(prefix: bytes, tail: bytes) -> None:
    for sp in SUBPROTOCOLS:
        decode_or_protocol_error(prefix + tail, sp)


# ---------------------------------------------------------------------------------------------- structures

KEYS = st.sampled_from(["t", "id", "ops", "op", "path", "value", "by", "base", "session", "device", "token", "kind",
                        "resume", "version", "x"])
T_VALUES = st.sampled_from(["hello", "op", "pause", "claim", "auth", "welcome", ""])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | T_VALUES
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS | st.text(max_size=5), children, max_size=6),
    max_leaves=30,
)
# msgpack can also carry things JSON cannot: bytes, ext types, NaN, infinities, non-string keys.
MSGPACK_SCALARS = (
    SCALARS
    | st.binary(max_size=8)
    | st.floats()
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
MSGPACKISH = st.recursive(
    MSGPACK_SCALARS,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(KEYS | st.integers(-3, 3) | st.binary(max_size=3), children, max_size=6),
    max_leaves=30,
)


def frame_like(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Objects that look like frames (a `t` and the usual keys) with arbitrary values, or anything at all."""
    return st.one_of(
        values,
        st.fixed_dictionaries({"t": T_VALUES}, optional={k: values for k in ["id", "ops", "session", "device", "token",
                                                                                "kind", "resume", "base"]}),
        st.fixed_dictionaries(
            {"t": st.just("op"), "id": st.integers(-1, 2**53) | values,
             "ops": st.lists(st.dictionaries(KEYS, values, max_size=4)
                             | st.fixed_dictionaries({"op": st.sampled_from(["set", "del", "inc", "x"]),
                                                      "path": st.text(max_size=8)},
                                                     optional={"value": values, "by": values}), max_size=4)},
            optional={"base": values},
        ),
    )


@FUZZ
@given(obj=frame_like(JSONISH))
def test_jsonish_structures(obj: Any) -> None:
    decode_or_protocol_error(orjson.dumps(obj), JSON_SUBPROTOCOL)
    decode_or_protocol_error(msgpack.packb(obj), MSGPACK_SUBPROTOCOL)


@FUZZ
@given(obj=frame_like(MSGPACKISH), single_float=st.booleans())
def test_msgpackish_structures(obj: Any, single_float: bool) -> None:
    try:
        data = msgpack.packb(obj, use_bin_type=True, use_single_float=single_float, strict_types=False)
    except (OverflowError, ValueError, TypeError):
        return
    result = decode_or_protocol_error(data, MSGPACK_SUBPROTOCOL)
    if isinstance(result, Op):
        # what was accepted is plain JSON: it survives a JSON round trip (a NaN would turn into null)
        assert orjson.loads(orjson.dumps(result.ops)) == result.ops


# ---------------------------------------------------------------------------------------------- round trips

SESSION = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=128)
DEVICE = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=64)
IDS = st.integers(0, 2**53 - 1)
PATHS = st.text(max_size=40).map(lambda p: "/" + p)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=15,
)
STATE_OPS = st.one_of(
    st.builds(lambda p, v: {"op": "set", "path": p, "value": v}, PATHS, VALUES),
    st.builds(lambda p: {"op": "del", "path": p}, PATHS),
    st.builds(lambda p, by: {"op": "inc", "path": p, "by": by}, PATHS,
              st.integers(-(2**31), 2**31) | st.floats(allow_nan=False, allow_infinity=False)),
)
CLIENT_FRAMES = st.one_of(
    st.builds(Hello, session=SESSION, device=DEVICE, token=st.none() | st.text(max_size=40),
              kind=st.sampled_from(sorted(DEVICE_KINDS)), resume=st.none() | st.integers(0, 2**62)),
    st.builds(Op, id=IDS, ops=st.lists(STATE_OPS, min_size=1, max_size=5), base=st.none() | st.integers(0, 2**62)),
    st.builds(Pause, id=IDS),
    st.builds(Claim, id=IDS),
    st.builds(Auth, token=st.text(max_size=40)),
)


def to_wire(frame: Any) -> dict[str, Any]:
    if isinstance(frame, Hello):
        out: dict[str, Any] = {"t": "hello", "session": frame.session, "device": frame.device, "kind": frame.kind}
        if frame.token is not None:
            out["token"] = frame.token
        if frame.resume is not None:
            out["resume"] = {"version": frame.resume}
        return out
    if isinstance(frame, Op):
        out = {"t": "op", "id": frame.id, "ops": frame.ops}
        if frame.base is not None:
            out["base"] = frame.base
        return out
    if isinstance(frame, Pause | Claim):
        return {"t": "pause" if isinstance(frame, Pause) else "claim", "id": frame.id}
    return {"t": "auth", "token": frame.token}


@settings(max_examples=300, deadline=None)
@given(frame=CLIENT_FRAMES, sp=st.sampled_from(SUBPROTOCOLS))
def test_valid_frames_round_trip(frame: Any, sp: str) -> None:
    wire = to_wire(frame)
    # encoded the way the server encodes its own frames, so Encoded is exercised too
    data = Encoded(wire).for_subprotocol(sp)
    assert decode(data, sp) == frame
