"""The router: which pod owns each session, and how transport and api reach its actor from any pod (DESIGN §6).

Every pod heart-beats into the membership list and reads it back; the owner of a session is the rendezvous-hash
winner among the live pods that are not draining. A session placed here is activated by the registry (which
takes its lease first); one placed elsewhere is reached through the relay. When the view changes, sessions placed
elsewhere now are handed over (checkpoint, release, devices told to reconnect), and links to pods that left are
cut. Views of different pods may disagree for a heartbeat: an owner that does not place a session on itself
answers `not_owner` and the asker tries again, while the lease keeps a single writer meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import trio

from actors import metrics, placement
from actors.leases import LeaseKeeper
from actors.messages import (
    ActorRef,
    ActorUnavailable,
    AskMessage,
    Attach,
    Describe,
    DeviceLink,
    End,
    NotOwner,
    RestChange,
    RestHandoff,
)
from actors.registry import Registry
from actors.relay import result_from_wire
from actors.remote import Relay, local_peek
from storage.ports import Member, Storage, StorageError

log = structlog.get_logger("sessiond.router")

RETRY_DELAY_S = 0.1
SWEEP_EVERY_BEATS = 8
PEEK_TIMEOUT_S = 2.0


class ClusterConflict(RuntimeError):
    """This pod cannot share the cluster it found (an embedded store on one side): it must not serve."""


class Router:
    def __init__(
        self,
        pod: str,
        registry: Registry,
        storage: Storage,
        leases: LeaseKeeper,
        *,
        ttl_s: float = 3.0,
        ask_timeout_s: float = 10.0,
    ) -> None:
        assert storage.membership is not None and storage.pubsub is not None
        self.pod = pod
        self.registry = registry
        self.storage = storage
        self.leases = leases
        self.ttl_s = ttl_s
        self.ask_timeout_s = ask_timeout_s
        # A device's attach may wait for the lease of a session that is moving here (LeaseKeeper.acquire_wait_s).
        self.attach_timeout_s = leases.acquire_wait_s + 2.0
        self.retry_for_s = 2 * ttl_s  # how long a `not_owner` answer is retried (views converge within a heartbeat)
        self.started_at = time.time()
        self.members: dict[str, Member] = {pod: Member(pod, shareable=storage.shareable, started_at=self.started_at)}
        self._placed: list[str] = [pod]
        self.leaving = False
        self.conflict: str | None = None
        self.last_heartbeat: float | None = None  # trio clock of the last heartbeat Redis confirmed
        self.relay = Relay(pod, storage.pubsub, registry, self.is_mine)
        leases.is_mine = self.is_mine  # an activation waiting for a lease gives up once the session moves on
        self.moves_out = 0

    # ---- placement ----------------------------------------------------------------------------------

    def owner(self, session_id: str) -> str:
        return placement.owner(session_id, self._placed) or self.pod

    def is_mine(self, session_id: str) -> bool:
        return self.owner(session_id) == self.pod

    def _me(self) -> Member:
        return Member(self.pod, leaving=self.leaving, shareable=self.storage.shareable, started_at=self.started_at)

    # ---- running --------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster (refusing a conflicting one), then keep heart-beating, renewing and relaying."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.leases.run)
            await nursery.start(self.relay.run)  # subscribed before anyone can place a session here
            await self.heartbeat()
            if self.conflict is not None:
                # A pod killed a moment ago (this one's previous life, say) stays listed until its TTL runs out:
                # only a conflict that outlives it is real.
                log.warning("cluster conflict; waiting one TTL before refusing", problem=self.conflict)
                await trio.sleep(self.ttl_s + self.ttl_s / 4)
                await self.heartbeat()
            if self.conflict is not None:
                await self._leave_quietly()
                raise ClusterConflict(self.conflict)
            nursery.start_soon(self._heartbeats)
            task_status.started()

    async def _heartbeats(self) -> None:
        interval = self.ttl_s / 4
        beats = 0
        while True:
            await trio.sleep(interval)
            await self.heartbeat()
            beats += 1
            if beats % SWEEP_EVERY_BEATS == 0 and not self.registry.closing:
                # Moves happen when the view changes; this sweep catches an activation that raced one.
                self.moves_out += self.registry.move_out(self.is_mine)

    async def heartbeat(self) -> None:
        assert self.storage.membership is not None
        try:
            with trio.fail_after(self.ttl_s):
                members = await self.storage.membership.heartbeat(self._me(), self.ttl_s)
        except (StorageError, trio.TooSlowError) as exc:
            log.warning("membership heartbeat failed", error=str(exc) or type(exc).__name__)
            return
        self.last_heartbeat = trio.current_time()
        self.apply_view(members)

    def apply_view(self, members: list[Member]) -> None:
        view = {m.pod: m for m in members}
        view.setdefault(self.pod, self._me())
        self.conflict = _conflict(self.pod, self.storage.shareable, view)
        if self.conflict is not None:
            log.error("cluster conflict: this pod must not serve", problem=self.conflict)
        old = self.members
        # A pod name that came back with another start time is a new process: its predecessor's links are gone.
        restarted = {p for p, m in view.items() if p != self.pod and p in old and old[p].started_at != m.started_at}
        placed = sorted(pod for pod, m in view.items() if not m.leaving)
        self.members = view
        metrics.CLUSTER_MEMBERS.set(len(view))
        if set(view) != set(old) or restarted:
            log.info("cluster members changed", members=sorted(view), restarted=sorted(restarted))
            self.relay.pods_changed(set(view) - restarted)
        if placed != self._placed:
            self._placed = placed or [self.pod]
            if not self.registry.closing:
                self.moves_out += self.registry.move_out(self.is_mine)

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: stop taking sessions, hand every session over, leave the cluster (DESIGN §6 Drain)."""
        self.leaving = True
        self._placed = [p for p in self._placed if p != self.pod] or [self.pod]
        await self.heartbeat()  # the others stop placing sessions here at their next look
        await self.registry.shutdown(grace_s)
        await self._leave_quietly()

    async def _leave_quietly(self) -> None:
        assert self.storage.membership is not None
        try:
            with trio.move_on_after(self.ttl_s):
                await self.storage.membership.leave(self.pod)
        except StorageError as exc:
            log.warning("could not leave the member list (it expires by itself)", error=str(exc))

    # ---- reaching actors ------------------------------------------------------------------------------

    async def attach(
        self, session_id: str, link: DeviceLink, kind: str, resume: int | None, epoch: str | None
    ) -> ActorRef:
        """Attach a device of this pod to its session's actor, wherever it lives."""
        deadline = trio.current_time() + self.retry_for_s
        while True:
            owner = self.owner(session_id)
            try:
                if owner == self.pod:
                    return await self.registry.tell(session_id, Attach(link, kind, resume, epoch))
                return await self.relay.attach(owner, session_id, link, kind, resume, epoch, self.attach_timeout_s)
            except NotOwner:
                if trio.current_time() >= deadline:
                    raise ActorUnavailable("the session is moving between pods; retry") from None
                await trio.sleep(RETRY_DELAY_S)

    async def ask(self, session_id: str, message: AskMessage, timeout_s: float | None = None) -> Any:
        """A REST request for the session's actor (RestChange, RestHandoff, Describe, End), wherever it lives."""
        timeout = self.ask_timeout_s if timeout_s is None else timeout_s
        deadline = trio.current_time() + self.retry_for_s
        while True:
            owner = self.owner(session_id)
            try:
                if owner == self.pod:
                    return await self.registry.ask(session_id, message, timeout)
                return await self._ask_remote(owner, session_id, message, timeout)
            except NotOwner:
                if trio.current_time() >= deadline:
                    raise ActorUnavailable("the session is moving between pods; retry") from None
                await trio.sleep(RETRY_DELAY_S)

    async def _ask_remote(self, owner: str, session_id: str, message: AskMessage, timeout_s: float) -> Any:
        relay = self.relay
        if isinstance(message, RestChange):
            value = await relay.ask(owner, session_id, "change", [message.ops, message.base, message.key], timeout_s)
            return result_from_wire(value)
        if isinstance(message, RestHandoff):
            value = await relay.ask(owner, session_id, "handoff", [message.device, message.key], timeout_s)
            return result_from_wire(value)
        if isinstance(message, Describe):
            return await relay.ask(owner, session_id, "describe", None, timeout_s)
        if isinstance(message, End):
            return await relay.ask(owner, session_id, "end", None, timeout_s)
        raise TypeError(f"{type(message).__name__} cannot be asked across pods")

    async def owner_of(self, session_id: str) -> str | None:
        """The user owning a live session (from storage: the same answer on every pod), without activating it."""
        return await self.registry.owner_of(session_id)

    async def peek(self, session_ids: list[str]) -> dict[str, list[Any]]:
        """[version, active, status] of the listed sessions whose actors are live, asked of their owners."""
        by_owner: dict[str, list[str]] = {}
        for session_id in session_ids:
            by_owner.setdefault(self.owner(session_id), []).append(session_id)
        found = local_peek(self.registry, by_owner.pop(self.pod, []))
        if by_owner:
            async with trio.open_nursery() as nursery:
                for owner, sessions in by_owner.items():
                    nursery.start_soon(self._peek_remote, owner, sessions, found)
        return found

    async def _peek_remote(self, owner: str, sessions: list[str], found: dict[str, list[Any]]) -> None:
        try:
            answer = await self.relay.ask(owner, "", "peek", sessions, PEEK_TIMEOUT_S)
        except ActorUnavailable:
            return  # the stored records stand in for them
        if isinstance(answer, dict):
            found.update({sid: value for sid, value in answer.items() if sid in sessions})

    async def cluster_statistics(self) -> dict[str, Any]:
        """Every pod's actors, leases and relay figures; a pod that does not answer is listed as such."""
        pods: dict[str, Any] = {}

        async def one(pod: str) -> None:
            if pod == self.pod:
                pods[pod] = self.relay.registry_statistics()
                return
            try:
                pods[pod] = await self.relay.ask(pod, "", "stats", None, PEEK_TIMEOUT_S)
            except ActorUnavailable as exc:
                pods[pod] = {"pod": pod, "error": str(exc) or "no answer"}

        async with trio.open_nursery() as nursery:
            for pod in self.members:
                nursery.start_soon(one, pod)
        return {"pod": self.pod, "members": sorted(self.members), "pods": pods}

    def statistics(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "members": sorted(self.members),
            "placed": list(self._placed),
            "leaving": self.leaving,
            "conflict": self.conflict,
            "moves_out": self.moves_out,
        }


def _conflict(pod: str, shareable: bool, view: dict[str, Member]) -> str | None:
    """Why this pod cannot be part of the cluster it sees, if it cannot (DESIGN §6: embedded stores are per pod)."""
    others = [m for name, m in view.items() if name != pod]
    if not others:
        return None
    if not shareable:
        return (
            f"this pod uses the embedded store (memory journal or SQLite file) but other pods share its Redis "
            f"({', '.join(sorted(m.pod for m in others))}); a cluster needs SESSIOND_DATABASE_URL and "
            f"SESSIOND_DURABILITY redis or postgres on every pod"
        )
    embedded = sorted(m.pod for m in others if not m.shareable)
    if embedded:
        return f"pods {', '.join(embedded)} use an embedded store and cannot share sessions; stop them first"
    return None
