"""The ops of DESIGN §2: set/del/inc on RFC 6901 pointers, all-or-nothing per change."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from protocol.ops import InvalidOp, TooLarge, apply_ops, parse_pointer

JSON = Any


def applied(state: dict[str, JSON], *ops: dict[str, JSON]) -> dict[str, JSON]:
    apply_ops(state, list(ops))
    return state


def test_set_creates_missing_parents() -> None:
    assert applied({}, {"op": "set", "path": "/a/b/c", "value": 1}) == {"a": {"b": {"c": 1}}}


def test_set_replaces_existing_value_in_place() -> None:
    state = {"a": 1, "b": 2, "c": 3}
    applied(state, {"op": "set", "path": "/b", "value": [1, {"x": None}]})
    assert list(state) == ["a", "b", "c"]
    assert state["b"] == [1, {"x": None}]


def test_set_needs_a_value() -> None:
    with pytest.raises(InvalidOp):
        apply_ops({}, [{"op": "set", "path": "/a"}])


def test_whole_document_set() -> None:
    assert applied({"a": 1, "b": {"c": 2}}, {"op": "set", "path": "", "value": {"z": [1]}}) == {"z": [1]}


@pytest.mark.parametrize("value", [[1], 3, "s", None, True])
def test_whole_document_set_needs_an_object(value: JSON) -> None:
    state = {"a": 1}
    with pytest.raises(InvalidOp):
        apply_ops(state, [{"op": "set", "path": "", "value": value}])
    assert state == {"a": 1}


def test_del_removes_key_and_missing_key_is_noop() -> None:
    state = {"a": {"b": 1, "c": 2}}
    applied(state, {"op": "del", "path": "/a/b"}, {"op": "del", "path": "/a/zz"}, {"op": "del", "path": "/q/r/s"})
    assert state == {"a": {"c": 2}}


def test_del_whole_document_is_invalid() -> None:
    with pytest.raises(InvalidOp):
        apply_ops({"a": 1}, [{"op": "del", "path": ""}])


def test_inc_missing_counts_as_zero_and_default_by_is_one() -> None:
    state = applied({}, {"op": "inc", "path": "/n", "by": 5}, {"op": "inc", "path": "/m/k"})
    assert state == {"n": 5, "m": {"k": 1}}
    applied(state, {"op": "inc", "path": "/n", "by": -2.5})
    assert state["n"] == 2.5


@pytest.mark.parametrize(
    "state, op",
    [
        ({"n": "x"}, {"op": "inc", "path": "/n", "by": 1}),
        ({"n": True}, {"op": "inc", "path": "/n", "by": 1}),
        ({"n": 1}, {"op": "inc", "path": "/n", "by": True}),
        ({"n": 1}, {"op": "inc", "path": "/n", "by": "1"}),
        ({"n": 1}, {"op": "inc", "path": "", "by": 1}),
        ({"n": 1}, {"op": "inc", "path": "/n", "by": 1e308 * 10}),
        ({"n": 1e308}, {"op": "inc", "path": "/n", "by": 1e308}),  # overflows to inf: orjson would write null
        ({"n": (1 << 64) - 1}, {"op": "inc", "path": "/n", "by": 1}),  # orjson cannot encode it: poisons snapshots
        ({"n": -(1 << 63)}, {"op": "inc", "path": "/n", "by": -1}),
    ],
)
def test_inc_wrong_types_and_ranges_are_invalid(state: dict[str, JSON], op: dict[str, JSON]) -> None:
    before = orjson.dumps(state)
    with pytest.raises(InvalidOp):
        apply_ops(state, [op])
    assert orjson.dumps(state) == before


def test_inc_to_the_edge_of_the_range_is_fine() -> None:
    state = applied({"n": (1 << 64) - 2}, {"op": "inc", "path": "/n", "by": 1})
    assert orjson.loads(orjson.dumps(state)) == state


@pytest.mark.parametrize(
    "op",
    [
        {"op": "move", "path": "/a"},
        {"path": "/a", "value": 1},
        {"op": "set", "path": 3, "value": 1},
        {"op": "set", "path": "a", "value": 1},
    ],
)
def test_malformed_ops_are_invalid(op: dict[str, JSON]) -> None:
    with pytest.raises(InvalidOp):
        apply_ops({}, [op])


def test_an_op_that_is_not_an_object_is_invalid() -> None:
    with pytest.raises(InvalidOp):
        apply_ops({}, ["set"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "path, tokens",
    [
        ("", []),
        ("/", [""]),
        ("/a/b", ["a", "b"]),
        ("/a~1b", ["a/b"]),
        ("/m~0n", ["m~n"]),
        ("/~01", ["~1"]),  # RFC 6901: ~1 is replaced before ~0, so "~01" is "~1", not "/"
        ("/~10", ["/0"]),
        ("//x", ["", "x"]),
    ],
)
def test_parse_pointer(path: str, tokens: list[str]) -> None:
    assert parse_pointer(path) == tokens


@pytest.mark.parametrize("path", ["a", "/a~", "/a~2", "/~~01", "/x/~a", "/" + "/".join(["k"] * 33)])
def test_bad_pointers(path: str) -> None:
    with pytest.raises(InvalidOp):
        parse_pointer(path)


def test_escaped_keys_round_trip_through_set() -> None:
    state = applied({}, {"op": "set", "path": "/a~1b/m~0n", "value": 1})
    assert state == {"a/b": {"m~n": 1}}
    applied(state, {"op": "del", "path": "/a~1b/m~0n"})
    assert state == {"a/b": {}}


@pytest.mark.parametrize(
    "op",
    [
        {"op": "set", "path": "/a/x", "value": 1},
        {"op": "set", "path": "/l/0", "value": 1},
        {"op": "del", "path": "/s/x"},
        {"op": "inc", "path": "/a/x/y", "by": 1},
        {"op": "set", "path": "/n/deeper/still", "value": 1},
    ],
)
def test_traversal_through_a_non_object_is_invalid(op: dict[str, JSON]) -> None:
    state: dict[str, JSON] = {"a": 1, "l": [0, 1], "s": "str", "n": None}
    before = orjson.dumps(state)
    with pytest.raises(InvalidOp):
        apply_ops(state, [op])
    assert orjson.dumps(state) == before


def _rich_state() -> dict[str, JSON]:
    return {"a": 1, "b": {"c": [1, 2], "d": {"e": "x"}}, "f": None, "g": 2.5, "h": "end"}


@pytest.mark.parametrize(
    "first_two",
    [
        [{"op": "set", "path": "/a", "value": 9}, {"op": "del", "path": "/b/d"}],
        [{"op": "del", "path": "/a"}, {"op": "set", "path": "/a", "value": {"new": 1}}],
        [{"op": "set", "path": "/new/deep/key", "value": 1}, {"op": "inc", "path": "/g", "by": 1}],
        [{"op": "del", "path": "/b"}, {"op": "del", "path": "/f"}],
        [{"op": "set", "path": "", "value": {"h": 1, "zz": 2}}, {"op": "set", "path": "/q", "value": 1}],
        [{"op": "set", "path": "", "value": {}}, {"op": "set", "path": "", "value": {"b": 0, "a": 1}}],
        [{"op": "del", "path": "/b/d/e"}, {"op": "set", "path": "", "value": {"x": 1}}],
    ],
)
def test_a_failing_third_op_leaves_state_byte_identical(first_two: list[dict[str, JSON]]) -> None:
    state = _rich_state()
    inner_b = state["b"]
    before = orjson.dumps(state)
    with pytest.raises(InvalidOp):
        apply_ops(state, [*first_two, {"op": "inc", "path": "", "by": 1}])
    assert orjson.dumps(state) == before
    assert state["b"] is inner_b  # restored in place, not rebuilt


def test_a_third_op_failing_half_way_is_rolled_back_too() -> None:
    state = _rich_state()
    before = orjson.dumps(state)
    ops = [
        {"op": "set", "path": "", "value": {"p": {"q": "s"}, "h": 0}},
        {"op": "del", "path": "/h"},
        {"op": "set", "path": "/new/p/q/r", "value": 1},  # creates /new/p/q, then...
    ]
    apply_ops({}, ops)  # (fine on its own)
    ops[2] = {"op": "inc", "path": "/p/q"}  # ...fails only after traversal: "s" is no number
    with pytest.raises(InvalidOp):
        apply_ops(state, ops)
    assert orjson.dumps(state) == before


def test_check_failure_rolls_back() -> None:
    state = _rich_state()
    before = orjson.dumps(state)

    def check(changed: dict[str, JSON]) -> None:
        assert changed["big"] == "x" * 100  # the check sees the changed state
        raise TooLarge("too big")

    with pytest.raises(TooLarge) as info:
        apply_ops(state, [{"op": "del", "path": "/a"}, {"op": "set", "path": "/big", "value": "x" * 100}], check)
    assert info.value.code == "too_large"
    assert orjson.dumps(state) == before


def test_check_passing_keeps_the_change() -> None:
    seen: list[int] = []
    state = applied({}, {"op": "set", "path": "/a", "value": 1})
    apply_ops(state, [{"op": "inc", "path": "/a", "by": 1}], lambda s: seen.append(s["a"]))
    assert state == {"a": 2}
    assert seen == [2]


def test_values_are_copied() -> None:
    value = {"list": [1, {"x": 1}], "obj": {"y": 2}}
    op = {"op": "set", "path": "/v", "value": value}
    state: dict[str, JSON] = {}
    apply_ops(state, [op, {"op": "set", "path": "", "value": {"w": value}}])
    state["w"]["list"][1]["x"] = 99
    state["w"]["obj"]["new"] = 1
    assert value == {"list": [1, {"x": 1}], "obj": {"y": 2}}
    apply_ops(state, [op])
    apply_ops(state, [{"op": "set", "path": "/v/obj/y", "value": 3}, {"op": "inc", "path": "/v/obj/z"}])
    assert op["value"] == {"list": [1, {"x": 1}], "obj": {"y": 2}}
