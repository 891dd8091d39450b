"""Actors and devices on other pods, over Redis pub/sub (DESIGN §6 relay).

A device may connect to any pod (its *edge*); its session's actor lives on the session's *owner* pod. On the
edge, `RemoteRef` stands in for the actor (transport tells it what it would tell a local actor); on the owner,
`RemoteLink` stands in for the device (the actor delivers to it what it would deliver to a WebSocket). Between
them, `Relay` batches everything one pod has for another into one pub/sub message per flush (a patch for three
devices of one pod crosses once), numbers each link's messages in both directions, and cuts a link at the first
gap: pub/sub is at-most-once, so a cut device reconnects, resumes and retransmits instead of missing a frame.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from actors import metrics, relay
from actors.messages import (
    ActorUnavailable,
    AnswerTimeout,
    AskMessage,
    Attach,
    ChangeRequest,
    ClaimRequest,
    Describe,
    Detach,
    DeviceLink,
    End,
    Message,
    NotOwner,
    Outgoing,
    Overloaded,
    PauseRequest,
    Reply,
    RestChange,
    RestHandoff,
    Resync,
)
from actors.session_actor import SessionActor, SessionNotFound
from protocol import codes
from storage.ports import PubSub, StorageError

if TYPE_CHECKING:
    from actors.registry import Registry

log = structlog.get_logger("sessiond.relay")

DETACH_RETRY_S = 0.01
UNKNOWN_REMEMBERED = 1024


# ---- the owner's side: a device connected elsewhere ------------------------------------------------------


class RemoteLink:
    """A device connected to another pod, as the session's actor sees it (a DeviceLink)."""

    remote = True

    __slots__ = ("_device", "actor", "closed", "conn", "expect_in", "pod", "relay", "seq_out", "session_id")

    def __init__(self, relay: Relay, pod: str, conn: int, device: str, session_id: str) -> None:
        self.relay = relay
        self.pod = pod
        self.conn = conn
        self._device = device
        self.session_id = session_id
        self.seq_out = 0  # frames sent to the device
        self.expect_in = 2  # the attach was message 1
        self.closed = False
        self.actor: SessionActor | None = None

    @property
    def device(self) -> str:
        return self._device

    @property
    def link_id(self) -> str:
        return f"{self.pod}/{self.conn}"

    @property
    def queued_bytes(self) -> int:
        return 0  # the device's send queue is in its own pod's memory (which has no actor to count it against)

    def deliver(self, out: Outgoing) -> None:
        if not self.closed:
            self.seq_out += 1
            self.relay.queue_frame(self.pod, out, self.conn, self.seq_out)

    def close(self, code: int, reason: str) -> None:
        """Close the device's connection on its pod. Its pod is not going away when this one is: a 1001 of
        ours becomes 1013 there (resume through the session's next owner)."""
        if not self.closed:
            self.closed = True
            if code == codes.GOING_AWAY:
                code, reason = codes.TRY_AGAIN_LATER, "session moving to another pod"
            self.relay.queue(self.pod, ["c", self.conn, code, reason])
            self.relay.forget_link(self)  # the edge forgets it on the close: no detach comes back


# ---- the edge's side: an actor on another pod ------------------------------------------------------------


@dataclass(slots=True)
class EdgeLink:
    """A device of this pod whose session lives on `owner`."""

    conn: int
    link: DeviceLink
    session_id: str
    owner: str
    seq_out: int = 1  # the attach was message 1
    expect_in: int = 1
    gone: bool = False
    ref: RemoteRef | None = field(default=None, repr=False)


class RemoteRef:
    """The actor of a session owned by another pod, as transport sees it for one device (an ActorRef)."""

    def __init__(self, relay: Relay, edge: EdgeLink) -> None:
        self.relay = relay
        self.edge = edge

    @property
    def session_id(self) -> str:
        return self.edge.session_id

    @property
    def gone(self) -> bool:
        return self.edge.gone

    def tell(self, message: Message) -> None:
        edge = self.edge
        if edge.gone:
            if isinstance(message, Detach):
                return
            raise ActorUnavailable("the session moved; reconnect")
        if isinstance(message, ChangeRequest):
            self.relay.to_owner(edge, "op", [message.op_id, message.ops, message.base, message.size])
        elif isinstance(message, PauseRequest):
            self.relay.to_owner(edge, "pause", message.op_id)
        elif isinstance(message, ClaimRequest):
            self.relay.to_owner(edge, "claim", message.op_id)
        elif isinstance(message, Resync):
            self.relay.to_owner(edge, "resync", None)
        elif isinstance(message, Detach):
            self.relay.to_owner(edge, "detach", None)
            self.relay.forget_edge(edge)
        else:
            raise TypeError(f"{type(message).__name__} is not a device message")

    async def ask(self, message: AskMessage, timeout_s: float = 10.0) -> Any:
        raise TypeError("asks go through Router.ask")


