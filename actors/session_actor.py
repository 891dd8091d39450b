"""The async runtime of one session: the mailbox loop, its turns, and the effects they produce.

All decisions are made by `SessionState`; this module moves messages in and effects out. One turn = every
message already waiting (up to TURN_MAX): their changes are journaled in one write (group commit) before any ack
or patch of the turn leaves. Around it: `supervisor.py` (lease, load, restarts), `checkpoints.py` (snapshots),
`delivery.py` (who gets which frame).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
import trio

from actors import metrics
from actors.checkpoints import Checkpointer
from actors.config import ActorConfig
from actors.delivery import recipients
from actors.leases import LeaseKeeper
from actors.mailbox import Mailbox
from actors.messages import (
    ActorUnavailable,
    Attach,
    ChangeRequest,
    ClaimRequest,
    Crash,
    Describe,
    Detach,
    DeviceLink,
    End,
    LeaseLost,
    Message,
    Outgoing,
    Overloaded,
    Passivate,
    PauseRequest,
    Peek,
    Reply,
    RestChange,
    RestHandoff,
    Resync,
    SessionNotFound,
    Shutdown,
)
from actors.session import (
    REST_DEVICE,
    Accepted,
    Broadcast,
    Checkpoint,
    Close,
    Effect,
    Journal,
    Publish,
    Rejected,
    SessionState,
    Stop,
)
from protocol import codes
from protocol.codec import JSON_SUBPROTOCOL
from runtime.timers import Entry, TimerHeap
from storage.ports import Fenced, Storage, StorageError

__all__ = ["ActorConfig", "SessionActor", "SessionNotFound", "now_iso"]

TURN_MAX = 256
TICK_RETRY_S = 0.1
DORMANT_RETRY_S = 0.25  # a background write kept the actor awake: look again this much later
RATE_TAU_S = 5.0  # time constant of the changes/s average (admin view, hot-actor metrics)
RATE_MIN_DT_S = 0.05  # reads closer together than this reuse the last average

log = structlog.get_logger("sessiond.actor")


class _Tick:
    """The timer's nudge: time to look at checkpoints and passivation."""


_TICK: Any = _Tick()
_NO_DEVICES: frozenset[str] = frozenset()


class Unpersisted(Exception):
    """A turn's changes could not be stored: they were refused, and the actor reloads the stored state."""


