"""One-for-one supervision: a restart budget per actor (Proto.Actor style), nothing else.

The session actor asks `RestartBudget.allow()` after a crash; when the budget for the window is
spent, the session is marked failed instead of restarting in a loop (DESIGN §5 guarantee 4).
"""

from __future__ import annotations

import enum
from collections import deque


class Directive(enum.Enum):
    RESTART = "restart"
    STOP = "stop"


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds."""

    __slots__ = ("_times", "max_restarts", "window_s")

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: deque[float] = deque()

    def decide(self, now: float) -> Directive:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return Directive.STOP
        self._times.append(now)
        return Directive.RESTART

    @property
    def recent(self) -> int:
        return len(self._times)
