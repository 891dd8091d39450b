"""The relay wire format between pods (actors/relay.py, DESIGN §6): what one pod encodes another decodes unchanged,
and anything else is a BadRelayMessage (dropped and counted by the receiver), never another exception."""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.relay import BadRelayMessage, decode, encode, result_from_wire, result_to_wire
from actors.session import Accepted, Rejected

INT64 = st.integers(-(1 << 63), (1 << 64) - 1)  # what MessagePack carries
scalars = st.one_of(
    st.none(), st.booleans(), INT64, st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20)
)
json_ish = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
item = st.builds(lambda tag, rest: [tag, *rest], st.text(max_size=3), st.lists(json_ish, max_size=4))
items = st.lists(item, max_size=5)
pods = st.text(max_size=30)
any_value = st.recursive(
    st.one_of(scalars, st.floats()),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.one_of(st.text(max_size=4), INT64), children, max_size=3)
    ),
    max_leaves=10,
)


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# ---- envelopes ------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pod=pods, batch=items)
def test_encode_decode_round_trip(pod: str, batch: list[list[Any]]) -> None:
    """Items cross between pods unchanged (lists, maps, bytes, 64-bit ints), with the sender and the send time
    (the receiver measures relay latency from it)."""
    before = time.time()
    sender, sent_at, decoded = decode(encode(pod, batch))
    assert sender == pod
    assert isinstance(sent_at, float)
    assert before <= sent_at <= time.time()
    assert decoded == batch


def test_envelope_layout_is_pod_time_items() -> None:
    """The documented layout `[from_pod, sent_at, [item, ...]]`: other pods (other versions) rely on it."""
    message = msgpack.unpackb(encode("pod-a", [["f", {"t": "patch"}, [1, 2]]]), raw=False)
    assert message[0] == "pod-a"
    assert isinstance(message[1], float)
    assert message[2] == [["f", {"t": "patch"}, [1, 2]]]


def test_integer_send_time_is_accepted_as_float() -> None:
    assert decode(pack(["p", 5, []])) == ("p", 5.0, [])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_bytes_raise_bad_relay_message_only(data: bytes) -> None:
    """Whatever arrives on the channel, decode returns a well-formed envelope or raises BadRelayMessage: another
    exception would kill the receiving task (and every relayed device of the pod with it)."""
    try:
        pod, sent_at, batch = decode(data)
    except BadRelayMessage:
        return
    assert isinstance(pod, str)
    assert isinstance(sent_at, float)
    assert all(isinstance(item, list) and item and isinstance(item[0], str) for item in batch)


@settings(max_examples=200, deadline=None)
@given(value=any_value)
def test_wrong_shapes_raise_bad_relay_message(value: Any) -> None:
    """Valid MessagePack of any other shape is refused as a whole, with BadRelayMessage."""
    is_envelope = (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and isinstance(value[2], list)
    )
    if is_envelope:
        decode(pack(value))
    else:
        with pytest.raises(BadRelayMessage):
            decode(pack(value))


@pytest.mark.parametrize(
    "value",
    [
        None,
        {},
        "pod",
        [],
        ["pod", 1.0],
        ["pod", 1.0, [], "extra"],
        [1, 1.0, []],  # pod is not a string
        [b"pod", 1.0, []],  # nor bytes
        ["pod", "now", []],  # time is not a number
        ["pod", None, []],
        ["pod", 1.0, {}],  # items are not a list
        ["pod", 1.0, "items"],
        {"pod": "p", "at": 1.0, "items": []},
    ],
)
def test_envelope_shape_is_checked(value: Any) -> None:
    with pytest.raises(BadRelayMessage):
        decode(pack(value))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in MessagePack
        b"\x93",  # an array of 3 that ends early
        b"\x93\xa1p\xcb\x00",  # truncated float
        pack(["p", 1.0, []]) + b"\x00",  # trailing bytes
        b"\x81\x91\x01\x01",  # a map whose key is an array (unhashable)
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion elements
    ],
)
def test_undecodable_bytes_raise_bad_relay_message(data: bytes) -> None:
    with pytest.raises(BadRelayMessage):
        decode(data)


