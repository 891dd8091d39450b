"""The cluster's coordination on Redis (DESIGN §6): membership, session leases and the pods' relay channels.

Keys (every script touches keys of one hash tag only, so all of it runs unchanged on a Redis Cluster):
- `{prefix}{members}:live` (sorted set, score = expiry in Redis-clock ms) and `{prefix}{members}:info` (hash,
  pod -> JSON): the pods. A heartbeat re-scores its pod, drops the expired ones and returns the live list, all in
  one script on Redis's own clock (pods' clocks never compare).
- `{prefix}{SID}:lease`: "pod token", with a TTL. `{prefix}{SID}:epoch`: the counter behind the tokens, which
  only grows (INCR) and is also the fence the journal and snapshot scripts check (storage/redis_store.py).
- Channel `{prefix}{pod:POD}:relay`: one sharded pub/sub channel per pod (SPUBLISH / SSUBSCRIBE).
Batches that span sessions (lease renewals, publishes) are one script per session, sent together: publishes as a
non-transactional pipeline (on a cluster the client sends each node its share), renewals on the trio side
connection on a plain Redis (`RedisClient.commands`; that pipeline otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
import structlog
import trio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.bridge import BridgeStream
from storage.ports import LeaseHeld, Member
from storage.redis_store import RedisClient, unavailable

log = structlog.get_logger("sessiond.redis_cluster")

SUBSCRIPTION_MAX_MESSAGES = 10_000
SUBSCRIPTION_MAX_BYTES = 64 << 20
RESUBSCRIBE_DELAY_S = 0.2
SUBSCRIBE_WAIT_S = 5.0
STOP_WAIT_S = 2.0
READ_WAIT_S = 0.5

# KEYS[1] live set, KEYS[2] info hash; ARGV pod, ttl ms, info json, leaving flag ("1": drop the pod now).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(dead))
end
local out = {}
for _, pod in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = pod
  out[#out + 1] = redis.call('HGET', KEYS[2], pod) or '{}'
end
return out
"""

# KEYS[1] lease, KEYS[2] epoch counter; ARGV pod, ttl ms, floor. Returns {token, ''} or {0, holder}. A lease this
# pod already holds is granted again with a new token (a restarted pod reusing its name fences its old self).
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder = string.match(cur, '^(.*) %d+$')
  if holder ~= ARGV[1] then return {0, holder or cur} end
