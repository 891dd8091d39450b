"""One behaviour for every storage backend (the `storage` fixture runs each test per backend)."""

from __future__ import annotations

import base64
import uuid

import pytest
import trio

from storage.ports import (
    MAX_JOURNAL_ENTRIES,
    Change,
    Fenced,
    JournalFull,
    LeaseHeld,
    Member,
    SessionRecord,
    Snapshot,
    Storage,
    save_durable,
)


def uid(prefix: str = "") -> str:
    """Fresh ids, so tests never see each other's rows on a shared server."""
    return f"{prefix}{uuid.uuid4().hex}"


def record(owner: str, created_at: float = 1_700_000_000.5, **kw: object) -> SessionRecord:
    fields: dict[str, object] = {
        "id": uid("s-"),
        "owner": owner,
        "name": "board",
        "metadata": {"color": "blue", "tags": ["a", "b"], "n": 1.5},
        "status": "active",
        "version": 0,
        "active": None,
        "created_at": created_at,
        "updated_at": created_at,
    }
    fields.update(kw)
    return SessionRecord(**fields)  # type: ignore[arg-type]


# --- sessions -------------------------------------------------------------------------------------


async def test_create_then_get_round_trips(storage: Storage) -> None:
    rec = record(uid("u-"), active="phone-1", version=7, metadata={"nested": {"x": [1, None, True]}})
    await storage.sessions.create_session(rec)
    assert await storage.sessions.get_session(rec.id) == rec


async def test_get_missing_is_none(storage: Storage) -> None:
    assert await storage.sessions.get_session(uid("missing-")) is None


