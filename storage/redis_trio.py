"""Redis connections on trio itself: the hottest Redis calls (the journal's group commit, handoff snapshots) skip
the bridge.

Why: with durability=redis every ack waits for the group commit, hundreds of flushes a second. Through the bridge
each cost 230-320 µs of CPU, most of it two cross-thread wakeups, the asyncio loop's iterations and GIL handoffs,
not Redis. Here the flush is one `send_all` and a few `receive_some` on the trio thread.

Only what these callers need: connect (TCP or unix socket), the handshake the URL asks for (AUTH, SELECT), and
pipelined exchanges. No hand-written protocol: redis-py's own packer (`HiredisRespSerializer`, what its connections
use when hiredis is installed) encodes, hiredis' sans-I/O `Reader` (redis-py's accelerator) parses, and redis-py's
`parse_url` and `BaseParser.parse_error` read the URL and turn error replies into the exception types redis.asyncio
raises. The snapshot writes and journal trims of every handoff, and the lease renewals, share a second such
connection through a `TrioCommandQueue` (`RedisClient.command`, `.commands`): what waits during an exchange goes in
the next one. Everything else (reads, lease grants and releases, TLS, Redis Cluster) stays on redis.asyncio through
the bridge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import trio
from redis._parsers import BaseParser
from redis.connection import HiredisRespSerializer, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.directstream import DirectStream

_MORE = object()  # hiredis' "not enough data yet" (its default, False, could be mistaken for a reply)
_READ_SIZE = 65536


def pack(packer: HiredisRespSerializer, command: Sequence[Any]) -> bytes:
    """One command in RESP, as redis-py's `pack` writes it. A tuple named by one word in bytes goes to hiredis as
    it is: the group commit's EVAL, hundreds a second, took 2.4 µs through redis-py's general `pack` (it splits
    the name, copies the arguments into a new tuple to turn bytearrays and memoryviews into bytes, joins a list)
    and 1.0 µs here (timeit; 3.9 against 2.0 when the VM ran slower). Anything else, or an argument hiredis does
    not take, goes redis-py's way."""
    if type(command) is tuple and type(command[0]) is bytes and b" " not in command[0]:
        try:
            return hiredis.pack_command(command)
        except TypeError:
            pass  # a bytearray, a memoryview (redis-py copies those), or a type nobody packs: DataError below
    return b"".join(packer.pack(*command))


def supported(url: str) -> bool:
    """Plain TCP and unix sockets; `rediss://` (TLS) keeps redis.asyncio's connection on the bridge."""
    return url.startswith(("redis://", "unix://"))


