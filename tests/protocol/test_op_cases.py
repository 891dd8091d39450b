"""The shared op-case table (protocol/cases/ops.json) through protocol/ops.py.

The TypeScript SDK runs the same table through its replica (sdk-ts/test/ops-cases.test.ts), so the server's op
semantics and the client's stay equal: a change to either that the other does not follow fails one of the two.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import orjson
import pytest

from protocol.ops import InvalidOp, apply_ops

JSON = Any


def load_cases() -> list[dict[str, JSON]]:
    """Read through the package (package-data), as an installed sessiond would."""
    text = resources.files("protocol").joinpath("cases/ops.json").read_text(encoding="utf-8")
    cases: list[dict[str, JSON]] = json.loads(text)
    return cases


CASES = load_cases()


def test_table_is_well_formed_and_covers_every_kind() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in CASES:
        assert set(case) <= {"name", "state", "ops", "result", "error", "why"}, case["name"]
        assert ("result" in case) != ("error" in case), case["name"]
    kinds = {op.get("op") for case in CASES for op in case["ops"] if isinstance(op, dict)}
    assert {"set", "del", "inc"} <= kinds
    assert sum("error" in case for case in CASES) >= 20
    assert sum("result" in case for case in CASES) >= 20
    paths = [op.get("path") for case in CASES for op in case["ops"] if isinstance(op, dict)]
    assert any("~0" in p for p in paths if isinstance(p, str)) and any("~1" in p for p in paths if isinstance(p, str))
    assert "" in paths  # whole-document ops


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_case(case: dict[str, JSON]) -> None:
    state = copy.deepcopy(case["state"])
    before = orjson.dumps(state)
    if "error" in case:
        with pytest.raises(InvalidOp) as caught:
            apply_ops(state, case["ops"])
        assert caught.value.code == case["error"]
        assert orjson.dumps(state) == before, "a refused change must leave the state byte-identical"
    else:
        apply_ops(state, case["ops"])
        assert state == case["result"]
        assert list(state) == list(case["result"]), "top-level key order"