def test_items_that_are_not_tagged_lists_are_dropped() -> None:
    """One malformed item must not cost the good ones of the same message: it is left out, the rest kept in order."""
    good = [["f", {"t": "patch"}, [7, 1]], ["c", 7, 4009, "replaced"], ["r", 1, "ok", None], [""]]
    bad: list[Any] = [[], [1, "x"], [None], [b"f", 1], "f", 5, None, {"0": "f"}, [["f"]]]
    mixed: list[Any] = [bad[0], good[0], *bad[1:5], good[1], *bad[5:], good[2], good[3]]
    assert decode(pack(["p", 1.0, mixed])) == ("p", 1.0, good)


@settings(max_examples=80, deadline=None)
@given(batch=st.lists(st.one_of(json_ish, item), max_size=6))
def test_decode_keeps_exactly_the_tagged_list_items(batch: list[Any]) -> None:
    """The kept items are precisely the lists whose first element is a string, in their original order."""
    expected = [item for item in batch if isinstance(item, list) and item and isinstance(item[0], str)]
    _, _, decoded = decode(pack(["p", 0.5, batch]))
    assert decoded == expected


# ---- change results -------------------------------------------------------------------------------------

results = st.one_of(
    st.builds(Accepted, INT64, st.none() | st.text(max_size=64)),
    st.builds(Rejected, st.text(max_size=20), st.text(max_size=100), st.none() | INT64),
)


@settings(max_examples=150, deadline=None)
@given(result=results)
def test_results_round_trip_through_the_relay(result: Accepted | Rejected) -> None:
    """A REST change or handoff answered on the owner pod comes back to the asking pod as the same result."""
    wire = result_to_wire(result)
    _, _, decoded = decode(encode("owner", [["r", 1, "ok", wire]]))
    assert result_from_wire(decoded[0][3]) == result


def test_result_wire_forms() -> None:
    assert result_to_wire(Accepted(3, "d1")) == ["acc", 3, "d1"]
    assert result_to_wire(Accepted(3)) == ["acc", 3, None]
    assert result_to_wire(Rejected("conflict", "base 1 is not the current version", 4)) == [
        "rej",
        "conflict",
        "base 1 is not the current version",
        4,
    ]
    assert result_to_wire(Rejected("invalid_op", "bad")) == ["rej", "invalid_op", "bad", None]


@pytest.mark.parametrize(
    "value",
    [
        None,
        "acc",
        [],
        ["acc"],
        ["acc", 1],
        ["acc", 1, None, "extra"],
        ["rej", "conflict", "m"],
        ["rej", "conflict", "m", 1, "extra"],
        ["ok", 1, None],
        {"acc": 1},
        [b"acc", 1, None],
    ],
)
def test_malformed_results_raise_bad_relay_message(value: Any) -> None:
    with pytest.raises(BadRelayMessage):
        result_from_wire(value)


@settings(max_examples=200, deadline=None)
@given(value=any_value)
def test_result_of_the_wrong_shape_raises_bad_relay_message(value: Any) -> None:
    """Anything that is not an `acc` triple or a `rej` quadruple is refused with BadRelayMessage."""
    shaped = isinstance(value, list) and (
        (len(value) == 3 and value[:1] == ["acc"]) or (len(value) == 4 and value[:1] == ["rej"])
    )
    if not shaped:
        with pytest.raises(BadRelayMessage):
            result_from_wire(value)


@pytest.mark.parametrize("version", [None, "x", [1], {"v": 1}, math.inf, math.nan])
def test_mistyped_accepted_version_raises_bad_relay_message(version: Any) -> None:
    """An `acc` result whose version is not a number is malformed like any other: BadRelayMessage, which the caller
    expects, rather than an arbitrary exception escaping from the REST call as an internal error."""
    with pytest.raises(BadRelayMessage):
        result_from_wire(["acc", version, None])
