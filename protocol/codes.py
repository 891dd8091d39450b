"""Close codes and error codes of wire protocol v1 (DESIGN §3), defined once for every module that uses them.

Plain `int`/`str` constants (not enums) on purpose: they go into frames, close calls and metric labels as they
are, with no conversion on the hot path.
"""

from __future__ import annotations

from typing import Final

# ---- WebSocket close codes ------------------------------------------------------------------------------

GOING_AWAY: Final = 1001  # server shutting down, or a connection idle past the timeout
PROTOCOL_ERROR: Final = 1002  # the first frame was not a hello
POLICY_VIOLATION: Final = 1008  # a run of bad frames
MESSAGE_TOO_BIG: Final = 1009  # a hello frame over the cap
INTERNAL_ERROR: Final = 1011  # the session failed (restart budget spent)
TRY_AGAIN_LATER: Final = 1013  # overloaded, storage away, or the session is moving to another pod: reconnect
UNAUTHORIZED: Final = 4001  # no, bad or expired token
FORBIDDEN: Final = 4003  # not the owner of the session
NOT_FOUND: Final = 4004  # no such session
SLOW_CONSUMER: Final = 4008  # the device could not keep up even after a resync
REPLACED: Final = 4009  # a newer connection of the same device took over
ENDED: Final = 4010  # the session was deleted

# Close codes after which reconnecting cannot help (clients stop instead of retrying).
FINAL_CLOSES: Final[dict[int, str]] = {UNAUTHORIZED: "unauthorized", FORBIDDEN: "forbidden", NOT_FOUND: "not_found",
                                       ENDED: "ended"}

# ---- error codes (the `code` of an error frame, and of a REST error body) -------------------------------

BAD_FRAME: Final = "bad_frame"
INVALID_OP: Final = "invalid_op"
CONFLICT: Final = "conflict"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
E_UNAUTHORIZED: Final = "unauthorized"
E_FORBIDDEN: Final = "forbidden"
E_NOT_FOUND: Final = "not_found"
E_SLOW_CONSUMER: Final = "slow_consumer"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"

# REST status of each error code (DESIGN §4).
HTTP_STATUS: Final[dict[str, int]] = {
    BAD_FRAME: 400,
    INVALID_OP: 400,
    E_UNAUTHORIZED: 401,
    E_FORBIDDEN: 403,
    E_NOT_FOUND: 404,
    CONFLICT: 409,
    TOO_LARGE: 413,
    RATE_LIMITED: 429,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}
