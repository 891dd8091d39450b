"""A device's bounded send queue (transport/sendqueue.py, DESIGN §5 guarantees 1 and 5): bounded in frames and bytes,
superseded frames replaced by one fresh welcome on overflow, acks and errors never lost silently, order kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.sendqueue import SUPERSEDED, Push, SendQueue

KINDS = ("patch", "presence", "handoff", "welcome", "ack", "error", "authed")
KEPT = frozenset({"ack", "error", "authed"})  # never superseded by a welcome
FINAL = "final"  # our label for push_final frames (the error before a close)


# ---- frames with an identity ----------------------------------------------------------------------------


@dataclass
class Frames:
    """Makes frames whose text carries a serial number, so the queue's content can be read back."""

    kinds: dict[int, str] = field(default_factory=dict)
    next_id: int = 0

    def make(self, kind: str, size: int) -> str:
        ident = self.next_id
        self.next_id += 1
        self.kinds[ident] = kind
        label = f"{ident:05d}"
        return label + "x" * max(0, size - len(label))

    @staticmethod
    def ident(data: str | bytes) -> int:
        text = data.decode() if isinstance(data, bytes) else data
        return int(text[:5])

    def kind(self, data: str | bytes) -> str:
        return self.kinds[self.ident(data)]


def ids(frames: Frames, items: list[str | bytes]) -> list[int]:
    return [frames.ident(d) for d in items]


def kinds(frames: Frames, items: list[str | bytes]) -> list[str]:
    return [frames.kind(d) for d in items]


def frame(kind: str, size: int = 10, tag: str = "") -> str:
    """A frame for the unit tests: readable, `size` characters long."""
    text = f"{kind}{tag}"
    assert len(text) <= size
    return text.ljust(size, ".")


# ---- the model-based property ---------------------------------------------------------------------------

# Welcomes are frequent enough that overflows get answered; finals (sent once, before a close) are rare.
push_action = st.tuples(st.just("push"), st.sampled_from((*KINDS, "welcome", "patch")), st.integers(5, 60))
final_action = st.tuples(st.just("final"), st.just(""), st.integers(5, 60))
take_action = st.tuples(st.just("take"), st.integers(1, 4), st.integers(1, 150))
actions = st.lists(
    st.one_of(push_action, push_action, push_action, take_action, take_action, push_action, final_action),
    min_size=5,
    max_size=60,
)


def fits(sizes: list[int], new: int, max_frames: int, max_bytes: int) -> bool:
    return len(sizes) < max_frames and sum(sizes) + new <= max_bytes


