"""PostgreSQL storage (DESIGN §5, §8): session metadata, users, durable snapshots and the `postgres`-durability
journal, asyncpg on the bridge.

Migrations are the ordered plain SQL files in storage/migrations (`0001_init.sql`, ...), applied by `migrate()`
under an advisory lock (several pods may start at once) and recorded in `schema_version`, so running it again is a
no-op. The pool skips asyncpg's per-release reset query (`UNLISTEN *; RESET ALL; ...`, ~2.5x the cost of a query,
TRAPS.md): we never leave session state on pooled connections; asyncpg still rolls back an open transaction.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import orjson
import trio

from storage.bridge import Bridge, open_bridge
from storage.memory import Fences, decode_cursor, encode_cursor
from storage.metrics import JOURNAL_FIGURES, STORAGE_ERRORS, error_kind
from storage.ports import (
    MAX_JOURNAL_ENTRIES,
    Change,
    Fenced,
    JournalFull,
    JournalRefused,
    SessionRecord,
    Snapshot,
    StorageUnavailable,
    VersionConflict,
)
from storage.redis_store import (
    decode_change,
    decode_snapshot,
    encode_change,
    encode_snapshot,
)

T = TypeVar("T")

MIGRATION_LOCK_KEY = 0x5E55_10D0  # pg_advisory_lock key shared by every sessiond pod
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0
_KNOWN_USERS = 10_000  # bounded cache of subjects already recorded

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, query cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.InterfaceError,  # pool closing, connection lost mid-call
)


def migration_files() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration, in order."""
    found = []
    for entry in (resources.files("storage") / "migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_[\w-]+\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {[n for _, n, _ in found]}")
    return found


async def _run(bridge: Bridge, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    try:
        return await bridge.run(fn, *args)
    except _UNAVAILABLE as exc:
        STORAGE_ERRORS.labels("postgres", "unavailable").inc()
        raise StorageUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc


async def migrate(bridge: Bridge, dsn: str) -> list[int]:
    """Apply pending migrations (idempotent, serialised across pods); returns the versions applied now."""

    async def apply() -> list[int]:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
                applied = []
                for version, name, sql in migration_files():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)", version, name)
                    applied.append(version)
                return applied
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        finally:
            await conn.close()

    return await _run(bridge, apply)