async def test_create_existing_id_raises_value_error(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.create_session(rec)
    with pytest.raises(ValueError):
        await storage.sessions.create_session(record(rec.owner, id=rec.id, name="other"))
    assert await storage.sessions.get_session(rec.id) == rec


async def test_update_replaces_fields(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.create_session(rec)
    new = record(
        rec.owner,
        id=rec.id,
        created_at=rec.created_at,
        name="renamed",
        metadata={},
        status="paused",
        version=42,
        active="laptop",
        updated_at=rec.created_at + 10,
    )
    await storage.sessions.update_session(new)
    assert await storage.sessions.get_session(rec.id) == new


async def test_update_unknown_session_creates_nothing(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.update_session(rec)
    assert await storage.sessions.get_session(rec.id) is None


async def test_list_pages_newest_first_only_owner(storage: Storage) -> None:
    owner, other = uid("u-"), uid("u-")
    made = []
    # Distinct times plus a tie on created_at (ordered by id desc then).
    for i, t in enumerate([10.0, 20.0, 30.0, 30.0, 30.0, 40.25, 50.0]):
        rec = record(owner, created_at=1_700_000_000 + t, id=f"{owner}-{i}")
        made.append(rec)
        await storage.sessions.create_session(rec)
    for t in (15.0, 35.0, 60.0):
        await storage.sessions.create_session(record(other, created_at=1_700_000_000 + t))
    expected = sorted(made, key=lambda r: (r.created_at, r.id), reverse=True)

    seen: list[SessionRecord] = []
    pages = []
    cursor: str | None = None
    while True:
        page, cursor = await storage.sessions.list_sessions(owner, 3, cursor)
        pages.append(len(page))
        seen.extend(page)
        if cursor is None:
            break
    assert pages == [3, 3, 1]
    assert seen == expected


async def test_list_exact_page_has_no_next(storage: Storage) -> None:
    owner = uid("u-")
    for i in range(3):
        await storage.sessions.create_session(record(owner, created_at=100.0 + i))
    page, nxt = await storage.sessions.list_sessions(owner, 3, None)
    assert [r.created_at for r in page] == [102.0, 101.0, 100.0]
    assert nxt is None


async def test_list_unknown_owner_is_empty(storage: Storage) -> None:
    assert await storage.sessions.list_sessions(uid("nobody-"), 10, None) == ([], None)


@pytest.mark.parametrize("cursor", ["%%%", "not a cursor", base64.urlsafe_b64encode(b"garbage|x").decode(), "\xff"])
async def test_list_bad_cursor_raises_value_error(storage: Storage, cursor: str) -> None:
    with pytest.raises(ValueError):
        await storage.sessions.list_sessions(uid("u-"), 10, cursor)


async def test_record_user_is_idempotent(storage: Storage) -> None:
    subject = uid("sub-")
    await storage.sessions.record_user(subject)
    await storage.sessions.record_user(subject)
    await storage.sessions.record_user(uid("sub-"))


# --- snapshots ------------------------------------------------------------------------------------


def snapshot(session_id: str, version: int, **kw: object) -> Snapshot:
    fields: dict[str, object] = {
        "session_id": session_id,
        "version": version,
        "state": {"v": version, "doc": {"title": "héllo ✓", "items": [1, 2.5, None, False]}},
        "status": "active",
        "active": "phone",
        "acked": {"phone": [[1, 1], [2, version]], "web": []},
    }
    fields.update(kw)
    return Snapshot(**fields)  # type: ignore[arg-type]


async def test_snapshot_save_load(storage: Storage) -> None:
    sid = uid("s-")
    assert await storage.snapshots.load_snapshot(sid) is None
    snap = snapshot(sid, 3, active=None, status="paused")
    await storage.snapshots.save_snapshot(snap)
    assert await storage.snapshots.load_snapshot(sid) == snap


async def test_snapshot_newer_wins(storage: Storage) -> None:
    sid = uid("s-")
    await storage.snapshots.save_snapshot(snapshot(sid, 5))
    await storage.snapshots.save_snapshot(snapshot(sid, 3))
    assert (await storage.snapshots.load_snapshot(sid)) == snapshot(sid, 5)
    await storage.snapshots.save_snapshot(snapshot(sid, 9))
    assert (await storage.snapshots.load_snapshot(sid)) == snapshot(sid, 9)


async def test_snapshot_same_version_replaces(storage: Storage) -> None:
    """A handoff writes a snapshot at the current version with a new `active`."""
    sid = uid("s-")
    await storage.snapshots.save_snapshot(snapshot(sid, 4, active="phone"))
    await storage.snapshots.save_snapshot(snapshot(sid, 4, active="laptop", status="paused"))
    assert await storage.snapshots.load_snapshot(sid) == snapshot(sid, 4, active="laptop", status="paused")


async def test_snapshot_delete(storage: Storage) -> None:
    sid, keep = uid("s-"), uid("s-")
    await storage.snapshots.save_snapshot(snapshot(sid, 1))
    await storage.snapshots.save_snapshot(snapshot(keep, 1))
    await storage.snapshots.delete_snapshots(sid)
    await storage.snapshots.delete_snapshots(uid("never-"))
    assert await storage.snapshots.load_snapshot(sid) is None
    assert await storage.snapshots.load_snapshot(keep) == snapshot(keep, 1)
    # After a delete an older version may be saved again (a re-created session starts over).
    await storage.snapshots.save_snapshot(snapshot(sid, 0))
    assert await storage.snapshots.load_snapshot(sid) == snapshot(sid, 0)


# --- journal --------------------------------------------------------------------------------------


def change(version: int, device: str = "phone") -> Change:
    return Change(
        version=version,
        device=device,
        op_id=version * 10,
        ops=[{"op": "inc", "path": "/n", "by": 1}, {"op": "set", "path": "/a/b", "value": {"x": version}}],
    )


async def test_journal_append_read_after_in_order(storage: Storage) -> None:
    sid, other = uid("s-"), uid("s-")
    await storage.journal.append(sid, [change(1), change(2)])
    await storage.journal.append(sid, [change(3, "web")])
    await storage.journal.append(sid, [])
    await storage.journal.append(other, [change(1, "other")])
    assert await storage.journal.read_after(sid, 0) == [change(1), change(2), change(3, "web")]
    assert await storage.journal.read_after(sid, 2) == [change(3, "web")]
    assert await storage.journal.read_after(sid, 3) == []
    assert await storage.journal.read_after(uid("none-"), 0) == []
    assert await storage.journal.read_after(other, 0) == [change(1, "other")]


async def test_journal_op_id_may_be_none(storage: Storage) -> None:
    sid = uid("s-")
    entry = Change(version=1, device="rest", op_id=None, ops=[{"op": "del", "path": "/x"}])
    await storage.journal.append(sid, [entry])
    assert await storage.journal.read_after(sid, 0) == [entry]


async def test_journal_trim_then_append(storage: Storage) -> None:
    sid = uid("s-")
    await storage.journal.append(sid, [change(v) for v in range(1, 6)])
    await storage.journal.trim(sid, 3)
    assert await storage.journal.read_after(sid, 0) == [change(4), change(5)]
    await storage.journal.append(sid, [change(6)])
    assert await storage.journal.read_after(sid, 4) == [change(5), change(6)]
    await storage.journal.trim(sid, 6)
    assert await storage.journal.read_after(sid, 0) == []
    await storage.journal.trim(uid("none-"), 10)


async def test_journal_delete(storage: Storage) -> None:
    sid, other = uid("s-"), uid("s-")
    await storage.journal.append(sid, [change(1), change(2)])
    await storage.journal.append(other, [change(1)])
    await storage.journal.delete(sid)
    await storage.journal.delete(uid("none-"))
    assert await storage.journal.read_after(sid, 0) == []
    assert await storage.journal.read_after(other, 0) == [change(1)]
    await storage.journal.append(sid, [change(1)])
    assert await storage.journal.read_after(sid, 0) == [change(1)]


# --- health ---------------------------------------------------------------------------------------


async def test_health_pings_succeed(storage: Storage) -> None:
    for probe in storage.health:
        await probe.ping()


# --- fencing (DESIGN §6): a newer owner's token refuses the writes of an older one, in every store -----------


async def take_over(storage: Storage, session_id: str, pod: str = "pod-a") -> int:
    """What a new owner does (actors/leases.py): a lease token, then the session store's fence raised to it."""
    assert storage.leases is not None
    token = await storage.leases.acquire(session_id, pod, 30.0)
    assert await storage.sessions.fence(session_id, token) == token
    return token


async def test_a_newer_token_fences_every_write_of_an_older_one(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.create_session(rec)
    sid = rec.id
    old = await take_over(storage, sid)
    await storage.journal.append(sid, [change(1), change(2)], old)
    await storage.snapshots.save_snapshot(snapshot(sid, 1, epoch=old))  # may trim the journal up to 1
    await save_durable(storage.snapshots, snapshot(sid, 1, epoch=old))
    await storage.sessions.update_session(record(rec.owner, id=sid, version=1), old)
    new = await take_over(storage, sid)
    assert new > old
    with pytest.raises(Fenced):
        await storage.journal.append(sid, [change(3)], old)
    with pytest.raises(Fenced):
        await storage.snapshots.save_snapshot(snapshot(sid, 2, epoch=old))
    with pytest.raises(Fenced):
        await save_durable(storage.snapshots, snapshot(sid, 2, epoch=old))
    with pytest.raises(Fenced):
        await storage.sessions.update_session(record(rec.owner, id=sid, version=2, name="stale"), old)
    # Nothing of the stale writer landed ...
    assert await storage.journal.read_after(sid, 1) == [change(2)]
    loaded = await storage.snapshots.load_snapshot(sid)
    assert loaded is not None and loaded.version == 1
    stored = await storage.sessions.get_session(sid)
    assert stored is not None and (stored.version, stored.name) == (1, rec.name)
    # ... and the new owner writes as usual.
    await storage.journal.append(sid, [change(3)], new)
    await save_durable(storage.snapshots, snapshot(sid, 2, epoch=new))
    await storage.sessions.update_session(record(rec.owner, id=sid, version=2), new)
    assert await storage.journal.read_after(sid, 2) == [change(3)]


async def test_fence_never_lowers_and_unknown_sessions_take_the_token(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.create_session(rec)
    assert await storage.sessions.fence(rec.id, 10) == 10
    assert await storage.sessions.fence(rec.id, 5) == 10
    assert await storage.sessions.fence(uid("missing-"), 7) == 7
    with pytest.raises(Fenced):
        await storage.sessions.update_session(rec, 9)


async def test_creation_writes_with_token_zero_before_any_owner(storage: Storage) -> None:
    rec = record(uid("u-"))
    await storage.sessions.create_session(rec)
    await save_durable(storage.snapshots, snapshot(rec.id, 0))
    await storage.sessions.update_session(rec)
    assert await storage.snapshots.load_snapshot(rec.id) == snapshot(rec.id, 0)


# --- leases, membership and the relay channels ------------------------------------------------------------


async def test_lease_is_exclusive_until_released_and_tokens_grow(storage: Storage) -> None:
    assert storage.leases is not None
    sid = uid("s-")
    first = await storage.leases.acquire(sid, "pod-a", 30.0)
    with pytest.raises(LeaseHeld) as held:
        await storage.leases.acquire(sid, "pod-b", 30.0)
    assert held.value.holder == "pod-a"
    assert await storage.leases.renew({sid: first}, "pod-a", 30.0) == set()
    assert await storage.leases.renew({sid: first}, "pod-b", 30.0) == {sid}  # not pod-b's
    again = await storage.leases.acquire(sid, "pod-a", 30.0)  # the holder itself: a new token
    assert again > first
    assert await storage.leases.renew({sid: first}, "pod-a", 30.0) == {sid}  # the old token is gone
    await storage.leases.release(sid, "pod-a", first)  # not the current token: no effect
    with pytest.raises(LeaseHeld):
        await storage.leases.acquire(sid, "pod-b", 30.0)
    await storage.leases.release(sid, "pod-a", again)
    taken = await storage.leases.acquire(sid, "pod-b", 30.0, floor=again + 100)
    assert taken > again + 100


async def test_lease_expires_after_its_ttl(storage: Storage) -> None:
    assert storage.leases is not None
    sid = uid("s-")
    await storage.leases.acquire(sid, "pod-a", 0.2)
    with trio.fail_after(5):
        while True:
            try:
                await storage.leases.acquire(sid, "pod-b", 30.0)
                break
            except LeaseHeld:
                await trio.sleep(0.05)


async def test_membership_lists_live_pods_and_forgets_leavers(storage: Storage) -> None:
    assert storage.membership is not None
    a, b = Member(uid("pod-a-")), Member(uid("pod-b-"), leaving=True, shareable=False, started_at=12.5)
    await storage.membership.heartbeat(b, 30.0)
    seen = {m.pod: m for m in await storage.membership.heartbeat(a, 30.0)}
    assert seen[a.pod] == a and seen[b.pod] == b
    await storage.membership.leave(b.pod)
    assert b.pod not in {m.pod for m in await storage.membership.heartbeat(a, 30.0)}
    short = Member(uid("pod-c-"))
    await storage.membership.heartbeat(short, 0.2)
    with trio.fail_after(5):
        while short.pod in {m.pod for m in await storage.membership.heartbeat(a, 30.0)}:
            await trio.sleep(0.05)
    await storage.membership.leave(a.pod)


async def test_pubsub_delivers_in_order_to_the_subscribed_pod_only(storage: Storage) -> None:
    assert storage.pubsub is not None
    pod, other = uid("pod-"), uid("pod-")
    async with storage.pubsub.subscribe(pod) as subscription:
        await storage.pubsub.publish([(pod, b"1"), (other, b"lost"), (pod, b"2")])
        await storage.pubsub.publish([(pod, b"3")])
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < 3:
                messages, gap = await subscription.receive()
                assert not gap
                got.extend(messages)
        assert got == [b"1", b"2", b"3"]


async def test_a_journal_refuses_growth_past_its_cap(storage: Storage) -> None:
    """Snapshots trim the journal; when they keep failing, growth stops with JournalFull (a StorageUnavailable)
    instead of filling memory or disk. Every backend has the same cap."""
    sid = uid("s-")
    cap = MAX_JOURNAL_ENTRIES
    await storage.journal.append(sid, [change(v) for v in range(1, cap + 1)])
    with pytest.raises(JournalFull):
        await storage.journal.append(sid, [change(cap + 1)])
    assert len(await storage.journal.read_after(sid, cap - 1)) == 1
    await storage.journal.trim(sid, cap)
    await storage.journal.append(sid, [change(cap + 1)])