@settings(max_examples=300, deadline=None)
@given(max_frames=st.integers(1, 6), max_bytes=st.integers(5, 200), script=actions)
def test_send_queue_rules_hold_for_any_sequence(
    max_frames: int, max_bytes: int, script: list[tuple[str, str | int, int]]
) -> None:
    """Drives one queue through random pushes and takes and checks, after every step, the rules of DESIGN §5.5
    (see the assertion messages). After an EVICT the connection only flushes (push_final, then takes)."""
    q = SendQueue(max_frames, max_bytes)
    frames = Frames()
    sizes: dict[int, int] = {}
    taken: list[int] = []
    owed: set[int] = set()  # kept frames that were accepted (not EVICT): they must all be taken in the end
    awaiting = False  # a push returned RESYNC and no welcome was pushed since
    answer: int | None = None  # the queued welcome that answers the overflow (or the welcome that replaced it)
    evicted = False

    for action, arg, size in script:
        before = ids(frames, q.peek())
        resyncing_before = q.resyncing
        if action == "take":
            assert isinstance(arg, int)
            batch = ids(frames, q.take(arg, size))
            assert batch == before[: len(batch)], "take returns the oldest frames, in order"
            assert (len(batch) >= 1) == bool(before), "take returns at least one frame when any is queued"
            assert len(batch) <= arg
            batch_bytes = [sizes[i] for i in batch]
            assert sum(batch_bytes[:-1]) < size, "a batch stops once it reaches max_bytes"
            if len(batch) < len(before):
                assert len(batch) == arg or sum(batch_bytes) >= size, "a batch takes as much as it may"
            taken.extend(batch)
            if answer is not None and answer in batch:
                answer = None
        elif action == "final":
            data = frames.make(FINAL, size)
            sizes[frames.ident(data)] = size
            q.push_final(data)
            owed.add(frames.ident(data))
            assert ids(frames, q.peek()) == [*before, frames.ident(data)], "push_final always queues, at the end"
        elif not evicted:
            assert isinstance(arg, str)
            kind = arg
            awaiting_before = awaiting
            data = frames.make(kind, size)
            ident = frames.ident(data)
            sizes[ident] = size
            result = q.push(kind, data)
            after = ids(frames, q.peek())
            before_sizes = [sizes[i] for i in before]
            kept_before = [i for i in before if frames.kinds[i] not in SUPERSEDED]
            kept_sizes = [sizes[i] for i in kept_before]
            if kind == "welcome":
                assert result is Push.QUEUED, "a welcome is always queued"
                assert after == [*kept_before, ident], "a welcome removes queued superseded frames, keeps the rest"
                if awaiting or answer is not None:
                    answer = ident
                awaiting = False
            elif result is Push.DROPPED:
                assert kind in SUPERSEDED, "only superseded frames are dropped on arrival"
                assert awaiting, "frames are dropped on arrival only while a resync welcome is awaited"
                assert after == before
            elif result is Push.QUEUED:
                assert not (kind in SUPERSEDED and awaiting), "a superseded frame queued while awaiting a welcome"
                assert fits(before_sizes, size, max_frames, max_bytes), "queued although it did not fit"
                assert after == [*before, ident]
            elif result is Push.RESYNC:
                assert not resyncing_before, "an overflow while resyncing must evict, not resync again"
                assert not fits(before_sizes, size, max_frames, max_bytes), "RESYNC without an overflow"
                expected = [*kept_before, ident] if kind in KEPT else kept_before
                assert after == expected, "an overflow drops the superseded frames (and keeps acks, errors)"
                if kind in KEPT:
                    assert fits(kept_sizes, size, max_frames, max_bytes)
                awaiting = True
            else:
                assert result is Push.EVICT
                assert not fits(before_sizes, size, max_frames, max_bytes), "EVICT without an overflow"
                assert resyncing_before or (kind in KEPT and not fits(kept_sizes, size, max_frames, max_bytes)), (
                    "EVICT only while resyncing, or when acks and errors alone fill the queue"
                )
                assert ident not in after
                evicted = True
                data = frames.make(FINAL, 12)
                sizes[frames.ident(data)] = 12
                q.push_final(data)
                owed.add(frames.ident(data))
            overflowed = kind != "welcome" and not fits(before_sizes, size, max_frames, max_bytes)
            if overflowed and resyncing_before and not (kind in SUPERSEDED and awaiting_before):
                assert result is Push.EVICT, "overflowing again before the resync welcome went out must evict"
            if kind in KEPT and result is not Push.EVICT:
                owed.add(ident)
            if kind in KEPT:
                assert result in (Push.QUEUED, Push.RESYNC, Push.EVICT), "acks and errors are never dropped"
            if kind != "welcome" and ident in after:
                bounded = [sizes[i] for i in after]
                assert len(bounded) <= max_frames and sum(bounded) <= max_bytes, "a regular frame broke the bounds"

        # ---- invariants after every step ----
        queued = ids(frames, q.peek())
        assert len(q) == len(queued)
        assert q.queued_bytes == sum(sizes[i] for i in queued), "queued_bytes is the size of what is queued"
        assert queued == sorted(queued), "frames stay in push order"
        assert taken == sorted(taken) and len(taken) == len(set(taken)), "taken frames are a subsequence, once each"
        regular = [i for i in queued if frames.kinds[i] not in ("welcome", FINAL)]
        assert len(regular) <= max_frames, "more frames than max_frames (welcomes and finals aside)"
        assert sum(sizes[i] for i in regular) <= max_bytes, "more bytes than max_bytes (welcomes and finals aside)"
        if awaiting:
            assert not any(frames.kinds[i] in SUPERSEDED for i in queued), "superseded frame queued during resync"
        assert owed <= set(queued) | set(taken), "an ack, error or final frame vanished"
        if not evicted:
            assert q.resyncing == (awaiting or answer is not None), (
                "resyncing: from an overflow until the welcome answering it has been taken"
            )

    while q.peek():
        taken.extend(ids(frames, q.take(3, 100)))
    assert owed <= set(taken), "every accepted ack, error and final frame reaches the writer"
    if not evicted:
        assert q.resyncing == awaiting, "once drained, resyncing only while a welcome is still awaited"


# ---- unit tests of each rule ----------------------------------------------------------------------------


def test_frames_queue_in_order_within_the_bounds() -> None:
    q = SendQueue(3, 1000)
    assert [q.push(k, frame(k, tag=str(i))) for i, k in enumerate(["patch", "ack", "presence"])] == [Push.QUEUED] * 3
    assert q.peek() == [frame("patch", tag="0"), frame("ack", tag="1"), frame("presence", tag="2")]
    assert len(q) == 3
    assert q.queued_bytes == 30
    assert not q.resyncing