async def migrate_url(dsn: str) -> list[int]:
    """`sessiond migrate`: open a bridge of its own, apply pending migrations, return the versions applied."""
    async with open_bridge() as bridge:
        return await migrate(bridge, dsn)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Cheap release: asyncpg already rolled back any open transaction; we keep no other session state."""


_COLUMNS = "id, owner, name, metadata, status, version, active, created_at, updated_at"


def _record(row: asyncpg.Record) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        owner=row["owner"],
        name=row["name"],
        metadata=row["metadata"],
        status=row["status"],
        version=row["version"],
        active=row["active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class PostgresSessionStore:
    """SessionStore port: metadata rows, owner listing by keyset pagination, users on first sight."""

    def __init__(self, bridge: Bridge, pool: asyncpg.Pool) -> None:
        self._bridge = bridge
        self._pool = pool
        self._known_users: OrderedDict[str, None] = OrderedDict()
        self.mirror: Fences | None = None  # an in-process journal's copy of the fences (durability=memory)

    async def create_session(self, record: SessionRecord) -> None:
        try:
            await _run(
                self._bridge,
                self._pool.execute,
                f"INSERT INTO sessions ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                *_values(record),
            )
        except asyncpg.UniqueViolationError as exc:
            raise ValueError(f"session {record.id} exists") from exc

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await _run(
            self._bridge, self._pool.fetchrow, f"SELECT {_COLUMNS} FROM sessions WHERE id = $1", session_id
        )
        return None if row is None else _record(row)

    async def list_sessions(self, owner: str, limit: int, cursor: str | None) -> tuple[list[SessionRecord], str | None]:
        if cursor is None:
            rows = await _run(
                self._bridge,
                self._pool.fetch,
                f"SELECT {_COLUMNS} FROM sessions WHERE owner = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
                owner,
                limit + 1,
            )
        else:
            created_at, last_id = decode_cursor(cursor)
            rows = await _run(
                self._bridge,
                self._pool.fetch,
                f"SELECT {_COLUMNS} FROM sessions WHERE owner = $1 AND (created_at, id) < ($2, $3)"
                " ORDER BY created_at DESC, id DESC LIMIT $4",
                owner,
                created_at,
                last_id,
                limit + 1,
            )
        page = [_record(r) for r in rows[:limit]]
        more = len(rows) > limit
        return page, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None

    async def count_sessions(self, owner: str) -> int:
        n = await _run(
            self._bridge,
            self._pool.fetchval,
            "SELECT count(*) FROM sessions WHERE owner = $1 AND status <> 'ended'",
            owner,
        )
        return int(n or 0)

    async def update_session(self, record: SessionRecord, token: int = 0) -> None:
        """Updates an existing row (a missing session stays missing, like the other backends); the fence check
        is part of the statement. Fenced when the row exists with a newer fence."""
        fence = await _run(
            self._bridge,
            self._pool.fetchval,
            "WITH updated AS (UPDATE sessions SET owner = $2, name = $3, metadata = $4, status = $5, version = $6,"
            " active = $7, created_at = $8, updated_at = $9 WHERE id = $1 AND epoch <= $10 RETURNING 1)"
            " SELECT epoch FROM sessions WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM updated)",
            *_values(record),
            token,
        )
        if fence is not None:
            STORAGE_ERRORS.labels("postgres", "fenced").inc()
            raise Fenced(f"postgresql: session {record.id}: token {token} is older than the fence {fence}")

    async def fence(self, session_id: str, token: int) -> int:
        current = await _run(self._bridge, self._pool.fetchval, "SELECT sessiond_fence($1, $2)", session_id, token)
        fence = token if current is None else int(current)
        if self.mirror is not None:
            self.mirror.raise_to(session_id, fence)
        return fence

    async def record_user(self, subject: str) -> None:
        if subject in self._known_users:
            self._known_users.move_to_end(subject)
            return
        await _run(
            self._bridge,
            self._pool.execute,
            "INSERT INTO users (subject) VALUES ($1) ON CONFLICT (subject) DO NOTHING",
            subject,
        )
        self._known_users[subject] = None
        if len(self._known_users) > _KNOWN_USERS:
            self._known_users.popitem(last=False)

    async def get_marker(self, key: str) -> str | None:
        value = await _run(
            self._bridge, self._pool.fetchval, "SELECT value FROM deployment_markers WHERE key = $1", key
        )
        return None if value is None else str(value)

    async def set_marker(self, key: str, value: str) -> None:
        await _run(
            self._bridge,
            self._pool.execute,
            "INSERT INTO deployment_markers (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )

    async def has_user(self, subject: str) -> bool:
        """For tests and admin: was this subject recorded?"""
        found = await _run(self._bridge, self._pool.fetchval, "SELECT 1 FROM users WHERE subject = $1", subject)
        return found is not None


def _values(r: SessionRecord) -> tuple[Any, ...]:
    return (r.id, r.owner, r.name, r.metadata, r.status, r.version, r.active, r.created_at, r.updated_at)


class PostgresSnapshotStore:
    """Durable snapshots: the newest per session (an older version never replaces a newer one)."""

    def __init__(self, bridge: Bridge, pool: asyncpg.Pool) -> None:
        self._bridge = bridge
        self._pool = pool

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        outcome = await _run(
            self._bridge,
            self._pool.fetchval,
            "SELECT sessiond_snapshot_save($1, $2, $3, $4)",
            snapshot.session_id,
            snapshot.version,
            encode_snapshot(snapshot),
            snapshot.epoch,
        )
        if outcome == "fenced":
            STORAGE_ERRORS.labels("postgres", "fenced").inc()
            raise Fenced(f"postgresql: snapshot of {snapshot.session_id}: token {snapshot.epoch} is fenced off")

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        raw = await _run(
            self._bridge, self._pool.fetchval, "SELECT data FROM snapshots WHERE session_id = $1", session_id
        )
        return None if raw is None else decode_snapshot(raw)

    async def delete_snapshots(self, session_id: str) -> None:
        await _run(self._bridge, self._pool.execute, "DELETE FROM snapshots WHERE session_id = $1", session_id)


_FIGURES = JOURNAL_FIGURES["postgres"]


def _refusal(session_id: str, reason: str) -> Exception:
    if reason == "full":
        return JournalFull(f"postgresql journal of {session_id} is full")
    if reason == "fenced":
        return Fenced(f"postgresql journal of {session_id}: a newer owner holds the session")
    return VersionConflict(f"postgresql journal of {session_id}: {reason}")


class PostgresJournal:
    """Journal port for SESSIOND_DURABILITY=postgres: an ack waits for the batch's COMMIT (migration 0002).

    Same contract as the Redis journal: `append` is one round trip (one call of `sessiond_journal_append`, one
    implicit transaction), all-or-nothing, versions strictly increasing per session, an identical retried batch is
    accepted again; growth past `max_entries` is refused with `JournalFull`. With `clamp_trim` (a fast Redis
    snapshot tier in front) `trim` never goes past the session's durable PostgreSQL snapshot, so losing Redis
    never loses a change: durable snapshot + this journal is always complete.
    """

    def __init__(
        self, bridge: Bridge, pool: asyncpg.Pool, *, max_entries: int = MAX_JOURNAL_ENTRIES, clamp_trim: bool = False
    ) -> None:
        self._bridge = bridge
        self._pool = pool
        self.max_entries = max_entries
        self.clamp_trim = clamp_trim

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        if changes:
            await self.append_many({session_id: changes}, {session_id: token})

    async def append_many(
        self, batches: Mapping[str, Sequence[Change]], tokens: Mapping[str, int] | None = None
    ) -> None:
        """The batches of several sessions in one round trip and one transaction (each all-or-nothing, each
        checked against its session's fence with its token from `tokens`, 0 when missing).

        With one session its error is raised as is; with several, `JournalRefused` names the refused ones (the
        others were written).
        """
        items = sorted((sid, ch) for sid, ch in batches.items() if ch)  # one lock order for every writer
        if not items:
            return
        tokens = tokens or {}
        sids: list[str] = []
        versions: list[int] = []
        datas: list[bytes] = []
        row_tokens: list[int] = []
        for sid, changes in items:
            token = tokens.get(sid, 0)
            for c in changes:
                sids.append(sid)
                versions.append(c.version)
                datas.append(encode_change(c))
                row_tokens.append(token)
        started = time.perf_counter()
        rows = await _run(
            self._bridge,
            self._pool.fetch,
            "SELECT refused_session, reason"
            " FROM sessiond_journal_append($1::text[], $2::bigint[], $3::bytea[], $4, $5::bigint[])",
            sids,
            versions,
            datas,
            self.max_entries,
            row_tokens,
        )
        elapsed = time.perf_counter() - started
        errors = {r["refused_session"]: _refusal(r["refused_session"], r["reason"]) for r in rows}
        _FIGURES.observe(elapsed, sum(len(ch) for sid, ch in items if sid not in errors))
        if not errors:
            return
        for exc in errors.values():
            STORAGE_ERRORS.labels("postgres", error_kind(exc)).inc()
        if len(items) == 1:
            raise next(iter(errors.values()))
        raise JournalRefused(errors)

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        rows = await _run(
            self._bridge,
            self._pool.fetch,
            "SELECT data FROM journal WHERE session_id = $1 AND version > $2 ORDER BY version",
            session_id,
            version,
        )
        return [decode_change(r["data"]) for r in rows]

    async def trim(self, session_id: str, upto_version: int) -> None:
        await _run(
            self._bridge,
            self._pool.execute,
            "SELECT sessiond_journal_trim($1, $2, $3)",
            session_id,
            upto_version,
            self.clamp_trim,
        )

    async def delete(self, session_id: str) -> None:
        await _run(self._bridge, self._pool.execute, "SELECT sessiond_journal_delete($1)", session_id)

    async def holds_changes(self) -> bool:
        """Whether any session's journal holds entries (a switch of durability mode must not ignore them)."""
        found = await _run(self._bridge, self._pool.fetchval, "SELECT EXISTS (SELECT 1 FROM journal)")
        return bool(found)

    async def length(self, session_id: str) -> int:
        """Entries currently held (for metrics and tests)."""
        n = await _run(
            self._bridge, self._pool.fetchval, "SELECT entries FROM journal_heads WHERE session_id = $1", session_id
        )
        return int(n or 0)


class PostgresHealth:
    def __init__(self, bridge: Bridge, pool: asyncpg.Pool) -> None:
        self._bridge = bridge
        self._pool = pool

    async def ping(self) -> None:
        await _run(self._bridge, self._pool.fetchval, "SELECT 1")


@dataclass(frozen=True, slots=True)
class PostgresBackend:
    pool: asyncpg.Pool
    sessions: PostgresSessionStore
    snapshots: PostgresSnapshotStore
    health: PostgresHealth
    journal: PostgresJournal


@asynccontextmanager
async def open_postgres(
    bridge: Bridge,
    dsn: str,
    *,
    run_migrations: bool = True,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = COMMAND_TIMEOUT_S,
    max_journal_entries: int = MAX_JOURNAL_ENTRIES,
    clamp_journal_trim: bool = False,
) -> AsyncIterator[PostgresBackend]:
    """Migrate (by default), open a bounded pool on the bridge loop, and close it on exit."""
    if run_migrations:
        await migrate(bridge, dsn)

    async def make() -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_no_reset,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=command_timeout,
        )
        return pool

    pool = await _run(bridge, make)

    async def close() -> None:
        try:
            await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            pool.terminate()

    try:
        yield PostgresBackend(
            pool=pool,
            sessions=PostgresSessionStore(bridge, pool),
            snapshots=PostgresSnapshotStore(bridge, pool),
            health=PostgresHealth(bridge, pool),
            journal=PostgresJournal(bridge, pool, max_entries=max_journal_entries, clamp_trim=clamp_journal_trim),
        )
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CONNECT_TIMEOUT_S + 1.0):
            await bridge.run(close)
