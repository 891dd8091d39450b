"""One-for-one supervision of a session actor: its lease, its loading, and its restarts (DESIGN §5.4, §6).

`supervise` is an actor's whole life: take the session's lease (the fencing token every write carries), load
the newest snapshot plus the journal, serve, and after a crash restart from storage within a budget (Proto.Actor
style: at most `max_restarts` in `restart_window_s`, then the session is marked failed instead of looping). A
storage outage is no crash: the actor reloads once storage answers, spending no budget. A lost lease or a fenced
write stops the actor at once: another pod owns the session, and its devices resume there.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from actors import metrics
from actors.messages import ActorUnavailable, NotOwner
from actors.session import SessionState
from protocol import codes
from runtime.timers import TimerHeap
from storage.ports import StorageError, StorageUnavailable

if TYPE_CHECKING:
    from actors.session_actor import SessionActor

STORAGE_RETRY_MAX_S = 10.0


class Directive(enum.Enum):
    RESTART = "restart"
    STOP = "stop"


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds."""

    __slots__ = ("_times", "max_restarts", "window_s")

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: deque[float] | None = None  # made at the first crash: most actors never crash

    def decide(self, now: float) -> Directive:
        times = self._times
        if times is None:
            times = self._times = deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.max_restarts:
            return Directive.STOP
        times.append(now)
        return Directive.RESTART

    @property
    def recent(self) -> int:
        return len(self._times) if self._times is not None else 0


async def supervise(
    actor: SessionActor, *, resumed: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Lease, load, serve, restart; always retires the actor and gives its lease back (unless it was lost).

    An idle actor goes dormant: this task returns, keeping the lease, the state and the devices, and the next
    message starts `supervise(resumed=True)`, which serves again without loading. Only the task that ends the
    actor's life retires it.
    """
    from actors.session_actor import OwnershipLost, SessionNotFound, Unpersisted

    started = resumed
    token = actor.checkpoints.token if resumed else 0
    dormant = False
    try:
        if not resumed:
            token = await actor.leases.acquire(actor.id)  # ActorUnavailable / StorageUnavailable before `started`
            actor.checkpoints.token = token
            actor.leases.track(actor.id, token, actor.lease_lost)
        reload = not resumed
        while True:
            try:
                if reload:
                    actor.state = await load(actor, wait_for_storage=started)
                    actor.degraded = False
                    if not started and not actor.leases.is_mine(actor.id):
                        raise NotOwner("the session was placed on another pod while it was loading")
                    if not started:
                        metrics.ACTIVATIONS.inc()
                        metrics.ACTORS_LIVE.inc()
                        started = True
                        task_status.started()
                    else:
                        actor.resync_all()
                reload = True
                if not await actor.serve():
                    return
                if actor.fall_asleep():
                    dormant = True
                    return
                reload = False  # mail came while the serving nursery closed: serve it, nothing to reload
            except SessionNotFound:
                if not started:
                    raise
                actor.close_links(codes.NOT_FOUND, "session not found")  # ended (or deleted) while reloading
                return
            except OwnershipLost as exc:
                if not started:
                    raise ActorUnavailable("the session is moving to another pod; retry") from exc
                metrics.MOVES.labels("lease_lost").inc()
                actor.lost = True
                actor.fail_inflight(ActorUnavailable("the session moved to another pod; retry"))
                actor.close_links(codes.TRY_AGAIN_LATER, "session moved to another pod")
                actor.log.warning("lease lost: stopped serving the session", reason=str(exc))
                return
            except Unpersisted as exc:
                # Not a crash: storage is away. Reload what is stored once it is back; no restart budget spent.
                actor.degraded = True
                actor.log.warning("storage unavailable: changes refused, reloading", error=str(exc.__cause__))
                continue
            except Exception as exc:
                if not started:
                    raise
                actor.fail_inflight(ActorUnavailable("the session restarted; retry"))
                metrics.CRASHES.inc()
                actor.log.error("actor crashed", exc_info=exc)
                actor.storage.events.publish(
                    "actor.crashed", actor.event_body("actor.crashed", {"error": type(exc).__name__})
                )
                budget = actor.restart_budget
                if budget is None:  # kept on the actor: the window spans its dormant spells
                    budget = actor.restart_budget = RestartBudget(
                        actor.config.max_restarts, actor.config.restart_window_s
                    )
                if budget.decide(trio.current_time()) is Directive.STOP:
                    metrics.FAILED.inc()
                    actor.failed = True
                    actor.log.error("session failed: restart budget spent", restarts=budget.recent)
                    actor.close_links(codes.INTERNAL_ERROR, "session failed")
                    return
    finally:
        if not dormant:
            await finish(actor, started=started, token=token)


async def finish(actor: SessionActor, *, started: bool, token: int) -> None:
    """The end of an actor's life: answer what waits, give the lease back (unless lost), retire. Also run by
    the registry for an actor still dormant when it stops hosting actors."""
    actor.dormant = False
    TimerHeap.cancel(actor)
    actor.fail_pending_mail()
    if started:
        metrics.ACTORS_LIVE.dec()
    if token:
        with trio.CancelScope(shield=True):
            await actor.leases.release(actor.id, token, lost=actor.lost)
    actor.mark_stopped()
    actor.retire()
    actor.checkpoints.detach()


async def load(actor: SessionActor, *, wait_for_storage: bool) -> SessionState:
    """Newest snapshot + journal after it. After a crash, wait out a storage outage with backoff."""
    delay = 0.1
    while True:
        try:
            with trio.fail_after(actor.config.storage_timeout_s):
                return await _load_once(actor)
        except (StorageError, trio.TooSlowError) as exc:
            if not wait_for_storage:
                raise StorageUnavailable(str(exc) or "storage timed out") from exc
            actor.log.warning("storage unavailable while reloading; retrying", delay_s=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, STORAGE_RETRY_MAX_S)


async def _load_once(actor: SessionActor) -> SessionState:
    from actors.session_actor import SessionNotFound

    storage = actor.storage
    record = await storage.sessions.get_session(actor.id)
    if record is None or record.status == "ended":
        raise SessionNotFound(actor.id)
    snapshot = await storage.snapshots.load_snapshot(actor.id)
    journal = await storage.journal.read_after(actor.id, snapshot.version if snapshot else 0)
    state = SessionState.restore(
        record,
        snapshot,
        journal,
        replay_window=actor.config.replay_window,
        max_state_bytes=actor.config.max_state_bytes,
        epoch=actor.checkpoints.token,
    )
    if state.journal_gap is not None:
        metrics.JOURNAL_GAPS.inc()
        actor.log.error(
            "journal has a gap: restored up to the gap",
            at_version=state.journal_gap[0],
            next_in_journal=state.journal_gap[1],
        )
    holds_volatile = getattr(storage.snapshots, "holds_volatile", None)
    if holds_volatile is not None and holds_volatile(actor.id):
        actor.checkpoints.mark_behind()  # a handoff only this process's memory holds: the durable tier catches up
    for device, kind in actor.kinds.items():
        state.join(device, kind, None, time.time())
    state.take_effects()  # a restart re-registers devices silently; resync_all sends the welcomes
    return state
