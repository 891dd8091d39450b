"""State ops of DESIGN §2: set/del/inc on RFC 6901 JSON Pointers, applied atomically per change.

Atomicity comes from an undo log rather than a copy of the document: each op records what it
replaced, and a failing op rolls the earlier ones back. That keeps a change O(size of the ops),
not O(size of the state).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from protocol import codes

JSON = Any
_MISSING = object()
MAX_POINTER_DEPTH = 32
MAX_STATE_DEPTH = 64
_BAD_ESCAPE = re.compile(r"~(?![01])")
# What orjson (snapshots, the wire) can encode: an int outside this range would poison every later snapshot.
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


class InvalidOp(ValueError):
    """The change cannot apply to the current state; nothing was changed."""

    code = codes.INVALID_OP


class TooLarge(InvalidOp):
    """The change would grow the state past its size limit; nothing was changed."""

    code = codes.TOO_LARGE


def parse_pointer(path: str) -> list[str]:
    """Split an RFC 6901 pointer into unescaped tokens; `""` is the whole document."""
    if path == "":
        return []
    if not path.startswith("/"):
        raise InvalidOp(f"path {path!r} must be empty or start with '/'")
    tokens = path[1:].split("/")
    if len(tokens) > MAX_POINTER_DEPTH:
        raise InvalidOp(f"path deeper than {MAX_POINTER_DEPTH} levels")
    out = []
    for token in tokens:
        if "~" in token:
            # A regex, not "remove ~0/~1 and look for ~": that accepts "~~01" (removing "~0" makes a new "~1").
            if _BAD_ESCAPE.search(token):
                raise InvalidOp(f"bad escape in path {path!r}")
            token = token.replace("~1", "/").replace("~0", "~")
        out.append(token)
    return out


def _copy(value: JSON, depth: int) -> JSON:
    """Own copy of a container value, so later ops never mutate a patch already sent or kept for replay.

    `depth` is where the value lands in the document; nesting past MAX_STATE_DEPTH is refused, or the state
    could no longer be encoded (orjson stops at 254 levels) and every snapshot of the session would fail.
    """
    if isinstance(value, dict):
        if depth >= MAX_STATE_DEPTH:
            raise InvalidOp(f"the state may nest at most {MAX_STATE_DEPTH} levels")
        return {key: _copy(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        if depth >= MAX_STATE_DEPTH:
            raise InvalidOp(f"the state may nest at most {MAX_STATE_DEPTH} levels")
        return [_copy(item, depth + 1) for item in value]
    return value


def nesting_ok(value: JSON, limit: int = MAX_STATE_DEPTH) -> bool:
    """True when `value` nests at most `limit` levels (for documents that enter without ops: REST create)."""
    try:
        _copy(value, MAX_STATE_DEPTH - limit)
    except InvalidOp:
        return False
    return True


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Undo:
    """What to restore if a later op of the same change fails."""

    __slots__ = ("entries", "orders")

    def __init__(self) -> None:
        self.entries: list[tuple[dict[str, JSON], str, object]] = []
        self.orders: dict[int, tuple[dict[str, JSON], list[str]]] = {}

    def record(self, container: dict[str, JSON], key: str) -> None:
        self.entries.append((container, key, container.get(key, _MISSING)))

    def keep_order(self, container: dict[str, JSON]) -> None:
        """Before a key is removed: a re-inserted key would go last, so remember the order to restore it."""
        if id(container) not in self.orders:
            self.orders[id(container)] = (container, list(container))

    def rollback(self) -> None:
        for container, key, old in reversed(self.entries):
            if old is _MISSING:
                container.pop(key, None)
            else:
                container[key] = old
        for container, order in self.orders.values():
            if list(container) != order:  # restore the exact key order: rolled back means byte-identical
                items = [(key, container[key]) for key in order if key in container]
                container.clear()
                container.update(items)


def _parent(state: dict[str, JSON], tokens: list[str], create: bool, undo: _Undo) -> dict[str, JSON] | None:
    """The object holding the last token; creates missing parents when `create`."""
    node = state
    for token in tokens[:-1]:
        child = node.get(token, _MISSING)
        if child is _MISSING:
            if not create:
                return None
            undo.record(node, token)
            child = {}
            node[token] = child
        if not isinstance(child, dict):
            raise InvalidOp(f"cannot traverse through a non-object at {token!r}")
        node = child
    return node


def _apply_one(state: dict[str, JSON], op: dict[str, JSON], undo: _Undo) -> None:
    kind = op.get("op")
    path = op.get("path")
    if not isinstance(path, str):
        raise InvalidOp("path must be a string")
    tokens = parse_pointer(path)
    if kind == "set":
        if "value" not in op:
            raise InvalidOp("set needs a value")
        value = op["value"]
        if not tokens:
            if not isinstance(value, dict):
                raise InvalidOp("setting the whole document needs an object")
            # Whole-document replacement: record every key so rollback restores them.
            undo.keep_order(state)
            for key in list(state):
                undo.record(state, key)
                del state[key]
            for key, item in value.items():
                undo.record(state, key)
                state[key] = _copy(item, 1)
            return
        parent = _parent(state, tokens, True, undo)
        assert parent is not None
        undo.record(parent, tokens[-1])
        parent[tokens[-1]] = _copy(value, len(tokens))
    elif kind == "del":
        if not tokens:
            raise InvalidOp("cannot delete the whole document")
        parent = _parent(state, tokens, False, undo)
        if parent is not None and tokens[-1] in parent:
            undo.keep_order(parent)
            undo.record(parent, tokens[-1])
            del parent[tokens[-1]]
    elif kind == "inc":
        by = op.get("by", 1)
        if not _is_number(by):
            raise InvalidOp("inc needs a numeric 'by'")
        if not tokens:
            raise InvalidOp("cannot increment the whole document")
        parent = _parent(state, tokens, True, undo)
        assert parent is not None
        current = parent.get(tokens[-1], 0)
        if not _is_number(current):
            raise InvalidOp(f"cannot increment a non-number at {path!r}")
        result = current + by
        if (isinstance(result, float) and not math.isfinite(result)) or (
            isinstance(result, int) and not _INT_MIN <= result <= _INT_MAX
        ):
            raise InvalidOp(f"inc at {path!r} would leave the range JSON can carry")
        undo.record(parent, tokens[-1])
        parent[tokens[-1]] = result
    else:
        raise InvalidOp(f"unknown op {kind!r}")


def apply_ops(
    state: dict[str, JSON],
    ops: Sequence[dict[str, JSON]],
    check: Callable[[dict[str, JSON]], None] | None = None,
) -> None:
    """Apply all ops to `state` in place, or none of them (raises InvalidOp).

    `check` runs on the changed state before the change is kept; raising InvalidOp there (e.g. TooLarge)
    rolls the whole change back.
    """
    undo = _Undo()
    try:
        for op in ops:
            if not isinstance(op, dict):
                raise InvalidOp("an op must be an object")
            _apply_one(state, op, undo)
        if check is not None:
            check(state)
    except InvalidOp:
        undo.rollback()
        raise
