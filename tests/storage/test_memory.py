"""The in-memory journal (the embedded default's): bounded in bytes as well as in entries, since what it holds
is this process's memory (issue 8)."""

from __future__ import annotations

import gc
import time
import tracemalloc

import orjson
import pytest

from storage.memory import MAX_MEMORY_JOURNAL_BYTES, MemoryJournal, memory_storage
from storage.ports import MAX_JOURNAL_ENTRIES, Change, JournalFull


def blob(version: int, size: int) -> Change:
    """A change whose ops encode to exactly `size` bytes."""
    ops = [{"op": "set", "path": "/k", "value": ""}]
    pad = size - len(orjson.dumps(ops))
    ops[0]["value"] = "x" * pad
    assert len(orjson.dumps(ops)) == size
    return Change(version, "phone", version, ops)


async def test_growth_past_the_byte_cap_is_refused_whole_like_the_entry_cap() -> None:
    journal = MemoryJournal(max_entries=1000, max_bytes=1000)
    await journal.append("s", [blob(1, 300), blob(2, 300)])
    await journal.append("s", [blob(3, 300)])
    assert journal.session_bytes("s") == 900 and journal.held_bytes == 900
    with pytest.raises(JournalFull, match="1000 bytes"):
        await journal.append("s", [blob(4, 101)])  # one byte over
    with pytest.raises(JournalFull):
        await journal.append("s", [blob(4, 50), blob(5, 60)])  # a batch is refused whole: nothing of it kept
    assert [c.version for c in await journal.read_after("s", 0)] == [1, 2, 3]
    assert journal.session_bytes("s") == 900
    await journal.append("s", [blob(4, 100)])  # exactly at the cap
    await journal.append("other", [blob(1, 900)])  # the cap is per session, like the entry cap
    assert journal.held_bytes == 1900
    await journal.trim("s", 2)  # a checkpoint frees room
    assert journal.session_bytes("s") == 400
    await journal.append("s", [blob(5, 600)])
    await journal.trim("s", 5)
    await journal.delete("other")
    assert journal.session_bytes("s") == journal.held_bytes == 0


async def test_the_size_a_change_carries_is_used_and_does_not_change_equality() -> None:
    """The actor gives each change its frame's length (Change.size): the journal counts that, without encoding
    the ops again on the hot path."""
    journal = MemoryJournal(max_bytes=10_000)
    told = Change(1, "phone", 1, [{"op": "inc", "path": "/n", "by": 1}], 5_000)
    await journal.append("s", [told])
    assert journal.session_bytes("s") == 5_000
    assert told == Change(1, "phone", 1, [{"op": "inc", "path": "/n", "by": 1}])
    with pytest.raises(JournalFull):
        await journal.append("s", [Change(2, "phone", 2, [], 5_001)])


def test_the_embedded_journal_has_both_caps() -> None:
    journal = memory_storage().journal
    assert isinstance(journal, MemoryJournal)
    assert journal.max_entries == MAX_JOURNAL_ENTRIES and journal.max_bytes == MAX_MEMORY_JOURNAL_BYTES
    assert 0 < MAX_MEMORY_JOURNAL_BYTES <= 256 << 20


async def test_lease_tokens_of_a_new_process_start_above_the_wall_clock() -> None:
    """The token is the session's wire epoch. Counters that restarted at 1 gave a session restored after a crash
    the epoch of its previous life, so a device resuming with (epoch, version) took a replay of versions whose
    contents had changed. Starting above the wall clock (µs) at process start, a later process never repeats one."""
    from storage.memory import MemoryLeases

    before = time.time_ns() // 1000
    first = await MemoryLeases().acquire("s1", "pod", 5.0)
    assert first > before
    assert await MemoryLeases(base=0).acquire("s1", "pod", 5.0) == 1  # tests may pin the base
    leases = MemoryLeases()
    a = await leases.acquire("s2", "pod", 5.0)
    assert await leases.acquire("s2", "pod", 5.0) == a + 1  # and they grow per session as before
    assert await leases.acquire("s2", "pod", 5.0, floor=a + 10) == a + 11


async def test_held_entries_are_not_tracked_by_the_cyclic_gc() -> None:
    """Thousands of held changes must not become containers the GC walks (issue 9: its pauses made the delivery
    tail): the journal keeps them encoded, and gives back equal changes."""
    journal = MemoryJournal()
    changes = [Change(v, "phone", v, [{"op": "set", "path": "/d/p", "value": {"t": v}}]) for v in range(1, 2001)]
    gc.collect()
    before = len(gc.get_objects())
    await journal.append("s", changes)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    tracemalloc.start()  # each entry an exact-size copy, not orjson's 4 KiB output buffer (dumps_kept)
    try:
        await journal.append("t", [Change(v, "phone", v, [{"op": "inc", "path": "/n"}]) for v in range(1, 1001)])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 500 * 1024, held  # 1000 entries: well under 0.5 KB each, not 4 KB
    assert await journal.read_after("s", 1990) == changes[1990:]
    await journal.trim("s", 1999)
    assert await journal.read_after("s", 0) == changes[1999:] and journal.session_bytes("s") > 0


async def test_an_ended_sessions_fence_is_forgotten_with_its_journal() -> None:
    """The fences map gained one entry per session ever seen (the soak's churn: 6,875 sessions in 30 min)."""
    journal = MemoryJournal()
    for i in range(100):
        journal.fences.raise_to(f"s{i}", 3)
        await journal.append(f"s{i}", [Change(1, "phone", 1, [{"op": "inc", "path": "/n"}])], token=3)
        await journal.delete(f"s{i}")
    assert not journal.fences._fences
