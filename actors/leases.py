"""The session leases this pod holds: taking them, renewing them in batches, and letting go (DESIGN §6).

A lease is the right to own a session; each grant carries a fencing token that only grows (the session's
epoch), and every write of the session carries it, so storage refuses a pod that lost its lease. This keeper
renews every held lease in one batch every `ttl/3`. If renewals fail (Redis away, the pod frozen), it stops each
actor before its lease can expire at Redis: an actor is only trusted until `last renewal sent + ttl - margin`,
measured on this pod's monotonic clock from the moment the renewal was *sent* (Redis started the TTL later).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from actors import metrics
from actors.messages import ActorUnavailable, NotOwner
from storage.ports import LeaseHeld, Leases, SessionStore, StorageError

log = structlog.get_logger("sessiond.leases")

ACQUIRE_RETRY_S = 0.05
FENCE_ROUNDS = 3


@dataclass(slots=True)
class _Held:
    token: int
    on_lost: Callable[[], None]
    valid_until: float  # trio clock: past this the actor must have stopped


class LeaseKeeper:
    def __init__(self, leases: Leases, sessions: SessionStore, pod: str, ttl_s: float) -> None:
        self.leases = leases
        self.sessions = sessions
        self.pod = pod
        self.ttl_s = ttl_s
        self.margin_s = ttl_s / 6  # stop this long before the lease could expire at Redis
        self.acquire_wait_s = 2 * ttl_s  # a lease held elsewhere is waited for this long (a move in progress)
        self._held: dict[str, _Held] = {}
        self.is_mine: Callable[[str], bool] = lambda _session: True  # placement, set by the router
        self.renewals = 0
        self.lost = 0

    async def acquire(self, session_id: str) -> int:
        """A new token for the session, fenced into the session store too; waits while another pod still holds
        the lease (it is moving the session away), then gives up with ActorUnavailable."""
        floor = 0
        deadline = trio.current_time() + self.acquire_wait_s
        rounds = 0
        while True:
            try:
                token = await self.leases.acquire(session_id, self.pod, self.ttl_s, floor)
            except LeaseHeld as exc:
                if not self.is_mine(session_id):  # the view changed while we waited: the owner is elsewhere
                    raise NotOwner(f"the session is placed on another pod now (held by {exc.holder})") from exc
                if trio.current_time() >= deadline:
                    raise ActorUnavailable(f"the session is moving (held by {exc.holder}); retry") from exc
                await trio.sleep(ACQUIRE_RETRY_S)
                continue
            # The lease counter lives in Redis; the session store keeps the highest token it has seen. Raising
            # it now fences off the previous owner's late writes; a store ahead of us means the counter was
            # lost (Redis restarted empty): take a token above it.
            fence = await self.sessions.fence(session_id, token)
            if fence <= token:
                return token
            rounds += 1
            if rounds >= FENCE_ROUNDS:
                raise ActorUnavailable("could not take a fencing token above the stored one; retry")
            floor = fence

    def track(self, session_id: str, token: int, on_lost: Callable[[], None]) -> None:
        """Renew this lease from now on; `on_lost` is called (once) when it is gone or may be about to go."""
        self._held[session_id] = _Held(token, on_lost, trio.current_time() + self.ttl_s - self.margin_s)
        metrics.LEASES_HELD.set(len(self._held))

    def token_of(self, session_id: str) -> int | None:
        held = self._held.get(session_id)
        return held.token if held else None

    async def release(self, session_id: str, token: int, *, lost: bool = False) -> None:
        """Stop renewing and give the lease back, so the next owner need not wait for it to expire."""
        held = self._held.get(session_id)
        if held is not None and held.token == token:
            del self._held[session_id]
            metrics.LEASES_HELD.set(len(self._held))
        if lost:
            return
        try:
            with trio.move_on_after(self.ttl_s):
                await self.leases.release(session_id, self.pod, token)
        except StorageError as exc:  # it expires by itself
            log.warning("lease not released", session=session_id, error=str(exc))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every held lease every ttl/3; a watchdog of its own stops the actors whose lease cannot be
        vouched for, even while a renewal hangs."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog)
            task_status.started()
            interval = self.ttl_s / 3
            while True:
                await trio.sleep(interval)
                await self.renew_once()

    async def _watchdog(self) -> None:
        while True:
            now = trio.current_time()
            soonest = min((held.valid_until for held in self._held.values()), default=now + self.margin_s)
            await trio.sleep_until(max(soonest, now + self.margin_s / 4))
            self._expire_overdue()

    async def renew_once(self) -> None:
        if not self._held:
            return
        batch = {sid: held.token for sid, held in self._held.items()}
        sent_at = trio.current_time()
        try:
            with trio.fail_after(self.ttl_s - self.margin_s):
                gone = await self.leases.renew(batch, self.pod, self.ttl_s)
        except (StorageError, trio.TooSlowError) as exc:
            metrics.LEASE_RENEWALS.labels("error").inc(len(batch))
            log.warning("lease renewal failed", leases=len(batch), error=str(exc) or type(exc).__name__)
            self._expire_overdue()
            return
        self.renewals += 1
        valid_until = sent_at + self.ttl_s - self.margin_s
        for sid, token in batch.items():
            held = self._held.get(sid)
            if held is None or held.token != token:
                continue  # released (or re-taken) meanwhile
            if sid in gone:
                self._lose(sid, held, "taken over")
            else:
                held.valid_until = valid_until
        metrics.LEASE_RENEWALS.labels("ok").inc(len(batch) - len(gone))
        if gone:
            metrics.LEASE_RENEWALS.labels("lost").inc(len(gone))
        self._expire_overdue()

    def _expire_overdue(self) -> None:
        now = trio.current_time()
        for sid, held in list(self._held.items()):
            if now >= held.valid_until:
                self._lose(sid, held, "not renewed in time")

    def _lose(self, session_id: str, held: _Held, why: str) -> None:
        self._held.pop(session_id, None)
        metrics.LEASES_HELD.set(len(self._held))
        self.lost += 1
        log.warning("lease lost", session=session_id, token=held.token, why=why)
        held.on_lost()

    def statistics(self) -> dict[str, int]:
        return {"held": len(self._held), "renewal_rounds": self.renewals, "lost": self.lost}