# ---- the relay -------------------------------------------------------------------------------------------


class Relay:
    """This pod's end of the pod-to-pod relay: outboxes, the subscription, and every link crossing pods."""

    def __init__(self, pod: str, pubsub: PubSub, registry: Registry, is_mine: Callable[[str], bool]) -> None:
        self.pod = pod
        self.pubsub = pubsub
        self.registry = registry
        self.is_mine = is_mine
        self._outbox: dict[str, list[relay.Item]] = {}
        self._last_frame: dict[str, tuple[Outgoing, relay.Item]] = {}
        self._wake = trio.Event()
        self._edges: dict[int, EdgeLink] = {}
        self._links: dict[tuple[str, int], RemoteLink] = {}
        self._asks: dict[int, tuple[str, Reply]] = {}
        self._unknown: OrderedDict[tuple[str, int], None] = OrderedDict()  # links we said we do not have
        self._req = itertools.count(1)
        # Connection numbers start at random: a restarted process under the same pod name must not reuse its
        # predecessor's numbers while other pods may still hold links to them.
        self._conn = itertools.count(random.getrandbits(40))
        self._tasks: trio.Nursery | None = None
        self.sent = 0
        self.received = 0
        self.gaps = 0

    # ---- running --------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            nursery.start_soon(self._flusher)
            await nursery.start(self._subscriber)
            task_status.started()

    async def _subscriber(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.pubsub.subscribe(self.pod) as subscription:
            task_status.started()
            while True:
                messages, gap = await subscription.receive()
                if gap:
                    self._on_gap()
                for data in messages:
                    self._receive(data)

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            await trio.lowlevel.checkpoint()  # one scheduling pass: whatever else is ready joins this flush
            self._wake = trio.Event()
            outbox, self._outbox = self._outbox, {}
            self._last_frame.clear()
            messages = []
            for pod, items in outbox.items():
                try:
                    messages.append((pod, relay.encode(self.pod, _encodable(items))))
                except (TypeError, ValueError, OverflowError) as exc:  # a bug upstream: never take the relay down
                    log.error("relay message not encodable; cutting the links to that pod", pod=pod, error=str(exc))
                    self._cut_pod(pod, "relay error")
                    continue
                metrics.RELAY_ITEMS.labels("out").inc(len(items))
            try:
                await self.pubsub.publish(messages)
            except StorageError as exc:
                # Lost on the way out: the receivers cannot see a gap at the end of a stream, so cut here.
                log.warning("relay publish failed; cutting the links to those pods", error=str(exc))
                for pod in outbox:
                    self._cut_pod(pod, "relay unavailable")
                continue
            self.sent += len(messages)
            metrics.RELAY_MESSAGES.labels("out").inc(len(messages))

    # ---- queueing ---------------------------------------------------------------------------------------

    def queue(self, pod: str, item: relay.Item) -> None:
        box = self._outbox.get(pod)
        if box is None:
            box = self._outbox[pod] = []
        box.append(item)
        self._last_frame.pop(pod, None)
        self._wake.set()

    def queue_frame(self, pod: str, out: Outgoing, conn: int, seq: int) -> None:
        """A frame for a device on `pod`; consecutive deliveries of one frame share one item."""
        last = self._last_frame.get(pod)
        if last is not None and last[0] is out:
            last[1][2].extend((conn, seq))
            return
        item: relay.Item = ["f", out, [conn, seq]]
        self.queue(pod, item)
        self._last_frame[pod] = (out, item)

    # ---- the edge's side ------------------------------------------------------------------------------

    async def attach(
        self, owner: str, session_id: str, link: DeviceLink, kind: str, resume: int | None, epoch: str | None,
        timeout_s: float,
    ) -> RemoteRef:
        """Attach a device of this pod to the session's actor on `owner`; raises like a local attach would."""
        edge = EdgeLink(next(self._conn), link, session_id, owner)
        self._edges[edge.conn] = edge
        ref = edge.ref = RemoteRef(self, edge)
        req = next(self._req)
        reply = Reply()
        self._asks[req] = (owner, reply)
        self.queue(owner, ["a", req, session_id, edge.conn, link.device, kind, resume, epoch])
        try:
            await reply.wait(timeout_s)
        except BaseException:
            self._asks.pop(req, None)
            if not edge.gone:  # the owner may still attach it: tell it the device is gone
                self.to_owner(edge, "detach", None)
            self.forget_edge(edge)
            raise
        return ref

    def to_owner(self, edge: EdgeLink, what: str, args: Any) -> None:
        edge.seq_out += 1
        self.queue(edge.owner, ["m", edge.conn, edge.seq_out, what, args])

    def forget_edge(self, edge: EdgeLink) -> None:
        edge.gone = True
        if self._edges.get(edge.conn) is edge:
            del self._edges[edge.conn]

    def _cut_edge(self, edge: EdgeLink, reason: str) -> None:
        if not edge.gone:
            self.to_owner(edge, "detach", None)
            self.forget_edge(edge)
            edge.link.close(codes.TRY_AGAIN_LATER, reason)

    async def ask(self, owner: str, session_id: str, what: str, args: Any, timeout_s: float) -> Any:
        req = next(self._req)
        reply = Reply()
        self._asks[req] = (owner, reply)
        self.queue(owner, ["q", req, session_id, what, args])
        try:
            return await reply.wait(timeout_s)
        finally:
            self._asks.pop(req, None)

    # ---- receiving ----------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        try:
            pod, sent_at, items = relay.decode(data)
        except relay.BadRelayMessage as exc:
            log.warning("relay message dropped", error=str(exc))
            return
        self.received += 1
        metrics.RELAY_MESSAGES.labels("in").inc()
        metrics.RELAY_ITEMS.labels("in").inc(len(items))
        metrics.RELAY_LATENCY.observe(max(0.0, time.time() - sent_at))
        for item in items:
            try:
                self._handle(pod, item, sent_at)
            except (IndexError, TypeError, ValueError, KeyError) as exc:
                log.warning("relay item dropped", kind=item[0], error=str(exc))

    def _handle(self, pod: str, item: relay.Item, sent_at: float = 0.0) -> None:
        kind = item[0]
        if kind == "f":
            self._on_frame(pod, item[1], item[2], sent_at)
        elif kind == "m":
            self._on_device_message(pod, item[1], item[2], item[3], item[4])
        elif kind == "r":
            self._on_reply(item[1], item[2], item[3])
        elif kind == "c":
            edge = self._edges.get(item[1])
            if edge is not None and edge.owner == pod:
                self.forget_edge(edge)
                edge.link.close(int(item[2]), str(item[3]))
        elif kind == "a":
            self._spawn(self._on_attach, pod, item)
        elif kind == "q":
            self._spawn(self._on_ask, pod, item)

    def _on_frame(self, pod: str, frame: dict[str, Any], targets: list[int], sent_at: float = 0.0) -> None:
        out = Outgoing(frame, sent_at)  # delivery latency of a relayed patch counts from the owner's publish
        for i in range(0, len(targets) - 1, 2):
            conn, seq = targets[i], targets[i + 1]
            edge = self._edges.get(conn)
            if edge is None or edge.owner != pod:
                if (pod, conn) not in self._unknown:  # a link the owner still has and we do not: tell it once
                    self._unknown[(pod, conn)] = None
                    if len(self._unknown) > UNKNOWN_REMEMBERED:
                        self._unknown.popitem(last=False)
                    self.queue(pod, ["m", conn, 0, "detach", None])
                continue
            if seq != edge.expect_in:
                self._gap(f"frame {seq} where {edge.expect_in} was due")
                self._cut_edge(edge, "relay gap; reconnect to resume")
                continue
            edge.expect_in += 1
            edge.link.deliver(out)

    def _on_reply(self, req: int, status: str, value: Any) -> None:
        entry = self._asks.pop(req, None)
        if entry is None:
            return
        reply = entry[1]
        if status == "ok":
            reply.set(value)
        elif status == relay.NOT_FOUND:
            reply.fail(SessionNotFound(str(value)))
        elif status == relay.OVERLOADED:
            reply.fail(Overloaded(str(value)))
        elif status == relay.NOT_OWNER:
            reply.fail(NotOwner(str(value)))
        elif status == relay.TIMEOUT:
            reply.fail(AnswerTimeout(str(value)))
        else:
            reply.fail(ActorUnavailable(str(value)))

    # ---- the owner's side ---------------------------------------------------------------------------

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._tasks is not None
        self._tasks.start_soon(fn, *args)

    def _reply(self, pod: str, req: int, status: str, value: Any) -> None:
        self.queue(pod, ["r", req, status, value])

    async def _on_attach(self, pod: str, item: relay.Item) -> None:
        _, req, session_id, conn, device, kind, resume, epoch = item
        if not self.is_mine(session_id):
            self._reply(pod, req, relay.NOT_OWNER, f"pod {self.pod} does not own the session")
            return
        link = RemoteLink(self, pod, conn, device, session_id)
        old = self._links.get((pod, conn))
        if old is not None:
            old.closed = True
        self._links[(pod, conn)] = link
        try:
            link.actor = await self.registry.tell(session_id, Attach(link, kind, resume, epoch))
        except Exception as exc:
            if self._links.get((pod, conn)) is link:
                del self._links[(pod, conn)]
            link.closed = True
            self._reply(pod, req, *_error_reply(exc))
            return
        self._reply(pod, req, "ok", None)

    def _on_device_message(self, pod: str, conn: int, seq: int, what: str, args: Any) -> None:
        link = self._links.get((pod, conn))
        if link is None:
            if what != "detach":
                self.queue(pod, ["c", conn, codes.TRY_AGAIN_LATER, "relay link unknown; reconnect to resume"])
            return
        if what == "detach" and seq == 0:  # the edge no longer has this connection
            self._drop_link(link)
            return
        if seq != link.expect_in:
            self._gap(f"device message {seq} where {link.expect_in} was due")
            link.close(codes.TRY_AGAIN_LATER, "relay gap; reconnect to resume")
            self._drop_link(link)
            return
        link.expect_in += 1
        if what == "detach":
            self._drop_link(link)
            return
        actor = link.actor
        if actor is None or link.closed:
            return
        message: Message
        if what == "op":
            op_id, ops, base, size = args
            message = ChangeRequest(link, op_id, ops, base, size)
        elif what == "pause":
            message = PauseRequest(link, args)
        elif what == "claim":
            message = ClaimRequest(link, args)
        elif what == "resync":
            message = Resync(link)
        else:
            return
        try:
            actor.tell(message)
        except Overloaded:
            op_id = getattr(message, "op_id", None)
            link.deliver(Outgoing(_error(codes.RATE_LIMITED, "session busy, retry shortly", op_id)))
        except ActorUnavailable as exc:
            link.deliver(Outgoing(_error(codes.UNAVAILABLE, str(exc), getattr(message, "op_id", None))))
            if actor.gone:
                link.close(codes.TRY_AGAIN_LATER, "session unavailable, reconnect")

    def forget_link(self, link: RemoteLink) -> None:
        if self._links.get((link.pod, link.conn)) is link:
            del self._links[(link.pod, link.conn)]

    def _drop_link(self, link: RemoteLink) -> None:
        """The device is gone from its pod: the actor must hear it, even when its mailbox is full."""
        self.forget_link(link)
        link.closed = True
        actor = link.actor
        if actor is not None and not actor.stopped.is_set():
            try:
                actor.tell(Detach(link))
            except Overloaded:
                self._spawn(_detach_later, actor, link)
            except ActorUnavailable:
                pass

    async def _on_ask(self, pod: str, item: relay.Item) -> None:
        _, req, session_id, what, args = item
        try:
            value = await self._answer(session_id, what, args)
        except Exception as exc:
            self._reply(pod, req, *_error_reply(exc))
            return
        self._reply(pod, req, "ok", value)

    async def _answer(self, session_id: str, what: str, args: Any) -> Any:
        registry = self.registry
        if what == "peek":
            return local_peek(registry, args)
        if what == "stats":
            return self.registry_statistics()
        if not self.is_mine(session_id):
            raise NotOwner(f"pod {self.pod} does not own the session")
        if what == "change":
            ops, base, key = args
            return relay.result_to_wire(await registry.ask(session_id, RestChange(ops, base, key=key)))
        if what == "handoff":
            device, key = args
            return relay.result_to_wire(await registry.ask(session_id, RestHandoff(device, key=key)))
        if what == "describe":
            return await registry.ask(session_id, Describe())
        if what == "end":
            return await registry.ask(session_id, End())
        raise ValueError(f"unknown ask {what!r}")

    def registry_statistics(self) -> dict[str, Any]:
        """This pod's actors and relay figures, for the admin view."""
        keeper = self.registry.leases
        return {
            "pod": self.pod,
            "actors": [actor.statistics() for actor in self.registry.live()],
            "leases": keeper.statistics(),
            "relay": self.statistics(),
        }

    # ---- failures -------------------------------------------------------------------------------------

    def _gap(self, why: str) -> None:
        self.gaps += 1
        metrics.RELAY_GAPS.inc()
        log.warning("relay gap: cutting the link", why=why)

    def _on_gap(self) -> None:
        """Our subscription may have lost messages: every link crossing pods is suspect, in both directions."""
        self._gap("subscription interrupted")
        for edge in list(self._edges.values()):
            self._cut_edge(edge, "relay interrupted; reconnect to resume")
        for link in list(self._links.values()):
            link.close(codes.TRY_AGAIN_LATER, "relay interrupted; reconnect to resume")
            self._drop_link(link)

    def _cut_pod(self, pod: str, reason: str) -> None:
        for edge in [e for e in self._edges.values() if e.owner == pod]:
            self.forget_edge(edge)
            edge.link.close(codes.TRY_AGAIN_LATER, f"{reason}; reconnect to resume")
        for link in [lk for lk in self._links.values() if lk.pod == pod]:
            self._drop_link(link)
        for req, (owner, reply) in list(self._asks.items()):
            if owner == pod:
                del self._asks[req]
                reply.fail(ActorUnavailable(f"{reason}; retry"))

    def pods_changed(self, live: set[str]) -> None:
        """Pods that left the cluster: their devices are gone (owner side), their sessions moved (edge side)."""
        gone = {e.owner for e in self._edges.values()} | {lk.pod for lk in self._links.values()}
        gone |= {owner for owner, _ in self._asks.values()}
        for pod in gone - live:
            self._cut_pod(pod, f"pod {pod} left the cluster")

    def statistics(self) -> dict[str, int]:
        return {
            "edge_links": len(self._edges),
            "remote_links": len(self._links),
            "asks_waiting": len(self._asks),
            "messages_sent": self.sent,
            "messages_received": self.received,
            "gaps": self.gaps,
        }


def local_peek(registry: Registry, sessions: list[str]) -> dict[str, list[Any]]:
    """(version, active, status) of the listed sessions that live on this pod."""
    found: dict[str, list[Any]] = {}
    for session_id in sessions:
        actor = registry.lookup(session_id)
        if actor is not None and actor.state is not None:
            state = actor.state
            found[session_id] = [state.version, state.active, state.status]
    return found


def _encodable(items: list[relay.Item]) -> list[relay.Item]:
    """Frames travel as their dicts (each pod encodes them for its own devices)."""
    return [["f", item[1].frame, item[2]] if item[0] == "f" else item for item in items]


def _error(code: str, message: str, op_id: int | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "error", "code": code, "message": message}
    if op_id is not None:
        frame["id"] = op_id
    return frame


def _error_reply(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, SessionNotFound):
        return relay.NOT_FOUND, "no such session"
    if isinstance(exc, NotOwner):
        return relay.NOT_OWNER, str(exc)
    if isinstance(exc, AnswerTimeout):
        return relay.TIMEOUT, str(exc)
    if isinstance(exc, Overloaded):
        return relay.OVERLOADED, str(exc)
    if isinstance(exc, ActorUnavailable | StorageError):
        return relay.UNAVAILABLE, str(exc) or "session unavailable"
    log.error("relay request failed", exc_info=exc)
    return relay.UNAVAILABLE, "internal error"


async def _detach_later(actor: SessionActor, link: RemoteLink) -> None:
    with trio.move_on_after(5):
        while not actor.stopped.is_set():
            try:
                actor.tell(Detach(link))
                return
            except Overloaded:
                await trio.sleep(DETACH_RETRY_S)
            except ActorUnavailable:
                return
