"""When and how one session actor writes its snapshots (DESIGN §5 guarantee 2).

Two tiers: a fast snapshot (Redis; without Redis, this process's memory) on every handoff and, with Redis, every N
versions; and a durable one (PostgreSQL, else the SQLite file) every M versions or T seconds when changed, on
pause, passivation, shutdown and moves. Periodic ones, and a pause's durable one, are written by a background task
while the actor goes on serving (a slow database must not stall acks), at most one in flight; the others are
awaited. Every write carries the actor's fencing token: a write refused as `Fenced` means another pod owns the
session now.

A claim's ack waits for its snapshot in the fast tier only (issue 9: what must be synchronous is the journal;
snapshots can follow); with durability `postgres`, or a single tier, in the durable tier. A pause's ack waits for
the durable tier (DESIGN §5), but without Redis (durability `memory`): there the fast tier is memory beside the
in-process journal, which no ack waits beyond, so a pause is acked from it (an actor crash restores it, at no thread
hop) and the same snapshot is written durably at once in the background. A snapshot that went to the fast tier
alone leaves the durable tier behind at the same version (`_behind`): the next periodic checkpoint catches it up,
as it does changes.

An awaited handoff checkpoint does only what its ack needs: the snapshot (and with it the session record, in one
write where the store allows, `save_durable_checkpoint`). Trimming the journal the snapshot covers is
housekeeping that no ack waits for: it follows in the background (but for the in-process journal's, a list
operation with no I/O, done inline rather than in a task of its own).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from actors import metrics
from actors.config import ActorConfig
from actors.session import SessionState
from storage.ports import Fenced, SessionRecord, Snapshot, Storage, StorageError, save_durable_checkpoint

log = structlog.get_logger("sessiond.actor")


class Checkpointer:
    """The snapshot policy and writes of one actor; `state` is the actor's current SessionState."""

    __slots__ = (
        "_behind",
        "_busy",
        "_busy_durable",
        "_fast_version",
        "_on_fenced",
        "_queued",
        "config",
        "inline_trim",
        "last_checkpoint_at",
        "last_clock",
        "period_s",
        "session_id",
        "storage",
        "tasks",
        "tiered",
        "token",
        "volatile",
    )

    def __init__(
        self, session_id: str, storage: Storage, config: ActorConfig, on_fenced: Callable[[], None]
    ) -> None:
        self.session_id = session_id
        self.storage = storage
        self.config = config
        self.token = 0  # the lease token every write carries (set once the lease is taken)
        self._on_fenced = on_fenced
        self.last_checkpoint_at: float | None = None  # wall clock of the last durable checkpoint
        self.last_clock = trio.current_time()  # trio clock of the last durable attempt
        self._fast_version = 0
        # Snapshots written to the fast tier alone since the durable tier last caught up.
        self._behind = 0
        self.inline_trim = bool(getattr(getattr(storage, "journal", None), "in_process", False))
        snapshots = getattr(storage, "snapshots", None)  # (None: a test's actor without storage)
        self.tiered = bool(getattr(snapshots, "tiered", False))  # a fast tier to write handoffs to
        self.volatile = bool(getattr(snapshots, "volatile", False))  # ... in this process's memory
        # Each actor's own period (±10 %): sessions started together must not all checkpoint in the same instant.
        self.period_s = config.checkpoint_every_s * random.uniform(0.9, 1.1)
        self._busy: trio.Event | None = None  # set while a background checkpoint is being written
        self._busy_durable = False  # ... to the durable tier
        self._queued: str | None = None  # the reason of a durable checkpoint to write once that one is done
        self.tasks: trio.Nursery | None = None  # where background writes run (the actor's serving nursery)

    @property
    def _log(self) -> Any:
        return log.bind(session=self.session_id)  # bound on use: checkpoints rarely log

    def detach(self) -> None:
        """The actor is done: drop its callback (a reference cycle actor -> checkpointer -> actor), so that it is
        freed when the registry lets go of it, not at the next full collection (issue 8)."""
        self._on_fenced = _nothing

    def dirty(self, state: SessionState) -> bool:
        """The durable tier is behind: changes, or a handoff whose snapshot went to the fast tier alone."""
        return state.version != state.checkpointed_version or self._behind > 0

    def held_bytes(self, state: SessionState) -> int:
        """What a volatile fast tier holds for this session: about one more copy of its state (DESIGN §5.5)."""
        return state.approx_bytes if self._behind and self.volatile else 0

    def mark_behind(self) -> None:
        """The state came from a fast snapshot newer than the durable one (a restart of a volatile tier's)."""
        self._behind += 1

    def due(self, state: SessionState, now: float) -> bool:
        """Dirty, and a period has passed since the last durable attempt."""
        return self.dirty(state) and now - self.last_clock >= self.period_s

    async def now(
        self,
        state: SessionState,
        reason: str,
        *,
        durable: bool = True,
        force: bool = False,
        raise_errors: bool = False,
        trim_later: bool = False,
    ) -> tuple[Snapshot, SessionRecord] | None:
        """Checkpoint now, awaited: handoff (its frame must not go out first), passivation, shutdown. Returns the
        snapshot and record it wrote (None: nothing to write).

        `trim_later`: the journal trim runs in the background (a handoff: the ack waits for the snapshot only);
        a final checkpoint (passivation, shutdown) trims before returning, the serving nursery is about to go."""
        while self._busy is not None and (durable or not self._busy_durable):
            # Never two writes to one tier at once (an older snapshot must not land last). A fast one may pass a
            # background durable write: the fast tier is another store, and `_behind` keeps the count right.
            await self._busy.wait()
        taken = self._take(state, durable, force)
        if taken is None:
            return None
        await self._write(
            state, *taken, durable=durable, reason=reason, raise_errors=raise_errors, trim_later=trim_later
        )
        return taken[0], taken[1]

    def soon(
        self,
        state: SessionState,
        reason: str,
        *,
        durable: bool = True,
        queue: bool = False,
        taken: tuple[Snapshot, SessionRecord] | None = None,
    ) -> None:
        """Take the snapshot now (or write `taken`, one of this very state) and write it in the background
        (periodic checkpoints, a pause's durable one). With a write in flight it is skipped, or with `queue` taken
        and written once that one is done."""
        if self.tasks is None:
            return
        if self._busy is not None:
            if queue:
                self._queued = reason
            return
        if taken is None or not durable:
            this = self._take(state, durable, force=False)
            if this is None:
                return
        else:
            self.last_clock = trio.current_time()
            this = (*taken, self._behind)
        done = self._busy = trio.Event()
        self._busy_durable = durable

        async def write() -> None:
            try:
                await self._write(state, *this, durable=durable, reason=reason, raise_errors=False)
            finally:
                self._busy = None
                done.set()
                queued, self._queued = self._queued, None
                if queued is not None:
                    self.soon(state, queued)

        self.tasks.start_soon(write)

    def by_policy(self, state: SessionState) -> None:
        """Fast snapshot every N versions (tiered stores), durable checkpoint every M versions."""
        if state.version - state.checkpointed_version >= self.config.checkpoint_every_versions:
            self.soon(state, "versions")
        every = self.config.fast_snapshot_every_versions
        if every is not None and state.version - self._fast_version >= every:
            self.soon(state, "versions", durable=False)

    async def _trim(self, upto_version: int) -> None:
        """Forget the journal entries a stored snapshot covers. Versions only grow, so a trim may land after later
        appends; one lost (an error, or the actor stopping first) is redone by the next checkpoint's trim."""
        try:
            with trio.fail_after(self.config.storage_timeout_s):
                await self.storage.journal.trim(self.session_id, upto_version)
        except (StorageError, trio.TooSlowError) as exc:
            self._log.warning("journal trim failed", error=str(exc) or type(exc).__name__)

    def stopped_serving(self) -> None:
        """The serving nursery is gone (its background write with it)."""
        self.tasks = None
        self._busy = None
        self._queued = None

    def _take(self, state: SessionState, durable: bool, force: bool) -> tuple[Snapshot, SessionRecord, int] | None:
        """The snapshot and record, and (durable) how many fast-only handoffs they cover."""
        if not force and not (self.dirty(state) if durable else state.version != self._fast_version):
            return None
        if durable:
            self.last_clock = trio.current_time()  # the attempt: a failure is retried a period later
        return state.snapshot(), state.record(), self._behind if durable else 0

    async def _write(
        self,
        state: SessionState,
        snapshot: Snapshot,
        record: SessionRecord,
        covers: int,
        *,
        durable: bool,
        reason: str,
        raise_errors: bool,
        trim_later: bool = False,
    ) -> None:
        """Snapshot (durable tier, or the fast Redis tier), then trim the journal it covers."""
        started = time.perf_counter()
        storage = self.storage
        # A trim waits in a task of its own, unless the journal is this process's memory (no I/O to wait for).
        tasks = self.tasks if trim_later and not self.inline_trim else None
        trim = durable or not getattr(storage.snapshots, "fast_trims_journal", False)
        try:
            with trio.fail_after(self.config.storage_timeout_s):
                if durable:
                    await save_durable_checkpoint(storage, snapshot, record, self.token)
                else:
                    await storage.snapshots.save_snapshot(snapshot)
                if trim and tasks is None:
                    await storage.journal.trim(self.session_id, snapshot.version)
        except Fenced:
            metrics.FENCED_WRITES.inc()
            self._log.warning("checkpoint refused: another pod owns the session now", reason=reason)
            if raise_errors:
                raise
            self._on_fenced()
            return
        except (StorageError, trio.TooSlowError) as exc:
            metrics.CHECKPOINT_FAILURES.inc()
            self._log.warning("checkpoint failed", reason=reason, error=str(exc) or type(exc).__name__)
            if raise_errors:
                raise
            return
        metrics.CHECKPOINT_SECONDS.labels("durable" if durable else "fast").observe(time.perf_counter() - started)
        if trim and tasks is not None:
            tasks.start_soon(self._trim, snapshot.version)
        self._fast_version = max(self._fast_version, snapshot.version)
        if durable:
            state.checkpointed_version = max(state.checkpointed_version, snapshot.version)
            self.last_checkpoint_at = time.time()
            self._behind -= covers  # writes of one actor never overlap: none came between the take and now
            if not self._behind:
                covered = getattr(storage.snapshots, "covered", None)
                if covered is not None:
                    covered(self.session_id, snapshot.version)
        else:
            self._behind += 1  # the fast tier is ahead of the durable one, at this version too


def _nothing() -> None:
    pass
