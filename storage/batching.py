"""Group commit across sessions: one journal round trip for every actor waiting at that moment.

Each actor already writes all changes of its turn in one `append`. With hundreds of busy sessions that is
still one Redis/PostgreSQL round trip (and one bridge hop) per session turn, and the trap of per-op round
trips comes back (TRAPS: a hop costs 130-190 µs; batches of ~200 cost ~1 µs per op). This wrapper queues
appends and lets one flusher task write whatever accumulated as a single `append_many`: no added latency
when idle (a lone append is flushed at once), larger batches exactly when load grows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from runtime.sleeper import Sleeper
from storage.ports import Change, Journal, StorageUnavailable

MAX_BATCH_SESSIONS = 256


class ManyJournal(Journal, Protocol):
    async def append_many(
        self, batches: Mapping[str, Sequence[Change]], tokens: Mapping[str, int] | None = None
    ) -> None:
        """Write several sessions' changes in one round trip (each with its fencing token); per-session failures
        as an `errors` mapping."""
        ...


class _Pending(Sleeper):
    """One append waiting for its flush: the appender sleeps on it; `finish` wakes it (no-op once cancelled)."""

    __slots__ = ("changes", "error", "session_id", "token")

    def __init__(self, session_id: str, changes: Sequence[Change], token: int) -> None:
        super().__init__()
        self.session_id = session_id
        self.changes = changes
        self.token = token
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.wake()


class BatchingJournal:
    """A Journal whose appends are coalesced across sessions; reads and trims go straight through.

    `run()` must be running (in the storage's nursery) for appends to complete. One session never has two
    appends in flight (its actor awaits each), so per-session order is kept.

    The waits are `Sleeper`s (trio's low-level park and reschedule), not an Event per append and per wake: at
    hundreds of group commits a second, creating, setting and waiting on those Events was 4 % of the server's CPU
    in Redis mode (py-spy --gil, `bench fanout --redis`). A cancelled append stops waiting; its changes may still
    be written (as before: a cancelled actor's turn is lost with it, and a retry of the same versions is a no-op).
    """

    def __init__(self, inner: ManyJournal) -> None:
        self.inner = inner
        self._queue: list[_Pending] = []
        self._idle = Sleeper()  # the flusher, while it waits for work
        self._stopped = False  # run() ran and ended: nobody would flush a new append
        self.flushes = 0
        self.appended = 0

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        if not changes:
            return
        if self._stopped:
            raise StorageUnavailable("journal closing")
        pending = _Pending(session_id, changes, token)
        self._queue.append(pending)
        self._idle.wake()
        await pending.sleep()  # no checkpoint between queueing and sleeping: the flusher cannot finish it first
        if pending.error is not None:
            raise pending.error

    async def run(self) -> None:
        self._stopped = False
        try:
            while True:
                if not self._queue:
                    # No scheduling pass of our own before flushing: the first append wakes us into trio's next
                    # batch of runnable tasks, so every actor that ran with it (one read-hub round) has queued
                    # already. One here cost 4 µs of CPU per flush and shared no more round trips
                    # (`python -m bench.groupcommit_probe`).
                    await self._idle.sleep()
                while self._queue:
                    batch, self._queue = self._queue[:MAX_BATCH_SESSIONS], self._queue[MAX_BATCH_SESSIONS:]
                    await self._flush(batch)
        finally:
            # Stopped (the storage is closing): whoever still waits, or appends later, fails rather than hangs.
            self._stopped = True
            queue, self._queue = self._queue, []
            for pending in queue:
                pending.finish(StorageUnavailable("journal closing"))

    async def _flush(self, batch: list[_Pending]) -> None:
        merged: dict[str, list[Change]] = {}
        tokens: dict[str, int] = {}
        for pending in batch:
            merged.setdefault(pending.session_id, []).extend(pending.changes)
            tokens[pending.session_id] = pending.token
        try:
            await self.inner.append_many(merged, tokens)
        except BaseException as exc:
            errors: Mapping[str, BaseException] = getattr(exc, "errors", None) or {}
            # A refusal names its sessions; any other failure (an outage, or our cancellation) fails them all.
            failure = exc if isinstance(exc, Exception) else StorageUnavailable("journal closing")
            for pending in batch:
                pending.finish(errors.get(pending.session_id) if errors else failure)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self.flushes += 1
        self.appended += len(batch)
        for pending in batch:
            pending.finish()

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        return await self.inner.read_after(session_id, version)

    async def trim(self, session_id: str, upto_version: int) -> None:
        await self.inner.trim(session_id, upto_version)

    async def delete(self, session_id: str) -> None:
        await self.inner.delete(session_id)
