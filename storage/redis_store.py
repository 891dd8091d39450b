"""Redis journal + latest snapshot (DESIGN §5 guarantee 2), redis.asyncio driven through the bridge, but for the
group commit on a plain Redis, which writes on a trio connection of its own, and snapshot writes and journal
trims (every handoff), which share a second one (storage/redis_trio.py).

Keys: every key of one session shares its hash tag, `{prefix}{SID}:...` (prefix default "sessiond:"), so one
session's scripts run on one Redis Cluster node and no script or transaction ever spans sessions (DESIGN §6):
- `{prefix}{SID}:j`: the journal, a Redis **stream** whose entry ids are `{version}-0`. Why a stream: Redis itself
  then refuses an id that does not grow (a stale writer cannot slip an old version in), reads by version are
  `XRANGE (v+1)-0 +` (O(log n)), trimming by version is `XTRIM MINID`, and entries sit in compact listpacks.
- `{prefix}{SID}:s`: the latest snapshot, a hash `{v: version, d: orjson bytes}`; a Lua script replaces it only
  when not older, and trims the journal up to it in the same step.
- `{prefix}{SID}:epoch`: the session's fence, the counter behind its lease tokens (storage/redis_cluster.py). The
  append and snapshot scripts refuse a token older than it (`Fenced`), inside Redis, never by read-then-write.

Group commit: `append` is one Lua call (a batch is all-or-nothing, and a retried batch that already landed is
accepted again unchanged: acks may be retried safely). `append_many` puts the batches of several sessions into
one pipelined round trip (per node on a cluster), each session's script atomic on its own. Each journal is
bounded (`max_entries`): growth beyond is refused with `JournalFull`, since it means snapshots stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
import trio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.bridge import Bridge
from storage.metrics import JOURNAL_FIGURES, STORAGE_ERRORS, error_kind
from storage.ports import (
    MAX_JOURNAL_ENTRIES,
    Change,
    Fenced,
    JournalFull,
    JournalRefused,
    Snapshot,
    StorageUnavailable,
    VersionConflict,
)
from storage.redis_trio import TrioCommandQueue, TrioRedisConnection, supported

T = TypeVar("T")

DEFAULT_PREFIX = "sessiond:"
SOCKET_TIMEOUT_S = 2.0

_FIGURES = JOURNAL_FIGURES["redis"]


# KEYS[1] journal, KEYS[2] fence; ARGV[1] cap, ARGV[2] token; ARGV[2k+1], ARGV[2k+2] = version, payload.
# Checks everything before writing.
_APPEND = """
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence > tonumber(ARGV[2]) then return redis.error_reply('FENCED token ' .. ARGV[2] .. ' < ' .. fence) end
local key = KEYS[1]
local cap = tonumber(ARGV[1])
local last = 0
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = tonumber(string.match(info[i + 1], '^(%d+)')) end
  end
