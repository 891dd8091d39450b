"""The embedded default store: session metadata, users and snapshots in one SQLite file.

SQLite calls block, so every statement (and the orjson work around it) runs in a worker thread,
one call at a time under a `CapacityLimiter(1)`: the trio thread never waits on the disk, and the
single connection is never used by two threads at once. The journal stays in memory (storage/memory.py);
only what the newest snapshot holds survives a process crash.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import orjson
import outcome
import trio

from storage.memory import (
    Fences,
    MemoryEventSink,
    MemoryJournal,
    MemoryLeases,
    MemoryMembership,
    MemoryPubSub,
    decode_cursor,
    encode_cursor,
)
from storage.ports import Fenced, SessionRecord, Snapshot, Storage, StorageUnavailable

EMBEDDED_EVENTS = 256  # lifecycle events an embedded pod keeps in memory (nothing reads more; 10k held MBs)
DB_FILE = "sessiond.db"
BUSY_TIMEOUT_MS = 5_000

T = TypeVar("T")

# Ordered migrations: entry i takes the schema from version i to i + 1. Only ever append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE users (subject TEXT PRIMARY KEY, first_seen REAL NOT NULL)",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            metadata TEXT NOT NULL,
            status TEXT NOT NULL,
            version INTEGER NOT NULL,
            active TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_owner_created ON sessions (owner, created_at DESC, id DESC)",
        """CREATE TABLE snapshots (
            session_id TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            state TEXT NOT NULL,
            status TEXT NOT NULL,
            active TEXT,
            acked TEXT NOT NULL
        )""",
    ),
    (
        # The session's fence (DESIGN §6): the newest fencing token; writes with an older one are refused.
        "ALTER TABLE sessions ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE snapshots ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
    ),
    ("CREATE TABLE markers (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
)


def _is_io_failure(exc: BaseException) -> bool:
    """Locked, unreadable, full or corrupt database: the backend cannot serve (not a caller bug)."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to len(MIGRATIONS), one transaction per step (safe against a second opener)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current >= len(MIGRATIONS):
                conn.execute("COMMIT")
                return
            for statement in MIGRATIONS[current]:
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the file in WAL mode and migrate it; runs in the worker thread."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # isolation_level=None: autocommit; multi-statement work opens its own transaction.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class _Call(Generic[T]):
    """One queued `SqliteDatabase.run` call and, once the worker thread ran it, its outcome."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None

    def outcome(self) -> T:
        if self.error is not None:
            exc = self.error
            if isinstance(exc, sqlite3.Error | OSError) and (isinstance(exc, OSError) or _is_io_failure(exc)):
                raise StorageUnavailable(f"SQLite store: {exc}") from exc
            raise exc
        return cast(T, self.result)


class SqliteDatabase:
    """One connection, used by one worker thread at a time; also the Health probe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Call[Any]] = []
        self._draining = False
        self._idle = trio.Event()

    async def open(self) -> None:
        def connect() -> None:
            self._conn = _connect(self.path)

        await self._run_raw(connect)

    async def close(self) -> None:
        """Close once every queued call has run: the close is queued behind them like any call, so it never takes
        the connection from under a batch (shielded: closing must happen even when cancelled)."""

        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None  # the calls after it in its batch, and every later one, find the store closed

        with trio.CancelScope(shield=True), contextlib.suppress(StorageUnavailable):  # closed already
            await self.run(close)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` in the worker thread; I/O failures become StorageUnavailable.

        Calls that arrive while the thread is busy are combined: the next thread hop runs all of them
        (each in its own transaction, in arrival order). A hop costs more than a small write, so under
        load (checkpoints of many sessions, handoffs) this multiplies what one thread can do.
        """
        call = _Call(fn)
        self._pending.append(call)
        while not call.done:
            if self._draining:
                await self._idle.wait()
                continue
            self._draining = True
            self._idle = trio.Event()
            batch, self._pending = self._pending, []
            try:
                await self._hop(functools.partial(self._execute, batch))
            except BaseException:
                # The batch did not run to its end (`_execute` keeps each call's own error, so only something
                # like a KeyboardInterrupt gets here): whatever did not run goes back to the front.
                self._pending[:0] = [c for c in batch if not c.done]
                raise
            finally:
                self._draining = False
                self._idle.set()
        return call.outcome()

    def _execute(self, batch: list[_Call[Any]]) -> None:
        """In the worker thread: every call of the batch, each with its own result or error."""
        for call in batch:
            if self._conn is None:
                call.error = StorageUnavailable(f"SQLite store {self.path} is closed")
            else:
                try:
                    call.result = call.fn(self._conn)
                except Exception as exc:
                    call.error = exc
            call.done = True

    async def _hop(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a worker thread (trio's thread cache) and wait for it, with no pass of the run loop before
        it starts: trio.to_thread checkpoints and takes its limiter first, two passes that under load held a
        handoff's snapshot ~4 ms before the thread even began (its batch then ran in 1.6 ms). The wait is not
        cancellable, as to_thread's is not: the batch runs to its end and each call keeps its outcome. One hop
        at a time (`_draining`) is what gives the thread the connection alone."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits any more
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(fn, deliver)
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    async def _run_raw(self, fn: Callable[[], T]) -> T:
        try:
            return await self._hop(fn)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, OSError) or _is_io_failure(exc):
                raise StorageUnavailable(f"SQLite store {self.path}: {exc}") from exc
            raise

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())


_SESSION_COLUMNS = "id, owner, name, metadata, status, version, active, created_at, updated_at"


def _session_row(record: SessionRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.owner,
        record.name,
        _dumps(record.metadata),
        record.status,
        record.version,
        record.active,
        record.created_at,
        record.updated_at,
    )


def _session_from_row(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(
        id=row[0],
        owner=row[1],
        name=row[2],
        metadata=orjson.loads(row[3]),
        status=row[4],
        version=row[5],
        active=row[6],
        created_at=row[7],
        updated_at=row[8],
    )


def _create_session(conn: sqlite3.Connection, record: SessionRecord) -> None:
    try:
        conn.execute(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", _session_row(record)
        )
    except sqlite3.IntegrityError as exc:
        raise ValueError(f"session {record.id} exists") from exc


def _check_fence(conn: sqlite3.Connection, session_id: str, token: int) -> None:
    row = conn.execute("SELECT epoch FROM sessions WHERE id=?", (session_id,)).fetchone()
    if row is not None and row[0] > token:
        raise Fenced(f"session {session_id}: token {token} is older than the fence {row[0]}")


def _update_session(conn: sqlite3.Connection, record: SessionRecord, token: int) -> None:
    row = _session_row(record)
    # One statement checks and writes (never a read-then-write); a refused update is told from a missing row.
    done = conn.execute(
        "UPDATE sessions SET owner=?, name=?, metadata=?, status=?, version=?, active=?, created_at=?,"
        " updated_at=? WHERE id=? AND epoch <= ?",
        (*row[1:], row[0], token),
    ).rowcount
    if not done:
        _check_fence(conn, record.id, token)


def _fence(conn: sqlite3.Connection, session_id: str, token: int) -> int:
    conn.execute("UPDATE sessions SET epoch = max(epoch, ?) WHERE id=?", (token, session_id))
    row = conn.execute("SELECT epoch FROM sessions WHERE id=?", (session_id,)).fetchone()
    return token if row is None else int(row[0])


def _get_session(conn: sqlite3.Connection, session_id: str) -> SessionRecord | None:
    row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=?", (session_id,)).fetchone()
    return None if row is None else _session_from_row(row)


def _list_sessions(
    conn: sqlite3.Connection, owner: str, limit: int, after: tuple[float, str] | None
) -> tuple[list[SessionRecord], str | None]:
    if after is None:
        rows = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE owner=?"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (owner, limit + 1),
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE owner=? AND (created_at, id) < (?, ?)"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (owner, after[0], after[1], limit + 1),
        ).fetchall()
    page = [_session_from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    return page, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None


class SqliteSessionStore:
    """SessionStore on the `sessions` and `users` tables."""

    def __init__(self, db: SqliteDatabase, fences: Fences | None = None) -> None:
        self._db = db
        self._fences = fences  # the in-memory journal's copy of the fences

    @property
    def db(self) -> SqliteDatabase:
        return self._db

    async def create_session(self, record: SessionRecord) -> None:
        await self._db.run(functools.partial(_create_session, record=record))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._db.run(functools.partial(_get_session, session_id=session_id))

    async def list_sessions(
        self, owner: str, limit: int, cursor: str | None
    ) -> tuple[list[SessionRecord], str | None]:
        after = None if cursor is None else decode_cursor(cursor)  # ValueError before any I/O
        return await self._db.run(
            functools.partial(_list_sessions, owner=owner, limit=max(limit, 0), after=after)
        )

    async def count_sessions(self, owner: str) -> int:
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT count(*) FROM sessions WHERE owner=? AND status <> 'ended'", (owner,)
            ).fetchone()
        )
        return int(row[0])

    async def update_session(self, record: SessionRecord, token: int = 0) -> None:
        await self._db.run(functools.partial(_update_session, record=record, token=token))

    async def fence(self, session_id: str, token: int) -> int:
        current = await self._db.run(functools.partial(_fence, session_id=session_id, token=token))
        if self._fences is not None:
            self._fences.raise_to(session_id, current)
        return current

    async def get_marker(self, key: str) -> str | None:
        row = await self._db.run(lambda conn: conn.execute("SELECT value FROM markers WHERE key=?", (key,)).fetchone())
        return None if row is None else str(row[0])

    async def set_marker(self, key: str, value: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "INSERT INTO markers (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
        )

    async def record_user(self, subject: str) -> None:
        first_seen = time.time()
        await self._db.run(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO users (subject, first_seen) VALUES (?, ?)", (subject, first_seen)
            )
        )


def _save_snapshot(conn: sqlite3.Connection, snapshot: Snapshot) -> None:
    # Serialised here, in the worker thread: a 1 MiB state costs the trio thread nothing. The fence check and
    # the write share one transaction (this connection is the only writer of the file).
    conn.execute("BEGIN IMMEDIATE")
    try:
        _write_snapshot(conn, snapshot)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_snapshot(conn: sqlite3.Connection, snapshot: Snapshot) -> None:
    """The fence check and the upsert, inside the caller's transaction."""
    _check_fence(conn, snapshot.session_id, snapshot.epoch)
    conn.execute(
        "INSERT INTO snapshots (session_id, version, state, status, active, acked, epoch)"
        " VALUES (?,?,?,?,?,?,?)"
        " ON CONFLICT (session_id) DO UPDATE SET version=excluded.version, state=excluded.state,"
        " status=excluded.status, active=excluded.active, acked=excluded.acked, epoch=excluded.epoch"
        " WHERE excluded.version >= snapshots.version",
        (
            snapshot.session_id,
            snapshot.version,
            _dumps(snapshot.state),
            snapshot.status,
            snapshot.active,
            _dumps(snapshot.acked),
            snapshot.epoch,
        ),
    )


def _save_snapshot_and_record(
    conn: sqlite3.Connection, snapshot: Snapshot, record: SessionRecord, token: int
) -> None:
    """A durable checkpoint in one transaction: the snapshot (fenced by its epoch), then the record (by `token`)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _write_snapshot(conn, snapshot)
        _update_session(conn, record, token)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _load_snapshot(conn: sqlite3.Connection, session_id: str) -> Snapshot | None:
    row = conn.execute(
        "SELECT version, state, status, active, acked, epoch FROM snapshots WHERE session_id=?", (session_id,)
    ).fetchone()
    if row is None:
        return None
    return Snapshot(
        session_id=session_id,
        version=row[0],
        state=orjson.loads(row[1]),
        status=row[2],
        active=row[3],
        acked=orjson.loads(row[4]),
        epoch=row[5],
    )


class SqliteSnapshotStore:
    """SnapshotStore keeping only the newest snapshot per session."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._db.run(functools.partial(_save_snapshot, snapshot=snapshot))

    def joint_checkpoint_writer(
        self, sessions: object
    ) -> Callable[[Snapshot, SessionRecord, int], Awaitable[None]] | None:
        """`save_with_record` when `sessions` keeps its records in this same file (ports.save_durable_checkpoint)."""
        return self.save_with_record if isinstance(sessions, SqliteSessionStore) and sessions.db is self._db else None

    async def save_with_record(self, snapshot: Snapshot, record: SessionRecord, token: int) -> None:
        """Snapshot and session record in one transaction, one thread hop."""
        await self._db.run(
            functools.partial(_save_snapshot_and_record, snapshot=snapshot, record=record, token=token)
        )

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        return await self._db.run(functools.partial(_load_snapshot, session_id=session_id))

    async def delete_snapshots(self, session_id: str) -> None:
        await self._db.run(
            lambda conn: conn.execute("DELETE FROM snapshots WHERE session_id=?", (session_id,))
        )


@asynccontextmanager
async def open_sqlite_storage(data_dir: Path) -> AsyncIterator[Storage]:
    """The embedded Storage in `data_dir/sessiond.db` (directory made 0700); closes the file on exit."""
    db = SqliteDatabase(Path(data_dir) / DB_FILE)
    await db.open()
    fences = Fences()
    try:
        yield Storage(
            sessions=SqliteSessionStore(db, fences),
            snapshots=SqliteSnapshotStore(db),
            journal=MemoryJournal(fences),
            events=MemoryEventSink(EMBEDDED_EVENTS),  # no broker: the newest few, for a debugger only
            health=(db,),
            # A cluster of one: the file and the in-memory journal belong to this process alone.
            leases=MemoryLeases(),
            membership=MemoryMembership(),
            pubsub=MemoryPubSub(),
            shareable=False,
        )
    finally:
        await db.close()
