"""The async runtime of one session: mailbox loop, effect execution, checkpoints, supervision.

All decisions are made by `SessionState`; this module only moves messages in and effects out.
One turn = every message already waiting (up to TURN_MAX): their changes are journaled in one
write (group commit) before any ack or patch of the turn leaves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
import trio

from actors import metrics
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
    Message,
    Outgoing,
    Overloaded,
    Passivate,
    PauseRequest,
    Reply,
    RestChange,
    RestHandoff,
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
    Send,
    SessionState,
    Stop,
)
from actors.supervisor import Directive, RestartBudget
from storage.ports import SessionRecord, Snapshot, Storage, StorageUnavailable, save_durable

TURN_MAX = 256
STORAGE_RETRY_MAX_S = 10.0
CLOSE_REPLACED = 4009  # a newer connection of the same device took over
CLOSE_INTERNAL = 1011

log = structlog.get_logger("sessiond.actor")


class SessionNotFound(LookupError):
    """No such session, or it has ended."""


class _Tick:
    """The timer's nudge: time to look at checkpoints and passivation."""


_TICK: Any = _Tick()
TICK_RETRY_S = 0.1


class _Unpersisted(Exception):
    """A turn's changes could not be stored: they were refused, and the actor reloads the stored state."""


@dataclass(frozen=True, slots=True)
class ActorConfig:
    """The actor-side slice of the settings (actors do not import api.settings)."""

    mailbox_size: int = 4096
    replay_window: int = 1000
    max_state_bytes: int = 1 << 20
    passivate_after_s: float = 300.0
    checkpoint_every_versions: int = 1000  # durable checkpoint (PostgreSQL / SQLite) every M versions ...
    checkpoint_every_s: float = 5.0  # ... or T seconds when changed
    fast_snapshot_every_versions: int | None = None  # tiered stores (Redis): a fast snapshot every N versions
    max_restarts: int = 10
    restart_window_s: float = 60.0
    storage_timeout_s: float = 5.0
    memory_budget_bytes: int = 512 << 20  # state bytes of all live actors; idle ones beyond it are passivated


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SessionActor:
    """Owns one session's state and its connected devices."""

    def __init__(
        self,
        session_id: str,
        storage: Storage,
        config: ActorConfig,
        on_retire: Callable[[SessionActor], None],
    ) -> None:
        self.id = session_id
        self.storage = storage
        self.config = config
        self._on_retire = on_retire
        self._send, self._recv = trio.open_memory_channel[Message](config.mailbox_size)
        self.links: dict[str, DeviceLink] = {}
        self.kinds: dict[str, str] = {}
        self.state: SessionState | None = None
        self.stopped = trio.Event()
        self.failed = False
        self.degraded = False  # storage is down: reloading; device requests are refused with `unavailable`
        self.stopping = False  # retired: takes no new messages (the registry activates a successor)
        self.handled = 0
        self.started_at = time.time()
        self.last_checkpoint_at: float | None = None
        self._last_activity = trio.current_time()
        self._last_checkpoint_clock = trio.current_time()
        self._fast_version = 0
        self._timer_wake = trio.Event()
        self._timer_armed = False
        # Each actor's own period (±10 %): sessions started together must not all checkpoint in the same instant.
        self._checkpoint_period = config.checkpoint_every_s * random.uniform(0.9, 1.1)
        self._joined_this_turn: set[str] = set()  # devices whose welcome is in this turn's effects
        self._tasks: trio.Nursery | None = None  # background checkpoint writes and the timer live here
        self._checkpoint_busy: trio.Event | None = None  # set while a background checkpoint is being written
        self._inflight: list[Reply] = []
        self._log = log.bind(session=session_id)

    # ---- the outside's view ---------------------------------------------------------------------

    def tell(self, message: Message) -> None:
        if self.degraded and not isinstance(message, Detach | Shutdown):
            raise ActorUnavailable("storage unavailable, retry shortly")
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise Overloaded(f"session {self.id} is busy") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorUnavailable(f"session {self.id} is stopping") from None

    async def ask(self, message: Any, timeout_s: float = 10.0) -> Any:
        self.tell(message)
        return await message.reply.wait(timeout_s)

    def statistics(self) -> dict[str, Any]:
        state = self.state
        return {
            "session": self.id,
            "devices": sorted(self.links),
            "active": state.active if state else None,
            "version": state.version if state else None,
            "mailbox_depth": self._recv.statistics().current_buffer_used,
            "messages_handled": self.handled,
            "messages_per_s": round(self.handled / max(time.time() - self.started_at, 1e-3), 2),
            "last_checkpoint_at": self.last_checkpoint_at,
            "failed": self.failed,
        }

    # ---- supervision --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, serve, and restart after a crash within the restart budget (DESIGN §5.4)."""
        budget = RestartBudget(self.config.max_restarts, self.config.restart_window_s)
        started = False
        try:
            while True:
                try:
                    self.state = await self._load(wait_for_storage=started)
                    self.degraded = False
                    if not started:
                        metrics.ACTIVATIONS.inc()
                        metrics.ACTORS_LIVE.inc()
                        started = True
                        task_status.started()
                    else:
                        self._resync_all()
                    await self._serve()
                    return
                except SessionNotFound:
                    if not started:
                        raise
                    for link in self.links.values():  # ended (or deleted) while we were reloading
                        link.close(4004, "session not found")
                    return
                except _Unpersisted as exc:
                    # Not a crash: storage is away. Reload what is stored once it is back; no restart budget spent.
                    self.degraded = True
                    self._log.warning("storage unavailable: changes refused, reloading", error=str(exc.__cause__))
                    continue
                except Exception as exc:
                    if not started:
                        raise
                    self._fail_inflight(ActorUnavailable("the session restarted; retry"))
                    metrics.CRASHES.inc()
                    self._log.error("actor crashed", exc_info=exc)
                    self.storage.events.publish(
                        "actor.crashed", self._event_body("actor.crashed", {"error": type(exc).__name__})
                    )
                    if budget.decide(trio.current_time()) is Directive.STOP:
                        metrics.FAILED.inc()
                        self.failed = True
                        self._log.error("session failed: restart budget spent", restarts=budget.recent)
                        for link in self.links.values():
                            link.close(CLOSE_INTERNAL, "session failed")
                        return
        finally:
            self._send.close()
            self._fail_pending_mail()
            if started:
                metrics.ACTORS_LIVE.dec()
            self.stopped.set()
            self._on_retire(self)

    async def _load(self, *, wait_for_storage: bool) -> SessionState:
        """Newest snapshot + journal after it. After a crash, wait out a storage outage with backoff."""
        delay = 0.1
        while True:
            try:
                with trio.fail_after(self.config.storage_timeout_s):
                    return await self._load_once()
            except (StorageUnavailable, trio.TooSlowError) as exc:
                if not wait_for_storage:
                    raise StorageUnavailable(str(exc) or "storage timed out") from exc
                self._log.warning("storage unavailable while reloading; retrying", delay_s=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_MAX_S)

    async def _load_once(self) -> SessionState:
        record = await self.storage.sessions.get_session(self.id)
        if record is None or record.status == "ended":
            raise SessionNotFound(self.id)
        snapshot = await self.storage.snapshots.load_snapshot(self.id)
        journal = await self.storage.journal.read_after(self.id, snapshot.version if snapshot else 0)
        state = SessionState.restore(
            record,
            snapshot,
            journal,
            replay_window=self.config.replay_window,
            max_state_bytes=self.config.max_state_bytes,
        )
        if state.journal_gap is not None:
            metrics.JOURNAL_GAPS.inc()
            self._log.error("journal has a gap: restored up to the gap", at_version=state.journal_gap[0],
                            next_in_journal=state.journal_gap[1])
        for device, kind in self.kinds.items():
            state.join(device, kind, None, time.time())
        state.take_effects()  # a restart re-registers devices silently; _resync_all sends the welcomes
        return state

    def _resync_all(self) -> None:
        """After a restart every device gets a fresh full welcome (DESIGN §5.1)."""
        assert self.state is not None
        for device, link in self.links.items():
            link.resync(Outgoing(self.state.welcome(device)))

    # ---- the loop -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        """The mailbox loop, with a companion timer task: no cancel scope per message on the hot path."""
        try:
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                nursery.start_soon(self._timer)
                await self._serve_mailbox()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # strict nurseries wrap the serving task's error: unwrap it
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._tasks = None
            self._checkpoint_busy = None

    async def _serve_mailbox(self) -> None:
        while True:
            message = await self._recv.receive()
            batch: list[Message] = [message]
            while len(batch) < TURN_MAX:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            if message is not _TICK or len(batch) > 1:
                self._last_activity = trio.current_time()
            if await self._turn(batch):
                return

    def _next_due(self) -> float:
        """When the timer should look again: passivation, or the periodic checkpoint once state changed."""
        assert self.state is not None
        due = self._last_activity + self.config.passivate_after_s
        self._timer_armed = self.state.version != self.state.checkpointed_version
        if self._timer_armed:
            due = min(due, self._last_checkpoint_clock + self._checkpoint_period)
        return due

    async def _timer(self) -> None:
        """Posts a tick into the mailbox when a checkpoint or passivation may be due."""
        while True:
            due = self._next_due()
            if trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._timer_wake.wait()
                self._timer_wake = trio.Event()
                continue
            try:
                self._send.send_nowait(_TICK)
            except trio.WouldBlock:  # busy: the mailbox is full, look again shortly
                await trio.sleep(TICK_RETRY_S)
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            await self._timer_wake.wait()  # set once the tick was handled
            self._timer_wake = trio.Event()

    async def _on_timer(self) -> bool:
        """Periodic checkpoint, and passivation of an idle actor. True when the actor stops."""
        assert self.state is not None
        now = trio.current_time()
        if self.state.version != self.state.checkpointed_version and (
            now - self._last_checkpoint_clock >= self._checkpoint_period
        ):
            self._checkpoint_soon("timer")
        idle = now - self._last_activity >= self.config.passivate_after_s
        if idle and await self._passivate("idle"):
            return True
        if idle:
            self._last_activity = now
        return False

    async def _passivate(self, reason: str) -> bool:
        """Stop if no device is connected and nothing waits: final checkpoint first. True when stopped."""
        if self.links or self._recv.statistics().current_buffer_used:
            return False
        self._retire()
        await self._checkpoint("passivate", force=True)
        metrics.PASSIVATIONS.labels(reason).inc()
        self._log.info("passivated", reason=reason)
        return True

    def _retire(self) -> None:
        """From here on no message reaches us: `tell` fails fast and the registry hands out a successor."""
        self.stopping = True
        self._send.close()
        self._on_retire(self)

    @property
    def idle_since(self) -> float:
        """trio clock of the last message handled (the registry evicts the least recently used)."""
        return self._last_activity

    async def _turn(self, batch: list[Message]) -> bool:
        state = self.state
        assert state is not None
        wall = time.time()
        replies: list[tuple[Reply, Any]] = []
        stop = False
        shutdown: Shutdown | None = None
        passivate = False
        tick = False
        self._joined_this_turn.clear()
        for message in batch:
            self.handled += 1
            if isinstance(message, ChangeRequest):
                if self.links.get(message.link.device) is message.link:
                    link = message.link
                    self._count(state.change(link.device, message.op_id, message.ops, message.base, wall, message.size))
            elif isinstance(message, Attach):
                self._attach(state, message, wall)
            elif isinstance(message, Detach):
                if self.links.get(message.link.device) is message.link:
                    del self.links[message.link.device]
                    self.kinds.pop(message.link.device, None)
                    state.leave(message.link.device, wall)
            elif isinstance(message, PauseRequest):
                if self.links.get(message.link.device) is message.link:
                    self._count(state.pause(message.link.device, message.op_id, wall))
            elif isinstance(message, ClaimRequest):
                if self.links.get(message.link.device) is message.link:
                    self._count(state.claim(message.link.device, message.op_id, wall))
            elif isinstance(message, RestChange):
                self._inflight.append(message.reply)
                result = state.change(REST_DEVICE, None, message.ops, message.base, wall)
                replies.append((message.reply, self._count(result)))
            elif isinstance(message, RestHandoff):
                self._inflight.append(message.reply)
                replies.append((message.reply, self._count(state.claim(message.device, None, wall))))
            elif isinstance(message, Describe):
                self._inflight.append(message.reply)
                replies.append((message.reply, orjson.dumps(state.describe())))
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
                        reply.fail(ActorUnavailable("server shutting down"))
                break
            elif message is _TICK:
                tick = True
            elif isinstance(message, Passivate):
                passivate = True
            elif isinstance(message, Crash):
                raise RuntimeError("crash requested")
        effects = state.take_effects()
        try:
            await self._persist(effects)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            self._refuse_unpersisted(batch)
            raise _Unpersisted(str(exc)) from exc
        stop = self._dispatch(effects)
        for reply, value in replies:
            reply.set(value)
        self._inflight.clear()
        if shutdown is not None:
            await self._checkpoint("shutdown", force=True)
            for link in self.links.values():
                link.close(1001, "server shutting down")
            shutdown.reply.set(None)
            self._retire()
            return True
        if stop:
            return True
        if passivate and await self._passivate("memory"):
            return True
        self._checkpoint_by_policy()
        if tick:
            if await self._on_timer():
                return True
            self._timer_wake.set()
        elif not self._timer_armed and state.version != state.checkpointed_version:
            self._timer_wake.set()  # state just became dirty: the timer must plan a checkpoint
        return False

    def _attach(self, state: SessionState, message: Attach, wall: float) -> None:
        device = message.link.device
        old = self.links.get(device)
        if old is not None and old is not message.link:
            old.close(CLOSE_REPLACED, "replaced by a newer connection of this device")
        self.links[device] = message.link
        self.kinds[device] = message.kind
        self._joined_this_turn.add(device)
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
            await self.storage.journal.append(self.id, changes)  # backends time themselves (storage metrics)
            hot = metrics.HOT
            hot.changes += len(changes)
            hot.turns += 1
        for effect in syncs:
            if effect.sync:
                # Redis on every handoff; the durable tier too on pause (DESIGN §5), or when it is the only one.
                durable = effect.reason == "pause" or self.config.fast_snapshot_every_versions is None
                await self._checkpoint(effect.reason, durable=durable, force=True, raise_errors=True)
        if ending:
            await self._end_storage()
        return ending

    def _dispatch(self, effects: list[Effect]) -> bool:
        """Perform the turn's effects in order.

        Two per-turn rules keep every device's stream gap- and duplicate-free: a device that joined in
        this turn receives nothing before its welcome (which already holds earlier changes), and a device
        resynced by an overflow receives no frame of a version its fresh welcome already covers.
        """
        state = self.state
        assert state is not None
        stop = False
        awaiting_welcome = self._joined_this_turn
        resynced: dict[str, int] = {}
        for effect in effects:
            if isinstance(effect, Broadcast):
                out = Outgoing(effect.frame)
                if not awaiting_welcome and not resynced:  # the hot path
                    exclude = effect.exclude
                    for device, link in self.links.items():
                        if device != exclude and not link.deliver(out):
                            self._overflow(link, resynced)
                    continue
                version = effect.frame.get("version")
                for device, link in self.links.items():
                    if device == effect.exclude or device in awaiting_welcome:
                        continue
                    if version is not None and resynced.get(device, -1) >= version:
                        continue
                    self._deliver(link, out, resynced)
            elif isinstance(effect, Send):
                target = self.links.get(effect.device)
                if target is not None:
                    self._deliver(target, Outgoing(effect.frame), resynced)
                if effect.frame.get("t") == "welcome":
                    awaiting_welcome.discard(effect.device)
            elif isinstance(effect, Close):
                if effect.device is None:
                    targets = list(self.links.values())
                else:
                    one = self.links.get(effect.device)
                    targets = [one] if one is not None else []
                for link in targets:
                    link.close(effect.code, effect.reason)
            elif isinstance(effect, Publish):
                self.storage.events.publish(effect.routing_key, self._event_body(effect.routing_key, effect.fields))
            elif isinstance(effect, Stop):
                stop = True
        return stop

    def _deliver(self, link: DeviceLink, out: Outgoing, resynced: dict[str, int]) -> None:
        """Queue for one device; an overflow becomes one fresh welcome, a second one a disconnect (§5.5)."""
        if not link.deliver(out):
            self._overflow(link, resynced)

    def _overflow(self, link: DeviceLink, resynced: dict[str, int]) -> None:
        if link.resyncing:
            metrics.SLOW_CONSUMERS.labels("disconnect").inc()
            link.close(4008, "slow_consumer")
        else:
            metrics.SLOW_CONSUMERS.labels("resync").inc()
            assert self.state is not None
            link.resync(Outgoing(self.state.welcome(link.device)))
            resynced[link.device] = self.state.version

    def _event_body(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        owner = self.state.owner if self.state else None
        return {"type": kind, "session": self.id, "owner": owner, "at": now_iso(), **fields}

    async def _checkpoint(
        self, reason: str, *, durable: bool = True, force: bool = False, raise_errors: bool = False
    ) -> None:
        """Checkpoint now, awaited: handoff (its frame must not go out first), passivation, shutdown."""
        if self._checkpoint_busy is not None:
            await self._checkpoint_busy.wait()  # never two writes of one session at once
        taken = self._take_checkpoint(durable, force)
        if taken is not None:
            await self._write_checkpoint(*taken, durable=durable, reason=reason, raise_errors=raise_errors)

    def _checkpoint_soon(self, reason: str, *, durable: bool = True) -> None:
        """Periodic checkpoints: the snapshot is taken now, written by a background task while the actor
        goes on serving (a slow disk or database must not stall acks); at most one in flight."""
        if self._checkpoint_busy is not None or self._tasks is None:
            return
        taken = self._take_checkpoint(durable, force=False)
        if taken is None:
            return
        done = self._checkpoint_busy = trio.Event()

        async def write() -> None:
            try:
                await self._write_checkpoint(*taken, durable=durable, reason=reason, raise_errors=False)
            finally:
                self._checkpoint_busy = None
                done.set()

        self._tasks.start_soon(write)

    def _take_checkpoint(self, durable: bool, force: bool) -> tuple[Snapshot, SessionRecord] | None:
        state = self.state
        assert state is not None
        done = state.checkpointed_version if durable else self._fast_version
        if not force and state.version == done:
            return None
        if durable:
            self._last_checkpoint_clock = trio.current_time()  # the attempt: a failure is retried a period later
        return state.snapshot(), state.record()

    async def _write_checkpoint(
        self, snapshot: Snapshot, record: SessionRecord, *, durable: bool, reason: str, raise_errors: bool
    ) -> None:
        """Snapshot (durable tier, or the fast Redis tier), then trim the journal it covers."""
        started = time.perf_counter()
        try:
            with trio.fail_after(self.config.storage_timeout_s):
                if durable:
                    await save_durable(self.storage.snapshots, snapshot)
                    await self.storage.sessions.update_session(record)
                else:
                    await self.storage.snapshots.save_snapshot(snapshot)
                await self.storage.journal.trim(self.id, snapshot.version)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            metrics.CHECKPOINT_FAILURES.inc()
            self._log.warning("checkpoint failed", reason=reason, error=str(exc) or type(exc).__name__)
            if raise_errors:
                raise
            return
        metrics.CHECKPOINT_SECONDS.labels("durable" if durable else "fast").observe(time.perf_counter() - started)
        self._fast_version = max(self._fast_version, snapshot.version)
        if durable:
            assert self.state is not None
            self.state.checkpointed_version = max(self.state.checkpointed_version, snapshot.version)
            self.last_checkpoint_at = time.time()

    def _checkpoint_by_policy(self) -> None:
        """Fast snapshot every N versions (tiered stores), durable checkpoint every M versions."""
        state = self.state
        assert state is not None
        if state.version - state.checkpointed_version >= self.config.checkpoint_every_versions:
            self._checkpoint_soon("versions")
        every = self.config.fast_snapshot_every_versions
        if every is not None and state.version - self._fast_version >= every:
            self._checkpoint_soon("versions", durable=False)

    async def _end_storage(self) -> None:
        """Mark the session ended (this must succeed, or the End is refused and retried by the caller), then
        drop its snapshots and journal, best effort: leftovers of an ended session are never read again."""
        assert self.state is not None
        with trio.fail_after(self.config.storage_timeout_s):
            await self.storage.sessions.update_session(self.state.record())
        try:
            with trio.fail_after(self.config.storage_timeout_s):
                await self.storage.snapshots.delete_snapshots(self.id)
                await self.storage.journal.delete(self.id)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            self._log.warning("ended session's data not deleted", error=str(exc) or type(exc).__name__)

    # ---- failure paths ------------------------------------------------------------------------

    def _refuse_unpersisted(self, batch: list[Message]) -> None:
        """Acks wait for storage; when it does not answer in time, every request of the turn gets `unavailable`."""
        metrics.REJECTED.labels("unavailable").inc(len(batch))
        for message in batch:
            if not isinstance(message, ChangeRequest | PauseRequest | ClaimRequest):
                continue
            if self.links.get(message.link.device) is message.link:
                error = {"t": "error", "id": message.op_id, "code": "unavailable", "message": "storage unavailable"}
                message.link.deliver(Outgoing(error))
        self._fail_inflight(ActorUnavailable("storage unavailable, retry shortly"))

    def _fail_inflight(self, error: BaseException) -> None:
        for reply in self._inflight:
            reply.fail(error)
        self._inflight.clear()

    def _fail_pending_mail(self) -> None:
        """Answer asks still in the mailbox so no caller waits for its timeout."""
        while True:
            try:
                message = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            reply = getattr(message, "reply", None)
            if isinstance(reply, Reply):
                reply.fail(ActorUnavailable("the session stopped"))