end
local e = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if e <= floor then
  e = floor + 1
  redis.call('SET', KEYS[2], string.format('%d', e))
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', e), 'PX', ARGV[2])
return {e, ''}
"""

# KEYS[1] lease; ARGV pod, token, ttl ms. 1 when still ours (and extended), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

_RENEW_BYTES = _RENEW.encode()
RENEW_CHUNK = 500

# KEYS[1] lease; ARGV pod, token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisMembership:
    def __init__(self, redis: RedisClient) -> None:
        self._r = redis
        tag = f"{redis.prefix}{{members}}"
        self._keys = (f"{tag}:live", f"{tag}:info")

    async def heartbeat(self, member: Member, ttl_s: float) -> list[Member]:
        return await self._run(member.pod, ttl_s, _member_json(member), "0")

    async def leave(self, pod: str) -> None:
        await self._run(pod, 1.0, "{}", "1")

    async def _run(self, pod: str, ttl_s: float, info: str, leaving: str) -> list[Member]:
        raw: Any = await self._r.call(self._r.client.eval, _HEARTBEAT, 2, *self._keys, pod, _ms(ttl_s), info, leaving)
        members = []
        for i in range(0, len(raw) - 1, 2):
            name = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            members.append(_member_from_json(name, raw[i + 1]))
        return members


def _member_json(member: Member) -> str:
    return orjson.dumps(
        {"leaving": member.leaving, "shareable": member.shareable, "started_at": member.started_at}
    ).decode()


def _member_from_json(pod: str, raw: Any) -> Member:
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    return Member(
        pod=pod,
        leaving=bool(info.get("leaving", False)),
        shareable=bool(info.get("shareable", True)),
        started_at=float(info.get("started_at", 0.0)),
    )


class RedisLeases:
    def __init__(self, redis: RedisClient) -> None:
        self._r = redis

    async def acquire(self, session_id: str, pod: str, ttl_s: float, floor: int = 0) -> int:
        r = self._r
        raw: Any = await r.call(
            r.client.eval, _ACQUIRE, 2, r.key(session_id, "lease"), r.fence_key(session_id), pod, _ms(ttl_s), floor
        )
        token, holder = int(raw[0]), raw[1]
        if token == 0:
            raise LeaseHeld(holder.decode() if isinstance(holder, bytes) else str(holder))
        return token

    async def renew(self, held: Mapping[str, int], pod: str, ttl_s: float) -> set[str]:
        """One renewal script per lease (one hash tag each), `RENEW_CHUNK` leases per round trip on the trio side
        connection (`RedisClient.commands`). A round of 100 leases, every ttl/3, cost 4.0-4.6 ms of CPU through
        redis-py's pipeline on the bridge and costs 0.6-0.7 ms here (3 rounds of 50 each), which is 0.4 % of a core
        saved per 100 sessions at the default 3 s TTL. The chunks bound how long packing one round trip holds the
        trio thread on a pod with many sessions."""
        items = list(held.items())
        r = self._r
        ttl = _ms(ttl_s)
        pod_b = pod.encode()
        gone: set[str] = set()
        for start in range(0, len(items), RENEW_CHUNK):
            chunk = items[start:start + RENEW_CHUNK]
            results = await r.commands(
                [(b"EVAL", _RENEW_BYTES, 1, r.key(sid, "lease"), pod_b, token, ttl) for sid, token in chunk]
            )
            for (sid, _), res in zip(chunk, results, strict=True):
                if isinstance(res, Exception):  # some node refused (or did not answer): not vouched for this round
                    raise unavailable(res)
                if not res:
                    gone.add(sid)
        return gone

    async def release(self, session_id: str, pod: str, token: int) -> None:
        r = self._r
        await r.call(r.client.eval, _RELEASE, 1, r.key(session_id, "lease"), pod, token)


class RedisSubscription:
    def __init__(self, stream: BridgeStream) -> None:
        self._stream = stream

    async def receive(self) -> tuple[list[bytes], bool]:
        return await self._stream.receive()


class RedisPubSub:
    """Sharded pub/sub, one channel per pod; the subscription is read on the bridge loop into a bounded stream."""

    def __init__(self, redis: RedisClient) -> None:
        self._r = redis

    def channel(self, pod: str) -> str:
        return f"{self._r.prefix}{{pod:{pod}}}:relay"

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if not messages:
            return
        r = self._r
        channels = [(self.channel(pod), payload) for pod, payload in messages]

        async def run() -> None:
            # One pipeline, executed in order on one connection per node: per-channel order is kept.
            async with r.client.pipeline(transaction=False) as pipe:
                for channel, payload in channels:
                    pipe.execute_command("SPUBLISH", channel, payload)
                await pipe.execute()

        await r.call(run)

    @contextlib.asynccontextmanager
    async def subscribe(self, pod: str) -> AsyncIterator[RedisSubscription]:
        r = self._r
        reader = _Reader(r, self.channel(pod), r.bridge.stream(SUBSCRIPTION_MAX_MESSAGES, SUBSCRIPTION_MAX_BYTES))
        await r.bridge.run(reader.start)
        try:
            yield RedisSubscription(reader.stream)
        finally:
            reader.stream.closed = True
            # Shielded: stopping must complete even when we are being cancelled, or the reader outlives us.
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT_S + 1):
                await r.bridge.run(reader.stop)


class _Reader:
    """On the bridge loop: keep one subscription alive and push what arrives into a bounded stream. Every
    reconnect is a gap (what was published meanwhile is lost for good: TRAPS, pub/sub is at-most-once).

    Stopped by a flag plus closing its connection, not by cancellation alone: redis-py's `get_message` can
    swallow a cancellation inside its own timeout and then wait forever on a closed connection.
    """

    def __init__(self, r: RedisClient, channel: str, stream: BridgeStream) -> None:
        self.r = r
        self.channel = channel
        self.stream = stream
        self.stopping = False
        self.pubsub: Any = None
        self.task: asyncio.Task[None] | None = None
        self.subscribed: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Start reading; wait (a bounded time) until subscribed, so nothing sent after this is missed."""
        loop = asyncio.get_running_loop()
        self.subscribed = loop.create_future()
        self.task = loop.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.subscribed), SUBSCRIBE_WAIT_S)

    async def stop(self) -> None:
        self.stopping = True
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
        if self.task is not None:
            self.task.cancel()  # if redis-py swallows it, the flag ends the loop at the next read timeout
            await asyncio.wait([self.task], timeout=STOP_WAIT_S)

    async def _run(self) -> None:
        assert self.subscribed is not None
        r, stream = self.r, self.stream
        while not self.stopping:
            pubsub: Any = r.client.pubsub(ignore_subscribe_messages=True)
            self.pubsub = pubsub
            try:
                await pubsub.ssubscribe(self.channel)
                if not self.subscribed.done():
                    self.subscribed.set_result(None)
                else:
                    stream.mark_gap()
                while not self.stopping:
                    if r.cluster:
                        message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=READ_WAIT_S)
                    else:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_WAIT_S)
                    if message is None:
                        continue
                    if message.get("type") in ("smessage", "message"):
                        stream.push(message["data"])
                    elif message.get("type") == "sunsubscribe":  # the slot moved to another node
                        break
            except asyncio.CancelledError:
                if self.stopping:
                    return
                raise
            except Exception as exc:
                if self.stopping:
                    return
                if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
                    log.warning("relay subscription lost; resubscribing", error=str(exc))
                else:
                    log.error("relay subscription failed; resubscribing", exc_info=exc)
                if self.subscribed.done():
                    stream.mark_gap()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if not self.stopping:
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)
