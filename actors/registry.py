"""Which session actors are alive on this pod: activation on first use, passivation, moves, shutdown.

Transport and API reach actors through the router (actors/router.py), which asks the registry for the ones this
pod owns. It is no global: the composition root makes one and passes it down, so tests can run several side by
side (several pods in one process included).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from actors import metrics
from actors.config import ActorConfig
from actors.leases import LeaseKeeper
from actors.messages import ActorUnavailable, Message, Overloaded, Passivate, Shutdown
from actors.session_actor import SessionActor, SessionNotFound, now_iso
from actors.supervisor import finish
from protocol import codes
from runtime.timers import TimerHeap
from storage.ports import JSON, SessionRecord, Snapshot, Storage, save_durable

log = structlog.get_logger("sessiond.registry")
BUDGET_CHECK_S = 1.0
MAX_FAILED = 10_000  # failed-session marks kept (oldest dropped first: they only delay a retry)

__all__ = ["Registry", "SessionNotFound"]


def new_session_id() -> str:
    """URL-safe, unguessable, 22 characters."""
    return secrets.token_urlsafe(16)


class Registry:
    def __init__(self, storage: Storage, config: ActorConfig, leases: LeaseKeeper) -> None:
        self.storage = storage
        self.config = config
        self.leases = leases
        self._actors: dict[str, SessionActor] = {}
        self._retiring: dict[str, SessionActor] = {}
        self._activating: dict[str, trio.Event] = {}
        self._failed: dict[str, float] = {}  # session -> trio time until which it stays failed
        self._nursery: trio.Nursery | None = None
        self.alarms = TimerHeap()  # every actor's checkpoint and passivation alarm: one task, not one per actor
        self.closing = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts every actor task; returns once `shutdown()` has stopped them all."""
        metrics.HOT_ACTORS.attach(self, self.config.hot_actors, self.hot_rows)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.alarms.run)
                task_status.started()
                while True:
                    await trio.sleep(BUDGET_CHECK_S)
                    self.enforce_memory_budget()
                    self.forget_failures()
        finally:
            # Dormant actors have no task to end them: end them here (their lease back, their mail answered).
            with trio.CancelScope(shield=True):
                for actor in [a for a in self._actors.values() if a.dormant]:
                    await finish(actor, started=True, token=actor.token)
            metrics.HOT_ACTORS.detach(self)

    def hot_rows(self) -> list[metrics.HotRow]:
        """Every live actor's figures for the hot-actor metrics (read on the trio thread, ranked by the scrape)."""
        now = time.monotonic()
        return [actor.hot_row(now) for actor in list(self._actors.values()) if actor.state is not None]

    def forget_failures(self) -> None:
        """Drop failed-session marks whose cooldown is over, and keep at most MAX_FAILED of them (§5.5)."""
        now = trio.current_time()
        self._failed = {sid: until for sid, until in self._failed.items() if until > now}
        while len(self._failed) > MAX_FAILED:
            self._failed.pop(next(iter(self._failed)))

    def enforce_memory_budget(self) -> int:
        """Passivate idle actors, least recently used first, while what live actors hold exceeds the budget.

        Each actor counts its state and replay window, the send queues of its devices on this pod and its entries
        in an in-process journal (the embedded store's; a Redis or PostgreSQL journal is not our memory).
        Returns how many were asked to leave; each checkpoints before it stops (DESIGN §5.5).
        """
        journal_bytes: Callable[[str], int] | None = getattr(self.storage.journal, "session_bytes", None)
        # Runs every second over every live actor: the common case (under budget) builds nothing per actor.
        total = 0
        for actor in self._actors.values():
            if actor.state is not None:
                total += actor.budget_bytes + (journal_bytes(actor.id) if journal_bytes else 0)
        metrics.ACTOR_STATE_BYTES.set(total)
        if total <= self.config.memory_budget_bytes:
            return 0
        live = [a for a in self._actors.values() if a.state is not None]
        held = {a: a.budget_bytes + (journal_bytes(a.id) if journal_bytes else 0) for a in live}
        asked = 0
        for actor in sorted((a for a in live if not a.links), key=lambda a: a.idle_since):
            if total <= self.config.memory_budget_bytes:
                break
            try:
                actor.tell(Passivate())
            except (Overloaded, ActorUnavailable):
                continue
            total -= held[actor]
            asked += 1
        return asked

    # ---- lookup -------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionActor:
        """The live actor of a session, activating it from storage on first use.

        Returns without a checkpoint after the final lookup, so a caller's `tell` right after it
        reaches this actor before it could passivate.
        """
        while True:
            if self.closing:
                raise ActorUnavailable("server shutting down")
            actor = self._actors.get(session_id)
            if actor is not None:
                return actor
            failed_until = self._failed.get(session_id)
            if failed_until is not None:
                if trio.current_time() < failed_until:
                    raise ActorUnavailable("session failed after repeated crashes; retry later")
                del self._failed[session_id]
            retiring = self._retiring.get(session_id)
            if retiring is not None:
                await retiring.stopped.wait()
                continue
            pending = self._activating.get(session_id)
            if pending is not None:
                await pending.wait()
                continue
            return await self._activate(session_id)

    async def _activate(self, session_id: str) -> SessionActor:
        assert self._nursery is not None, "Registry.run() is not running"
        done = self._activating[session_id] = trio.Event()
        try:
            actor = SessionActor(session_id, self.storage, self.config, self.leases, self._retire, self.alarms)
            await self._nursery.start(actor.run)
            self._actors[session_id] = actor
            return actor
        finally:
            del self._activating[session_id]
            done.set()

    def _retire(self, actor: SessionActor) -> None:
        """Called by an actor that stops taking messages; later lookups wait until it is gone."""
        if self._actors.get(actor.id) is actor:
            del self._actors[actor.id]
        if actor.stopped.is_set():
            if self._retiring.get(actor.id) is actor:
                del self._retiring[actor.id]
            if actor.failed:  # restart budget spent: refuse the session for one restart window
                self._failed[actor.id] = trio.current_time() + self.config.restart_window_s
        else:
            self._retiring[actor.id] = actor

    def live(self) -> list[SessionActor]:
        return list(self._actors.values())

    def lookup(self, session_id: str) -> SessionActor | None:
        """The live actor, if any (no activation)."""
        return self._actors.get(session_id)

    # ---- conveniences for the router -------------------------------------------------------------

    async def tell(self, session_id: str, message: Message) -> SessionActor:
        """Deliver to the session's actor, activating it; retried once if that actor was just retiring."""
        for attempt in range(2):
            actor = await self.get(session_id)
            try:
                actor.tell(message)
                return actor
            except ActorUnavailable:
                if attempt or not actor.stopping:
                    raise
        raise AssertionError("unreachable")

    async def ask(self, session_id: str, message: Any, timeout_s: float = 10.0) -> Any:
        await self.tell(session_id, message)
        return await message.reply.wait(timeout_s)

    def move_out(self, is_mine: Callable[[str], bool], reason: str = "rebalance") -> int:
        """Hand over every live actor whose session `is_mine` says belongs elsewhere now: it checkpoints, closes
        its devices with 1013 (they resume through the new owner) and releases its lease. Returns how many."""
        moved = 0
        for actor in list(self._actors.values()):
            if is_mine(actor.id):
                continue
            try:
                actor.tell(Shutdown(local_code=codes.TRY_AGAIN_LATER, reason="session moved to another pod"))
            except (Overloaded, ActorUnavailable):
                continue  # busy or already stopping: the next rebalance looks again
            metrics.MOVES.labels(reason).inc()
            moved += 1
        return moved

    async def owner_of(self, session_id: str) -> str | None:
        """The owner of a live (not ended) session, without activating it; None when there is none."""
        actor = self._actors.get(session_id)
        if actor is not None and actor.state is not None:
            return actor.state.owner if actor.state.status != "ended" else None
        record = await self.storage.sessions.get_session(session_id)
        if record is None or record.status == "ended":
            return None
        return record.owner

    async def create_session(
        self, owner: str, name: str, metadata: dict[str, JSON], state: dict[str, JSON]
    ) -> SessionRecord:
        now = time.time()
        record = SessionRecord(
            id=new_session_id(),
            owner=owner,
            name=name,
            metadata=metadata,
            status="active",
            version=0,
            active=None,
            created_at=now,
            updated_at=now,
        )
        await self.storage.sessions.record_user(owner)
        await self.storage.sessions.create_session(record)
        # The durable tier: the 201 promises the initial state whatever the durability mode (Redis may lose it).
        await save_durable(self.storage.snapshots, Snapshot(record.id, 0, state, "active", None))
        self.storage.events.publish(
            "session.created",
            {"type": "session.created", "session": record.id, "owner": owner, "at": now_iso(), "name": name},
        )
        return record

    async def shutdown(self, grace_s: float) -> None:
        """Checkpoint every actor, close its devices with 1001 and release its lease, then stop hosting actors.

        Activations already under way finish and are shut down too; no new ones start.
        """
        self.closing = True
        with trio.move_on_after(grace_s):
            while self._actors or self._activating:
                for pending in list(self._activating.values()):
                    await pending.wait()
                async with trio.open_nursery() as nursery:
                    for actor in list(self._actors.values()):
                        nursery.start_soon(self._stop_actor, actor, grace_s)
        if self._actors:
            log.error("shutdown grace expired: sessions not checkpointed", sessions=sorted(self._actors)[:50])
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _stop_actor(self, actor: SessionActor, grace_s: float) -> None:
        try:
            await actor.ask(Shutdown(), grace_s)
        except Exception as exc:  # Overloaded, ActorUnavailable: it still stops when its nursery is cancelled
            log.warning("actor did not shut down cleanly", session=actor.id, error=str(exc))
        await actor.stopped.wait()