def test_initial_welcome_does_not_make_the_queue_resyncing() -> None:
    """The join's welcome is not an answer to an overflow: a later overflow must resync, not evict."""
    q = SendQueue(2, 1000)
    assert q.push("welcome", frame("welcome")) is Push.QUEUED
    assert not q.resyncing
    assert q.push("patch", frame("patch", tag="1")) is Push.QUEUED
    assert q.push("patch", frame("patch", tag="2")) is Push.RESYNC  # not EVICT
    assert q.resyncing


def test_overflow_drops_superseded_frames_and_asks_for_a_welcome() -> None:
    """Full of patches: they are dropped (the welcome will carry their state), acks stay."""
    q = SendQueue(3, 1000)
    q.push("patch", frame("patch", tag="1"))
    q.push("ack", frame("ack", tag="1"))
    q.push("handoff", frame("handoff"))
    assert q.push("presence", frame("presence")) is Push.RESYNC
    assert q.peek() == [frame("ack", tag="1")]
    assert q.queued_bytes == 10
    assert q.resyncing


def test_byte_overflow_resyncs_too() -> None:
    q = SendQueue(100, 25)
    assert q.push("patch", frame("patch", 20)) is Push.QUEUED
    assert q.push("patch", frame("patch", 6, "2")) is Push.RESYNC
    assert q.peek() == []
    assert q.queued_bytes == 0


def test_ack_that_overflows_is_kept_and_asks_for_a_welcome() -> None:
    """An ack arriving at a queue full of patches is not lost: the patches make room for it."""
    q = SendQueue(2, 1000)
    q.push("patch", frame("patch", tag="1"))
    q.push("patch", frame("patch", tag="2"))
    assert q.push("ack", frame("ack")) is Push.RESYNC
    assert q.peek() == [frame("ack")]
    assert q.resyncing


def test_superseded_frames_are_dropped_until_the_welcome() -> None:
    q = SendQueue(1, 1000)
    q.push("patch", frame("patch", tag="1"))
    assert q.push("patch", frame("patch", tag="2")) is Push.RESYNC
    for kind in ("patch", "presence", "handoff"):
        assert q.push(kind, frame(kind, tag="3")) is Push.DROPPED
    assert q.peek() == []
    assert q.push("ack", frame("ack")) is Push.QUEUED  # acks still go out, in order
    assert q.push("welcome", frame("welcome")) is Push.QUEUED
    assert q.peek() == [frame("ack"), frame("welcome")]
    assert q.push("patch", frame("patch", tag="4")) is Push.EVICT  # the answer is still not written: 2 > 1 frame


def test_welcome_removes_superseded_frames_in_front_of_it() -> None:
    """Even without an overflow, patches queued before a welcome are stale: the welcome holds their state."""
    q = SendQueue(10, 1000)
    q.push("patch", frame("patch", tag="1"))
    q.push("error", frame("error"))
    q.push("welcome", frame("welcome", tag="1"))
    q.push("presence", frame("presence"))
    q.push("authed", frame("authed"))
    assert q.push("welcome", frame("welcome", tag="2")) is Push.QUEUED
    assert q.peek() == [frame("error"), frame("authed"), frame("welcome", tag="2")]
    assert q.queued_bytes == 30


def test_welcome_may_exceed_the_bounds() -> None:
    """The answering welcome is always queued, however large: it is what lets the device catch up."""
    q = SendQueue(1, 20)
    q.push("ack", frame("ack", 15))
    assert q.push("patch", frame("patch", 10)) is Push.RESYNC
    assert q.push("welcome", frame("welcome", 500)) is Push.QUEUED
    assert len(q) == 2
    assert q.queued_bytes == 515


def test_resyncing_ends_once_the_answering_welcome_is_taken() -> None:
    q = SendQueue(2, 1000)
    q.push("ack", frame("ack", tag="1"))
    q.push("patch", frame("patch", tag="1"))
    assert q.push("patch", frame("patch", tag="2")) is Push.RESYNC
    q.push("ack", frame("ack", tag="2"))
    q.push("welcome", frame("welcome"))
    assert q.resyncing
    assert q.take(2, 1000) == [frame("ack", tag="1"), frame("ack", tag="2")]
    assert q.resyncing, "the welcome is still queued"
    assert q.take(5, 1000) == [frame("welcome")]
    assert not q.resyncing
    assert q.push("patch", frame("patch", tag="3")) is Push.QUEUED