class OwnershipLost(Exception):
    """The lease is gone or a write was fenced: another pod owns the session; stop without writing."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SessionActor:
    """Owns one session's state and its connected devices (on this pod or relayed from others)."""

    # Slots: a dict of ~40 attributes was 1.6 KiB of every actor's 6 KiB budget (issue 9).
    __slots__ = (
        "_alarms",
        "_dormant_bytes",
        "_has_stopped",
        "_host",
        "_inflight",
        "_joined_this_turn",
        "_last_activity",
        "_mail",
        "_on_retire",
        "_rate",
        "_rate_at",
        "_rate_count",
        "_rate_known",
        "_sleep_not_before",
        "_sleep_wanted",
        "_stopped",
        "_timer_armed",
        "changes",
        "checkpoints",
        "config",
        "degraded",
        "dormant",
        "failed",
        "handled",
        "id",
        "kinds",
        "leases",
        "links",
        "lost",
        "restart_budget",
        "started_at",
        "state",
        "stopping",
        "storage",
        "timer_entry",
    )

    def __init__(
        self,
        session_id: str,
        storage: Storage,
        config: ActorConfig,
        leases: LeaseKeeper,
        on_retire: Callable[[SessionActor], None],
        alarms: TimerHeap,
    ) -> None:
        self.id = session_id
        self.storage = storage
        self.config = config
        self.leases = leases
        self._on_retire = on_retire
        self._mail: Mailbox[Message] = Mailbox(config.mailbox_size)
        self.links: dict[str, DeviceLink] = {}
        self.kinds: dict[str, str] = {}
        self.state: SessionState | None = None
        self._stopped: trio.Event | None = None  # made when somebody waits for it (see `stopped`)
        self._has_stopped = False
        self.failed = False
        self.degraded = False  # storage is down: reloading; device requests are refused with `unavailable`
        self.stopping = False  # retired: takes no new messages (the registry activates a successor)
        self.lost = False  # the lease is gone: nothing more may be written
        self.handled = 0
        self.changes = 0  # accepted changes: a plain int on the hot path, averaged when read (change_rate)
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_count = 0
        self._rate_known = False
        self.started_at = time.time()
        self._last_activity = trio.current_time()
        # The checkpoint and passivation alarm: an entry in the registry's one timer heap, not a task per actor.
        self._alarms = alarms
        self.timer_entry: Entry | None = None  # our place in the heap (runtime/timers.py)
        self._timer_armed = False
        # Devices whose welcome is in this turn's effects; a shared empty frozenset until a turn attaches one.
        self._joined_this_turn: set[str] | frozenset[str] = _NO_DEVICES
        self._inflight: list[Reply] = []
        # Dormancy: an actor idle for `dormant_after_s` gives its task back (an idle actor's budget is 6 KiB,
        # and a task, its nursery and its frames are most of that); the next message starts a new one in `_host`.
        self.dormant = False
        self._host: trio.Nursery | None = None  # the nursery that hosts our task (the registry's)
        self._sleep_wanted = False  # the timer found us idle: go dormant once this turn is done
        self._sleep_not_before = 0.0
        self._dormant_bytes = 0
        self.restart_budget: Any = None  # the supervisor's RestartBudget, made at the first crash
        self.checkpoints = Checkpointer(session_id, storage, config, self.lease_lost)

    @property
    def log(self) -> Any:
        """Bound on use: a logger kept per actor was 0.4 KiB of an idle actor, and actors rarely log."""
        return log.bind(session=self.id)

    # ---- the outside's view (ActorRef) ---------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.id

    @property
    def gone(self) -> bool:
        return self.stopping or self._has_stopped

    @property
    def stopped(self) -> trio.Event:
        """Set once the actor's life is over. Made on first use: an Event per idle actor was 0.3 KiB, and only a
        lookup racing a retirement, a shutdown or a test waits for one."""
        event = self._stopped
        if event is None:
            event = self._stopped = trio.Event()
            if self._has_stopped:
                event.set()
        return event

    def mark_stopped(self) -> None:
        self._has_stopped = True
        if self._stopped is not None:
            self._stopped.set()

    @property
    def token(self) -> int:
        return self.checkpoints.token

    def tell(self, message: Message) -> None:
        if self.degraded and not isinstance(message, Detach | Shutdown | LeaseLost):
            raise ActorUnavailable("storage unavailable, retry shortly")
        try:
            self._post(message)
        except trio.WouldBlock:
            raise Overloaded(f"session {self.id} is busy") from None
        except trio.ClosedResourceError:
            raise ActorUnavailable(f"session {self.id} is stopping") from None

    def _post(self, message: Message) -> None:
        """Into the mailbox, waking a dormant actor (a new task in its host nursery)."""
        self._mail.put_nowait(message)
        if self.dormant:
            host = self._host
            assert host is not None
            try:
                host.start_soon(self._resume)
            except RuntimeError:  # the registry stopped hosting actors: its teardown answers the mail
                return
            self.dormant = False

    async def _resume(self) -> None:
        from actors.supervisor import supervise

        await supervise(self, resumed=True)

    def fall_asleep(self) -> bool:
        """The serving loop asked to go dormant and has unwound: give the task back unless mail came meanwhile.
        Synchronous on purpose: nothing can slip in between the check and the flag."""
        if len(self._mail) or self.gone:
            return False
        self._dormant_bytes = self.budget_bytes
        self.dormant = True
        self._host = trio.lowlevel.current_task().parent_nursery
        self._mail.shrink()
        self._rearm()  # checkpoint and passivation still come, through the timer heap
        return True

    async def ask(self, message: Any, timeout_s: float = 10.0) -> Any:
        self.tell(message)
        return await message.reply.wait(timeout_s)

    def lease_lost(self) -> None:
        """Called by the lease keeper (or a fenced write): stop before anything else is written."""
        if self.lost or self._has_stopped:
            return
        self.lost = True
        # A full mailbox: the next turn sees `lost` first.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._post(LeaseLost())

    def change_rate(self, now: float | None = None) -> float:
        """Changes per second, an exponentially weighted average (time constant RATE_TAU_S) brought up to date
        whenever someone reads it (scrape, admin view): the hot path only bumps `changes`. Exact for a steady
        rate whatever the reading pattern, so several readers (Prometheus, `sessiond top`) do not disturb it."""
        now = time.monotonic() if now is None else now
        dt = now - self._rate_at
        if not self._rate_known and 0 < dt < RATE_MIN_DT_S:
            return self.changes / dt  # a young actor: the average so far, not yet kept (a 0 here hid a busy actor)
        if dt >= RATE_MIN_DT_S:
            recent = (self.changes - self._rate_count) / dt
            if self._rate_known:
                weight = math.exp(-dt / RATE_TAU_S)
                self._rate = weight * self._rate + (1.0 - weight) * recent
            else:  # the first reading: the average since activation
                self._rate = recent
                self._rate_known = True
            self._rate_at = now
            self._rate_count = self.changes
        return self._rate

    @property
    def state_bytes(self) -> int:
        """Estimated memory of the live state (state, replay window, remembered op-id answers)."""
        state = self.state
        return state.approx_bytes + state.replay_bytes + state.acked_bytes if state is not None else 0

    @property
    def budget_bytes(self) -> int:
        """What the memory budget counts for this actor: its state and replay window, a volatile handoff snapshot,
        and the frames queued for its devices on this pod (read once per budget check, not per frame). A dormant
        actor changes nothing: its figure from when it fell asleep is used (the registry reads this for every
        actor every second)."""
        if self.dormant:
            return self._dormant_bytes
        total = self.state_bytes
        if self.state is not None:
            total += self.checkpoints.held_bytes(self.state)  # a handoff's snapshot in a volatile fast tier
        for link in self.links.values():  # a loop, not sum(generator): this runs for every actor every second
            total += link.queued_bytes
        return total

    def hot_row(self, now: float) -> metrics.HotRow:
        return metrics.HotRow(
            self.id, self.change_rate(now), len(self.links), len(self._mail),
            self.state_bytes,
        )

    def statistics(self) -> dict[str, Any]:
        state = self.state
        return {
            "session": self.id,
            "owner": state.owner if state else None,
            "devices": sorted(self.links),
            "remote_devices": sum(1 for link in self.links.values() if getattr(link, "remote", False)),
            "active": state.active if state else None,
            "version": state.version if state else None,
            "epoch": self.token,
            "mailbox_depth": len(self._mail),
            "dormant": self.dormant,
            "messages_handled": self.handled,
            "messages_per_s": round(self.handled / max(time.time() - self.started_at, 1e-3), 2),
            "changes": self.changes,
            "changes_per_s": round(self.change_rate(), 2),
            "state_bytes": self.state_bytes,
            "last_checkpoint_at": self.checkpoints.last_checkpoint_at,
            "failed": self.failed,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the lease, load, serve, restart after a crash (actors/supervisor.py)."""
        from actors.supervisor import supervise

        await supervise(self, task_status=task_status)

    # ---- the loop -----------------------------------------------------------------------------

    async def serve(self) -> bool:
        """The mailbox loop; background checkpoint writes run in its nursery. No cancel scope per message on the
        hot path, no timer task: the alarm is an entry in the registry's timer heap. True when the actor wants
        to go dormant (the supervisor then calls `fall_asleep`), False when it stopped."""
        sleepy = False
        try:
            async with trio.open_nursery() as nursery:
                self.checkpoints.tasks = nursery
                self._rearm()
                sleepy = await self._serve_mailbox(nursery)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # strict nurseries wrap the serving task's error: unwrap it
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            if not sleepy:
                TimerHeap.cancel(self)
            self.checkpoints.stopped_serving()
        return sleepy

    async def _serve_mailbox(self, nursery: trio.Nursery) -> bool:
        """Turns until the actor stops (False) or may go dormant (True: idle, no mail, no background write)."""
        while True:
            message = await self._mail.get()
            batch: list[Message] = [message]
            while len(batch) < TURN_MAX:
                try:
                    batch.append(self._mail.get_nowait())
                except trio.WouldBlock:
                    break
            if message is not _TICK or any(m is not _TICK for m in batch):  # ticks are no activity
                self._last_activity = trio.current_time()
            if await self._turn(batch):
                return False
            if self._sleep_wanted:
                self._sleep_wanted = False
                if not len(self._mail) and not nursery.child_tasks:
                    return True
                self._sleep_not_before = trio.current_time() + DORMANT_RETRY_S
                self._rearm()

    def _next_due(self) -> float:
        """When the timer should look again: passivation, the periodic checkpoint once state changed, and while
        the actor has a task, dormancy."""
        assert self.state is not None
        due = self._last_activity + self.config.passivate_after_s
        self._timer_armed = self.checkpoints.dirty(self.state)
        if self._timer_armed:
            due = min(due, self.checkpoints.last_clock + self.checkpoints.period_s)
        if not (self.dormant or self._sleep_wanted):
            due = min(due, max(self._last_activity + self.config.dormant_after_s, self._sleep_not_before))
        return due

    def _rearm(self) -> None:
        self._alarms.schedule(self, self._next_due())

    def expire(self, now: float) -> float:
        """The alarm (called by the timer heap): post a tick into the mailbox once a checkpoint or passivation
        may be due. The turn that handles the tick arms the next alarm."""
        if self.gone or self.state is None:
            return math.inf
        due = self._next_due()  # activity since the alarm was set moves passivation later
        if now < due:
            return due
        try:
            self._post(_TICK)
        except trio.WouldBlock:  # busy: the mailbox is full, look again shortly
            return now + TICK_RETRY_S
        except trio.ClosedResourceError:
            return math.inf
        return math.inf

    async def _on_timer(self) -> bool:
        """Periodic checkpoint, and passivation of an idle actor. True when the actor stops."""
        assert self.state is not None
        now = trio.current_time()
        if self.checkpoints.due(self.state, now):
            self.checkpoints.soon(self.state, "timer")
        idle = now - self._last_activity >= self.config.passivate_after_s
        if idle and await self._passivate("idle"):
            return True
        if idle:
            self._last_activity = now
        if now - self._last_activity >= self.config.dormant_after_s and now >= self._sleep_not_before:
            self._sleep_wanted = True  # checked once the turn is over (`_serve_mailbox`)
        return False

    async def _passivate(self, reason: str) -> bool:
        """Stop if no device is connected and nothing waits: final checkpoint first. True when stopped."""
        if self.links or len(self._mail):
            return False
        self.retire()
        assert self.state is not None
        await self.checkpoints.now(self.state, "passivate", force=True)
        metrics.PASSIVATIONS.labels(reason).inc()
        self.log.info("passivated", reason=reason)
        return True

    def retire(self) -> None:
        """From here on no message reaches us: `tell` fails fast and the registry hands out a successor."""
        self.stopping = True
        self._mail.close()
        self._on_retire(self)

    @property
    def idle_since(self) -> float:
        """trio clock of the last message handled (the registry evicts the least recently used)."""
        return self._last_activity

    async def _turn(self, batch: list[Message]) -> bool:
        """Handle a batch of messages as one turn; True when the actor stops."""
        state = self.state
        assert state is not None
        if self.lost:
            raise OwnershipLost("lease lost")
        wall = time.time()
        replies: list[tuple[Reply, Any]] = []
        shutdown: Shutdown | None = None
        passivate = False
        tick = False
        if self._joined_this_turn:
            self._joined_this_turn = _NO_DEVICES
        links = self.links
        for message in batch:
            self.handled += 1
            if isinstance(message, ChangeRequest):
                link = message.link
                if links.get(link.device) is link:
                    self._count(state.change(link.device, message.op_id, message.ops, message.base, wall, message.size))
            elif isinstance(message, Attach):
                self._attach(state, message, wall)
            elif isinstance(message, Detach):
                if links.get(message.link.device) is message.link:
                    del links[message.link.device]
                    self.kinds.pop(message.link.device, None)
                    state.leave(message.link.device, wall)
            elif isinstance(message, Resync):
                if links.get(message.link.device) is message.link:
                    state.resync(message.link.device)
            elif isinstance(message, PauseRequest):
                if links.get(message.link.device) is message.link:
                    self._count(state.pause(message.link.device, message.op_id, wall))
            elif isinstance(message, ClaimRequest):
                if links.get(message.link.device) is message.link:
                    self._count(state.claim(message.link.device, message.op_id, wall))
            elif isinstance(message, RestChange):
                self._inflight.append(message.reply)
                result = state.change(REST_DEVICE, message.key, message.ops, message.base, wall)
                replies.append((message.reply, self._count(result)))
            elif isinstance(message, RestHandoff):
                self._inflight.append(message.reply)
                replies.append((message.reply, self._count(state.claim(message.device, None, wall, message.key))))
            elif isinstance(message, Describe):
                self._inflight.append(message.reply)
                replies.append((message.reply, orjson.dumps(state.describe())))
            elif isinstance(message, Peek):
                replies.append((message.reply, (state.version, state.active, state.status)))
            elif isinstance(message, End):
                self._inflight.append(message.reply)
                state.end(wall)
                replies.append((message.reply, None))
            elif isinstance(message, Shutdown):
                self._inflight.append(message.reply)
                shutdown = message
                for later in batch[batch.index(message) + 1 :]:
                    reply = getattr(later, "reply", None)
                    if isinstance(reply, Reply):
                        reply.fail(ActorUnavailable("the session is moving or shutting down; retry"))
                break
            elif isinstance(message, LeaseLost):
                raise OwnershipLost("lease lost")
            elif message is _TICK:
                tick = True
            elif isinstance(message, Passivate):
                passivate = True
            elif isinstance(message, Crash):
                raise RuntimeError("crash requested")
        effects = state.take_effects()
        try:
            await self._persist(effects)
        except Fenced as exc:
            metrics.FENCED_WRITES.inc()
            raise OwnershipLost(str(exc)) from exc
        except (StorageError, trio.TooSlowError) as exc:
            self._refuse_unpersisted(batch)
            raise Unpersisted(str(exc)) from exc
        stop = self._dispatch(effects, wall)
        for reply, value in replies:
            reply.set(value)
        self._inflight.clear()
        if shutdown is not None:
            await self._stop_for(shutdown)
            return True
        if stop:
            return True
        if passivate and await self._passivate("memory"):
            return True
        self.checkpoints.by_policy(state)
        if tick:
            if await self._on_timer():
                return True
            self._rearm()
        elif not self._timer_armed and self.checkpoints.dirty(state):
            self._rearm()  # state just became dirty: the alarm must plan a checkpoint
        return False

    async def _stop_for(self, shutdown: Shutdown) -> None:
        """Shutdown or move: durable checkpoint, then devices go (they resume elsewhere); the lease is released
        by the supervisor once we are retired."""
        assert self.state is not None
        try:
            await self.checkpoints.now(self.state, "shutdown", force=True, raise_errors=True)
        except Fenced:
            pass  # somebody else owns it already: nothing of ours to save
        except (StorageError, trio.TooSlowError):
            pass  # logged by the checkpointer; the journal still holds every acked change
        for link in self.links.values():
            link.close(shutdown.local_code, shutdown.reason)
        shutdown.reply.set(None)
        self.retire()

    def _attach(self, state: SessionState, message: Attach, wall: float) -> None:
        device = message.link.device
        if device not in self.links and len(self.links) >= self.config.max_devices:
            limit = self.config.max_devices
            error = {"t": "error", "code": codes.E_FORBIDDEN, "message": f"quota: at most {limit} devices per session"}
            message.link.deliver(Outgoing(error))
            message.link.close(codes.FORBIDDEN, "too many devices")
            metrics.REJECTED.labels(codes.E_FORBIDDEN).inc()
            return
        old = self.links.get(device)
        if old is not None and old is not message.link:
            old.close(codes.REPLACED, "replaced by a newer connection of this device")
        self.links[device] = message.link
        self.kinds[device] = message.kind
        joined = self._joined_this_turn
        if not isinstance(joined, set):
            joined = self._joined_this_turn = set()
        joined.add(device)
        state.join(device, message.kind, message.resume, wall, message.resume_epoch)

    def _count(self, result: Accepted | Rejected) -> Accepted | Rejected:
        if isinstance(result, Rejected):
            metrics.REJECTED.labels(result.code).inc()
        return result

    # ---- effects ------------------------------------------------------------------------------

    async def _persist(self, effects: list[Effect]) -> bool:
        """Durable effects first: the journal batch (group commit), a handoff snapshot, and for an ended
        session its record, all before any frame of the turn leaves. True when the session ended."""
        changes = []
        syncs = []
        ending = False
        for effect in effects:  # one pass: this runs every turn
            if isinstance(effect, Journal):
                changes.append(effect.change)
            elif isinstance(effect, Checkpoint):
                syncs.append(effect)
            elif isinstance(effect, Stop):
                ending = True
        if changes:
            # Backends bound their own I/O (socket / command timeouts) and raise StorageUnavailable: no cancel
            # scope per turn here, it would cost more than a whole in-memory append.
            await self.storage.journal.append(self.id, changes, self.checkpoints.token)
            hot = metrics.HOT
            hot.changes += len(changes)
            hot.turns += 1
            self.changes += len(changes)
        state = self.state
        assert state is not None
        checkpoints = self.checkpoints
        for effect in syncs:
            if effect.sync:
                # A claim waits for the fast tier (Redis, or memory beside the in-process journal), unless the mode
                # wants it durable (postgres) or there is one tier. A pause waits for the durable tier (DESIGN §5),
                # but with the in-process journal: its acks wait for no database, so neither does a pause, and the
                # pause's durable snapshot (the same one) is written in the background at once.
                pause = effect.reason == "pause"
                durable = self.config.durable_handoffs or not checkpoints.tiered or (pause and not checkpoints.volatile)
                taken = await checkpoints.now(
                    state, effect.reason, durable=durable, force=True, raise_errors=True, trim_later=True
                )
                if pause and not durable:
                    checkpoints.soon(state, "pause", queue=True, taken=taken)
        if ending:
            await self._end_storage()
        return ending

    def _dispatch(self, effects: list[Effect], born: float = 0.0) -> bool:
        """Perform the turn's effects in order; `delivery.recipients` says which device gets which frame.
        `born`: when the turn accepted its changes (wall clock), for the delivery latency metric."""
        links = self.links
        stop = False
        for effect, devices in recipients(effects, links, self._joined_this_turn):
            if devices:
                out = Outgoing(effect.frame, born)  # type: ignore[union-attr]  # Send / Broadcast: those with devices
                if type(effect) is Broadcast and effect.json is not None:
                    out.encoded[JSON_SUBPROTOCOL] = effect.json  # the replay window's bytes: not encoded again
                for device in devices:
                    links[device].deliver(out)
            elif isinstance(effect, Close):
                if effect.device is None:
                    targets = list(links.values())
                else:
                    one = links.get(effect.device)
                    targets = [one] if one is not None else []
                for link in targets:
                    link.close(effect.code, effect.reason)
            elif isinstance(effect, Publish):
                self.storage.events.publish(effect.routing_key, self.event_body(effect.routing_key, effect.fields))
            elif isinstance(effect, Stop):
                stop = True
        return stop

    def resync_all(self) -> None:
        """After a restart every device gets a fresh full welcome (DESIGN §5.1)."""
        assert self.state is not None
        for device, link in self.links.items():
            link.deliver(Outgoing(self.state.welcome(device)))

    def event_body(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        owner = self.state.owner if self.state else None
        return {"type": kind, "session": self.id, "owner": owner, "at": now_iso(), **fields}

    async def _end_storage(self) -> None:
        """Mark the session ended (this must succeed, or the End is refused and retried by the caller), then
        drop its snapshots and journal, best effort: leftovers of an ended session are never read again."""
        assert self.state is not None
        with trio.fail_after(self.config.storage_timeout_s):
            await self.storage.sessions.update_session(self.state.record(), self.checkpoints.token)
        try:
            with trio.fail_after(self.config.storage_timeout_s):
                await self.storage.snapshots.delete_snapshots(self.id)
                await self.storage.journal.delete(self.id)
        except (StorageError, trio.TooSlowError) as exc:
            self.log.warning("ended session's data not deleted", error=str(exc) or type(exc).__name__)

    # ---- failure paths ------------------------------------------------------------------------

    def _refuse_unpersisted(self, batch: list[Message]) -> None:
        """Acks wait for storage; when it does not answer in time, every request of the turn gets `unavailable`."""
        metrics.REJECTED.labels(codes.UNAVAILABLE).inc(len(batch))
        for message in batch:
            if not isinstance(message, ChangeRequest | PauseRequest | ClaimRequest):
                continue
            if self.links.get(message.link.device) is message.link:
                error = {"t": "error", "id": message.op_id, "code": codes.UNAVAILABLE, "message": "storage unavailable"}
                message.link.deliver(Outgoing(error))
        self.fail_inflight(ActorUnavailable("storage unavailable, retry shortly"))

    def fail_inflight(self, error: BaseException) -> None:
        for reply in self._inflight:
            reply.fail(error)
        self._inflight.clear()

    def close_links(self, code: int, reason: str) -> None:
        for link in self.links.values():
            link.close(code, reason)

    def fail_pending_mail(self) -> None:
        """Answer asks still in the mailbox so no caller waits for its timeout."""
        self._mail.close()
        while True:
            try:
                message = self._mail.get_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            reply = getattr(message, "reply", None)
            if isinstance(reply, Reply):
                reply.fail(ActorUnavailable("the session stopped; retry"))