end
local new = {}
local prev = last
for i = 3, #ARGV, 2 do
  local v = tonumber(ARGV[i])
  if v <= last then
    local got = redis.call('XRANGE', key, v .. '-0', v .. '-0')
    if #got == 0 or got[1][2][2] ~= ARGV[i + 1] then
      return redis.error_reply('VERSION ' .. v .. ' is not after ' .. last)
    end
  else
    if v <= prev then return redis.error_reply('VERSION order ' .. v .. ' after ' .. prev) end
    prev = v
    new[#new + 1] = i
  end
end
if #new > 0 and redis.call('XLEN', key) + #new > cap then
  return redis.error_reply('JOURNAL_FULL ' .. key)
end
for _, i in ipairs(new) do redis.call('XADD', key, ARGV[i] .. '-0', 'd', ARGV[i + 1]) end
return #new
"""
_APPEND_BYTES = _APPEND.encode()

# KEYS[1] snapshot hash, KEYS[2] journal, KEYS[3] fence; ARGV = version, data, trim flag, token. Equal versions
# replace (handoff).
_SAVE_SNAPSHOT = """
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if fence > tonumber(ARGV[4]) then return redis.error_reply('FENCED token ' .. ARGV[4] .. ' < ' .. fence) end
local cur = redis.call('HGET', KEYS[1], 'v')
local v = tonumber(ARGV[1])
if cur and tonumber(cur) > v then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XTRIM', KEYS[2], 'MINID', (v + 1) .. '-0')
end
return 1
"""


def encode_change(change: Change) -> bytes:
    return orjson.dumps({"v": change.version, "d": change.device, "i": change.op_id, "o": change.ops})


def decode_change(raw: bytes) -> Change:
    d = orjson.loads(raw)
    return Change(version=d["v"], device=d["d"], op_id=d["i"], ops=d["o"])


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """orjson encodes the dataclass itself: the same bytes as `dataclasses.asdict` first, without its deep copy
    (about 250 µs for a small snapshot with full idempotency tables, on the trio thread at every handoff)."""
    return orjson.dumps(snapshot)


def decode_snapshot(raw: bytes) -> Snapshot:
    return Snapshot(**orjson.loads(raw))


def _map_error(exc: Exception) -> Exception:
    if isinstance(exc, ResponseError):
        msg = str(exc)
        if "JOURNAL_FULL" in msg:
            return JournalFull(msg)
        if msg.startswith("FENCED"):
            return Fenced(f"redis: {msg}")
        if "VERSION" in msg:
            return VersionConflict(msg)
    return exc


def unavailable(exc: Exception) -> StorageUnavailable:
    """A Redis outage (no connection, no reply in time), counted, as the ports raise it."""
    STORAGE_ERRORS.labels("redis", "unavailable").inc()
    return StorageUnavailable(f"redis: {type(exc).__name__}: {exc}")


async def _await(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


class RedisClient:
    """The redis.asyncio client living on the bridge loop; every call maps outages to StorageUnavailable.

    `client` is a `Redis` or, when the URL names a Redis Cluster node, a `RedisCluster`: both take the same
    commands and pipelines here (non-transactional, every script within one session's hash tag).
    """

    def __init__(
        self,
        bridge: Bridge,
        client: aioredis.Redis | RedisCluster,
        prefix: str,
        socket_timeout: float = SOCKET_TIMEOUT_S,
    ) -> None:
        self.bridge = bridge
        self.client = client
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self.cluster = isinstance(client, RedisCluster)
        # Snapshots and trims on trio (plain Redis): a connection of their own, whatever is waiting sent together
        # (`open_redis` runs the queue). Through the bridge every handoff paid two cross-thread wakeups.
        self.side: TrioCommandQueue | None = None

    async def command(self, *args: Any) -> Any:
        """One command on the trio side connection when there is one, else on the bridge; the same outcomes as
        `call` (StorageUnavailable for an outage, error replies mapped)."""
        side = self.side
        if side is None:
            return await self.call(self.client.execute_command, *args)
        try:
            reply = await side.call(*args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise unavailable(exc) from exc
        if isinstance(reply, ResponseError):
            mapped = _map_error(reply)
            STORAGE_ERRORS.labels("redis", error_kind(mapped)).inc()
            raise mapped from reply
        return reply

    async def commands(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Several idempotent commands in one round trip: on the trio side connection when there is one (hiredis
        packs a command named in bytes), else a non-transactional pipeline on the bridge (a cluster sends each node
        its share). A reply each, an error reply as its exception object; an outage raises StorageUnavailable."""
        side = self.side
        if side is not None:
            try:
                return await side.call_many(commands)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                raise unavailable(exc) from exc

        async def pipelined() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, *args in commands:
                    pipe.execute_command(name.decode() if isinstance(name, bytes) else name, *args)
                return list(await pipe.execute(raise_on_error=False))

        return await self.call(pipelined)

    def key(self, session_id: str, kind: str) -> str:
        """`{prefix}{SID}:kind`: one hash tag per session (one cluster slot for all its keys)."""
        return f"{self.prefix}{{{session_id}}}:{kind}"

    def journal_key(self, session_id: str) -> str:
        return self.key(session_id, "j")

    def snapshot_key(self, session_id: str) -> str:
        return self.key(session_id, "s")

    def fence_key(self, session_id: str) -> str:
        return self.key(session_id, "epoch")

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await fn(*args)` on the bridge loop (redis-py types its commands as Awaitable, not coroutines)."""
        try:
            return await self.bridge.run(_await, fn, *args)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError, ClusterError,
                RedisClusterException) as exc:
            raise unavailable(exc) from exc
        except ResponseError as exc:
            mapped = _map_error(exc)
            STORAGE_ERRORS.labels("redis", error_kind(mapped)).inc()
            raise mapped from exc


class RedisJournal:
    """Journal port on a Redis stream per session."""

    def __init__(
        self, redis: RedisClient, max_entries: int = MAX_JOURNAL_ENTRIES, trio_conn: TrioRedisConnection | None = None
    ) -> None:
        self._r = redis
        self.max_entries = max_entries
        # The group commit's own connection: on trio (`trio_conn`, plain Redis over redis:// or unix://), else on
        # the bridge loop (`_exchange`: rediss://). A cluster, or a second concurrent call, takes a pipeline.
        self._trio = trio_conn
        self._trio_busy = False  # trio thread only
        self._conn: Any = None
        self._conn_busy = False  # bridge loop only

    def _append_args(self, session_id: str, changes: Sequence[Change], token: int) -> tuple[Any, ...]:
        """The append script's command: EVAL, its keys and arguments. A tuple named in bytes: the trio connection
        hands it to hiredis as it is (`redis_trio.pack`)."""
        r = self._r
        args: list[Any] = [b"EVAL", _APPEND_BYTES, 2, r.journal_key(session_id), r.fence_key(session_id)]
        args += [self.max_entries, token]
        for c in changes:
            args += [c.version, encode_change(c)]
        return tuple(args)

    async def _exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands in one write on the journal's own connection and read every reply (a script's error
        as a value, like `execute(raise_on_error=False)`).

        Why not a pipeline: at a few thousand acks/s the group commit makes hundreds of round trips a second, and
        redis-py's pipeline (pool checkout and release, a task per send and a timer per reply for the socket
        timeout, retry wrapper) cost more CPU than the commands. One connection, one timeout for the whole
        exchange. A failure leaves the connection closed (redis-py disconnects on any error mid-reply), and it
        reconnects on the next send. Taken from the pool once and never given back (the client's `aclose` closes
        it with the pool's others), since its socket timeout is ours now.
        """
        async with asyncio.timeout(self._r.socket_timeout):
            if self._conn is None:
                client = self._r.client
                assert isinstance(client, aioredis.Redis)  # a cluster client takes the pipeline path
                conn = await client.connection_pool.get_connection()
                conn.socket_timeout = None  # bounded by this exchange's timeout, not per send and per reply
                self._conn = conn
            conn = self._conn
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
        return results

    async def aclose(self) -> None:
        """Close the journal's own connections: the trio one here, the bridge one on its loop."""
        if self._trio is not None:
            self._trio.close()
        await self._r.bridge.run(self._disconnect)

    async def _disconnect(self) -> None:
        """On the bridge loop (the client's `aclose` would close it too)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()

    async def append(self, session_id: str, changes: Sequence[Change], token: int = 0) -> None:
        """One round trip; all-or-nothing; a retry of a batch that already landed is a no-op."""
        if changes:
            await self.append_many({session_id: changes}, {session_id: token})

    async def append_many(
        self, batches: Mapping[str, Sequence[Change]], tokens: Mapping[str, int] | None = None
    ) -> None:
        """The batches of several sessions in one round trip (each atomic on its own; `tokens`: each session's
        fencing token, 0 when missing).

        With one session its error is raised as is; with several, `JournalRefused` names the refused ones
        (the others were written).
        """
        items = [(sid, ch) for sid, ch in batches.items() if ch]
        if not items:
            return
        tokens = tokens or {}
        started = time.perf_counter()
        if self._trio is not None and not self._trio_busy:
            results = await self._trio_exchange(self._encode(items, tokens))
        else:
            results = await self._r.call(self._bridge_exchange, items, tokens)
        elapsed = time.perf_counter() - started
        errors = {
            sid: _map_error(res) for (sid, _), res in zip(items, results, strict=True) if isinstance(res, Exception)
        }
        _FIGURES.observe(elapsed, sum(len(ch) for sid, ch in items if sid not in errors))
        if not errors:
            return
        for exc in errors.values():
            STORAGE_ERRORS.labels("redis", error_kind(exc)).inc()
        if len(items) == 1:
            raise next(iter(errors.values()))
        raise JournalRefused(errors)

    def _encode(self, items: Sequence[tuple[str, Sequence[Change]]], tokens: Mapping[str, int]) -> list[Any]:
        """One append script per session. Not a transaction: each session's script is atomic by itself."""
        return [self._append_args(sid, changes, tokens.get(sid, 0)) for sid, changes in items]

    async def _bridge_exchange(
        self, items: Sequence[tuple[str, Sequence[Change]]], tokens: Mapping[str, int]
    ) -> list[Any]:
        """On the bridge thread (rediss://, a Redis Cluster, a second concurrent call): encoded there."""
        commands = self._encode(items, tokens)
        if self._trio is None and not self._r.cluster and not self._conn_busy:
            self._conn_busy = True
            try:
                return await self._exchange(commands)
            except RedisConnectionError:
                # One retry covers a connection that died while idle (Redis restarted); appends are
                # idempotent, so a batch that did land is accepted again unchanged.
                await asyncio.sleep(0.01)
                return await self._exchange(commands)
            finally:
                self._conn_busy = False
        # A Redis Cluster (the sessions of one batch live on several nodes: the client sends each node its
        # share), or a second append_many while the first is in flight (only without BatchingJournal).
        async with self._r.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.eval(*command[1:])
            return list(await pipe.execute(raise_on_error=False))

    async def _trio_exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The group commit on the trio connection (appends are idempotent: `exchange_idempotent` may retry),
        outages mapped as `RedisClient.call` maps them."""
        conn = self._trio
        assert conn is not None
        self._trio_busy = True
        try:
            return await conn.exchange_idempotent(commands)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise unavailable(exc) from exc
        finally:
            self._trio_busy = False

    async def read_after(self, session_id: str, version: int) -> list[Change]:
        key = self._r.journal_key(session_id)
        entries: Any = await self._r.call(self._r.client.xrange, key, f"{version + 1}-0", "+")
        return [decode_change(fields[b"d"]) for _id, fields in entries]

    async def trim(self, session_id: str, upto_version: int) -> None:
        await self._r.command("XTRIM", self._r.journal_key(session_id), "MINID", f"{upto_version + 1}-0")

    async def delete(self, session_id: str) -> None:
        """The journal of an ended session, with its lease and fence (ended sessions are never owned again)."""
        r = self._r
        await r.call(r.client.delete, r.journal_key(session_id), r.key(session_id, "lease"), r.fence_key(session_id))

    async def length(self, session_id: str) -> int:
        """Entries currently held (for metrics and tests)."""
        n: int = await self._r.call(self._r.client.xlen, self._r.journal_key(session_id))
        return n

    async def holds_changes(self) -> bool:
        """Whether any session's journal under our prefix holds entries (every node of a cluster is scanned)."""
        r = self._r
        pattern = f"{r.prefix}{{*}}:j"

        async def scan() -> bool:
            async for key in r.client.scan_iter(match=pattern, count=1000):
                if await r.client.xlen(key):
                    return True
            return False

        found: bool = await r.call(scan)
        return found


class RedisSnapshotStore:
    """Latest snapshot per session; saving also trims the journal it covers (`trim_journal`)."""

    def __init__(self, redis: RedisClient, *, trim_journal: bool = True) -> None:
        self._r = redis
        self.trim_journal = trim_journal

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        sid = snapshot.session_id
        await self._r.command(
            "EVAL",
            _SAVE_SNAPSHOT,
            3,
            self._r.snapshot_key(sid),
            self._r.journal_key(sid),
            self._r.fence_key(sid),
            snapshot.version,
            encode_snapshot(snapshot),
            "1" if self.trim_journal else "0",
            snapshot.epoch,
        )

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        raw: Any = await self._r.call(self._r.client.hget, self._r.snapshot_key(session_id), "d")
        return None if raw is None else decode_snapshot(raw)

    async def delete_snapshots(self, session_id: str) -> None:
        await self._r.call(self._r.client.delete, self._r.snapshot_key(session_id))


class RedisHealth:
    def __init__(self, redis: RedisClient) -> None:
        self._r = redis

    async def ping(self) -> None:
        await self._r.call(self._r.client.ping)


@dataclass(frozen=True, slots=True)
class RedisBackend:
    client: RedisClient
    journal: RedisJournal
    snapshots: RedisSnapshotStore
    health: RedisHealth


@asynccontextmanager
async def open_redis(
    bridge: Bridge,
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    max_entries: int = MAX_JOURNAL_ENTRIES,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    trim_journal_on_snapshot: bool = True,
    max_connections: int = 64,
) -> AsyncIterator[RedisBackend]:
    """Create the client on the bridge loop (connections are made lazily) and close it on exit."""

    # One quick retry covers a pooled connection that died (e.g. Redis restarted); appends are idempotent.
    retry = Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1)

    async def is_cluster() -> bool:
        """A Redis Cluster node says so in INFO; an unreachable server is taken for a plain one (lazy)."""
        probe = aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        try:
            info = await probe.info("cluster")
            return bool(info.get("cluster_enabled"))
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
            return False
        finally:
            await probe.aclose()

    async def make() -> aioredis.Redis | RedisCluster:
        if await is_cluster():
            cluster = RedisCluster.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=retry,
            )
            await cluster.initialize()
            return cluster
        # Bounded pool: past `max_connections` callers wait (up to the socket timeout) instead of dialing more.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=retry,
            health_check_interval=30,
        )
        return aioredis.Redis.from_pool(pool)

    client = await bridge.run(make)
    rc = RedisClient(bridge, client, prefix, socket_timeout)
    trio_conn = None if rc.cluster or not supported(url) else TrioRedisConnection(url, socket_timeout)
    journal = RedisJournal(rc, max_entries, trio_conn)
    try:
        async with trio.open_nursery() as tasks:
            if trio_conn is not None:
                side = rc.side = TrioCommandQueue(TrioRedisConnection(url, socket_timeout))
                tasks.start_soon(side.run)
                tasks.start_soon(trio_conn.watch)  # the group commit's exchanges: no cancel scope each
                tasks.start_soon(side.conn.watch)
            try:
                yield RedisBackend(
                    client=rc,
                    journal=journal,
                    snapshots=RedisSnapshotStore(rc, trim_journal=trim_journal_on_snapshot),
                    health=RedisHealth(rc),
                )
            finally:
                tasks.cancel_scope.cancel()  # the side queue's sender: its connection closes, late calls fail
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(socket_timeout + 1.0):
            await journal.aclose()
            await bridge.run(client.aclose)