class TrioRedisConnection:
    """One lazily (re)connected Redis connection owned by the trio thread; one exchange at a time.

    `exchange` raises redis-py's `ConnectionError` / `TimeoutError` (what redis.asyncio raises for the same
    failures) and leaves the connection closed: a half-read reply stream is unusable. The next exchange reconnects.
    """

    def __init__(self, url: str, timeout: float) -> None:
        if not supported(url):
            raise ValueError(f"not a redis:// or unix:// URL: {url.split('://')[0]}://")
        kw = parse_url(url)
        self.timeout = timeout
        self._path: str | None = kw.get("path") if url.startswith("unix://") else None
        self._host: str = kw.get("host", "localhost")
        self._port: int = kw.get("port", 6379)
        self._handshake: list[tuple[Any, ...]] = []
        username, password = kw.get("username"), kw.get("password")
        if username or password:  # as redis-py: AUTH [username] password
            self._handshake.append(("AUTH", username, password or "") if username else ("AUTH", password))
        if kw.get("client_name"):
            self._handshake.append(("CLIENT", "SETNAME", kw["client_name"]))
        if kw.get("db"):
            self._handshake.append(("SELECT", kw["db"]))
        self._packer = HiredisRespSerializer()
        self._stream: DirectStream | None = None
        self._reader: hiredis.Reader | None = None
        self._started: float | None = None  # when the exchange in flight began
        self._watching = False  # `watch()` runs: it bounds exchanges
        self._expired = False  # `watch()` closed the connection under the exchange in flight

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def close(self) -> None:
        """Close at once, callable while cancelled; a task waiting on the socket wakes with ClosedResourceError."""
        stream, self._stream, self._reader = self._stream, None, None
        if stream is not None:
            stream.socket.close()  # a FIN, at once (trio wakes what waits on the socket first)

    async def exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands in one write, read one reply each; an error reply comes back as its exception (as
        `execute(raise_on_error=False)`). Connecting, the handshake and the exchange share one `timeout`: a cancel
        scope each, or, while `watch()` runs, its deadline (the group commit's exchanges are hundreds a second)."""
        started = trio.current_time()
        self._started = started
        try:
            if self._stream is None:
                with trio.fail_after(self.timeout):
                    await self._connect()
            if self._watching:
                return await self._roundtrip(commands)
            with trio.fail_after(max(started + self.timeout - trio.current_time(), 0.0)):
                return await self._roundtrip(commands)
        except BaseException as exc:
            self.close()
            if isinstance(exc, trio.TooSlowError) or self._expired:
                raise RedisTimeoutError(f"no reply from Redis within {self.timeout} s") from None
            if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError | InvalidResponse):
                raise RedisConnectionError(f"{type(exc).__name__}: {exc}") from exc
            raise  # redis-py's ConnectionError family as is; Cancelled; bugs
        finally:
            self._started = None
            self._expired = False

    async def watch(self) -> None:
        """Enforce `timeout` on every exchange without a cancel scope each: an exchange still waiting at its
        deadline has its socket closed (the waiting read wakes with `ClosedResourceError`, raised as redis-py's
        `TimeoutError`). Runs in the owner's nursery; wakes once per `timeout` while idle."""
        self._watching = True
        try:
            while True:
                started = self._started
                if started is None:
                    await trio.sleep(self.timeout)
                    continue
                late = started + self.timeout - trio.current_time()
                if late > 0:
                    await trio.sleep(late)
                else:
                    self._expired = True
                    self.close()
                    await trio.sleep(0.01)  # the exchange, woken, ends before the next look
        finally:
            self._watching = False

    async def exchange_idempotent(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """`exchange`, with one retry when a connection that sat idle turns out dead (Redis restarted, a proxy or
        CLIENT KILL dropped it): for commands that may land twice (appends by version, snapshots, trims). A fresh
        connection that fails, or a timeout, is not retried: Redis is down or hung, and the caller's time is spent."""
        idle = self.connected
        try:
            return await self.exchange(commands)
        except RedisConnectionError:
            if not idle:
                raise
        await trio.sleep(0.01)
        return await self.exchange(commands)

    async def _connect(self) -> None:
        if self._path is not None:
            stream = await trio.open_unix_socket(self._path)
        else:
            stream = await trio.open_tcp_stream(self._host, self._port)  # sets TCP_NODELAY
        self._stream = DirectStream(stream)
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_MORE
        )
        if self._handshake:
            for reply in await self._roundtrip(self._handshake):
                if isinstance(reply, Exception):
                    raise RedisConnectionError(f"Redis handshake refused: {reply}")

    async def _roundtrip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Written and read without a checkpoint while the socket allows (DirectStream), waiting only when it would
        block: trio's `send_all` / `receive_some` cost a conflict detector, a checkpoint and a retry wrapper each,
        about 20 µs of the 55 µs a PING exchange took."""
        stream, reader = self._stream, self._reader
        assert stream is not None and reader is not None
        packer = self._packer
        stream.write_nowait(b"".join([pack(packer, command) for command in commands]))
        if stream.pending_bytes:
            await stream.drain()  # the kernel took part of it: wait for room (drain's lock is a checkpoint)
        # The reply is not there yet: a read right after the write found nothing 4,979 times in 5,000 PINGs, each
        # a syscall and a BlockingIOError for nothing. Wait for it first (a checkpoint, as the read's wait was);
        # with no command sent there is nothing to wait for.
        if commands:
            await stream.wait_readable()
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is _MORE:
                chunk = stream.read_nowait(_READ_SIZE)
                if chunk is None:
                    await stream.wait_readable()
                    continue
                if not chunk:
                    raise RedisConnectionError("Connection closed by server.")
                reader.feed(chunk)
            elif isinstance(reply, RedisConnectionError):
                raise reply  # LOADING, NOAUTH, ...: redis-py raises these rather than returning them
            else:
                replies.append(reply)
        return replies


class _Slot:
    """One caller's commands in the queue, sent in the same exchange, and their replies in order."""

    __slots__ = ("commands", "done", "error", "replies")

    def __init__(self, commands: Sequence[Sequence[Any]]) -> None:
        self.commands = commands
        self.done = trio.Event()
        self.replies: list[Any] = []
        self.error: BaseException | None = None


class TrioCommandQueue:
    """Commands from many tasks over one TrioRedisConnection, sent together: what queued while an exchange was in
    flight goes in the next one (one command at a time behind a lock queued for a round trip and a run-loop pass
    each: under a handoff load, 2.5x the latency of the bridge's pool).

    `run()` (in a nursery) is the only sender. Once it has stopped, calls fail with `RedisConnectionError`.
    A failed exchange fails its whole batch, after `exchange_idempotent`'s one retry: callers send idempotent
    commands only (snapshot writes, journal trims, lease renewals).
    """

    def __init__(self, conn: TrioRedisConnection) -> None:
        self.conn = conn
        self._queue: list[_Slot] = []
        self._wake = trio.Event()
        self._closed = False

    async def call(self, *command: Any) -> Any:
        """The reply (an error reply as its exception object, as `exchange`); the connection's errors raised."""
        return (await self.call_many([command]))[0]

    async def call_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one exchange (one slot and one wake for all of them): a reply each, in order."""
        if self._closed:
            raise RedisConnectionError("the Redis command queue is closed")
        if not commands:
            return []
        slot = _Slot(commands)
        self._queue.append(slot)
        self._wake.set()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.replies

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                batch, self._queue = self._queue, []
                try:
                    replies = await self.conn.exchange_idempotent([c for slot in batch for c in slot.commands])
                except Exception as exc:
                    for slot in batch:
                        slot.error = exc
                        slot.done.set()
                    continue
                except BaseException:
                    self._queue[:0] = batch  # failed below with the rest
                    raise
                start = 0
                for slot in batch:
                    end = start + len(slot.commands)
                    slot.replies = replies[start:end]
                    start = end
                    slot.done.set()
        finally:
            self._closed = True
            self.conn.close()
            for slot in self._queue:
                slot.error = RedisConnectionError("the Redis command queue is closed")
                slot.done.set()
            self._queue = []