def test_a_second_welcome_keeps_the_queue_resyncing() -> None:
    """A second welcome (e.g. the actor restarted and resyncs everyone) replaces the queued answer to an overflow;
    it answers the overflow now, so the queue stays resyncing until it is written (§5.5: overflowing again before
    that welcome went out must evict, not drop the welcome and ask for yet another one)."""
    q = SendQueue(2, 1000)
    q.push("patch", frame("patch", tag="1"))
    q.push("patch", frame("patch", tag="2"))
    assert q.push("patch", frame("patch", tag="3")) is Push.RESYNC
    q.push("welcome", frame("welcome", tag="1"))
    q.push("ack", frame("ack"))
    q.push("welcome", frame("welcome", tag="2"))
    assert q.peek() == [frame("ack"), frame("welcome", tag="2")]
    assert q.take(1, 1000) == [frame("ack")]
    assert q.resyncing, "welcome 2 answers the overflow and is not written yet"
    q.push("patch", frame("patch", tag="4"))
    assert q.push("patch", frame("patch", tag="5")) is Push.EVICT  # today: RESYNC, and welcome 2 is dropped


def test_overflow_after_the_welcome_went_out_resyncs_again() -> None:
    """Once the answer is written the device is caught up: a later overflow is a new, ordinary one."""
    q = SendQueue(1, 1000)
    q.push("patch", frame("patch", tag="1"))
    assert q.push("patch", frame("patch", tag="2")) is Push.RESYNC
    q.push("welcome", frame("welcome"))
    q.take(1, 1000)
    q.push("patch", frame("patch", tag="3"))
    assert q.push("patch", frame("patch", tag="4")) is Push.RESYNC


def test_overflow_while_resyncing_evicts() -> None:
    """A device that overflows again before its resync welcome is written cannot keep up (slow_consumer)."""
    q = SendQueue(2, 1000)
    q.push("patch", frame("patch", tag="1"))
    q.push("patch", frame("patch", tag="2"))
    assert q.push("ack", frame("ack", tag="1")) is Push.RESYNC
    assert q.push("error", frame("error")) is Push.QUEUED
    assert q.push("ack", frame("ack", tag="2")) is Push.EVICT
    assert q.peek() == [frame("ack", tag="1"), frame("error")]


def test_acks_alone_filling_the_queue_evict() -> None:
    """A device that reads nothing at all: its queue holds only acks, nothing can be dropped for the new one."""
    q = SendQueue(2, 1000)
    q.push("ack", frame("ack", tag="1"))
    q.push("ack", frame("ack", tag="2"))
    assert q.push("ack", frame("ack", tag="3")) is Push.EVICT
    assert q.peek() == [frame("ack", tag="1"), frame("ack", tag="2")]


def test_push_final_ignores_the_bounds() -> None:
    q = SendQueue(1, 10)
    q.push("ack", frame("ack"))
    q.push_final(frame("error", 50))
    assert q.peek() == [frame("ack"), frame("error", 50)]
    assert q.queued_bytes == 60


def test_take_respects_frame_and_byte_limits() -> None:
    q = SendQueue(10, 1000)
    for i in range(5):
        q.push("patch", frame("patch", tag=str(i)))
    assert q.take(2, 1000) == [frame("patch", tag="0"), frame("patch", tag="1")]
    assert q.take(10, 15) == [frame("patch", tag="2"), frame("patch", tag="3")]  # stops once 15 bytes are reached
    assert q.queued_bytes == 10
    assert q.take(10, 1) == [frame("patch", tag="4")]  # at least one, even larger than max_bytes
    assert q.take(10, 1) == []
    assert q.queued_bytes == 0


@pytest.mark.parametrize("data", [b"\x00" * 7, "é" * 7])
def test_sizes_count_the_encoded_length(data: str | bytes) -> None:
    """Bytes frames (msgpack) and text frames (JSON) are both counted by their length."""
    q = SendQueue(10, 10)
    assert q.push("patch", data) is Push.QUEUED
    assert q.queued_bytes == 7
    assert q.push("patch", data) is Push.RESYNC


def test_an_idle_queue_holds_no_buffer_and_shrinks_back_once_empty() -> None:
    """An idle device must not carry a 760-byte deque (issue 9: ≤ 25 KiB per idle device); a busy one keeps it."""
    q = SendQueue(max_frames=4, max_bytes=1 << 20)
    assert q.take(10, 1 << 20) == [] and len(q) == 0
    assert q.push("patch", b"a") is Push.QUEUED
    q.shrink()  # not empty: kept
    assert q.take(10, 1 << 20) == [b"a"]
    q.shrink()
    assert q._items == ()
    assert q.push("patch", b"b") is Push.QUEUED and q.take(10, 1 << 20) == [b"b"]
