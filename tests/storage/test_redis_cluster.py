"""Lease renewals on Redis (storage/redis_cluster.py): in chunks on the trio side connection, or as the bridge's
pipeline (rediss://, a Redis Cluster), with the same answers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from storage import redis_cluster
from storage.bridge import Bridge
from storage.ports import StorageUnavailable
from storage.redis_cluster import RedisLeases
from storage.redis_store import RedisClient, open_redis
from tests.support.redis_cluster_fixture import redis_cluster_url  # noqa: F401  (a fixture)

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.services


async def _wipe(rc: RedisClient) -> None:
    async def wipe() -> None:
        keys = [k async for k in rc.client.scan_iter(match=f"{rc.prefix}*", count=500)]
        if keys:
            await rc.client.delete(*keys)

    await rc.call(wipe)


@pytest.fixture(params=["trio", "bridge"])
async def client(request: pytest.FixtureRequest, bridge: Bridge) -> AsyncIterator[RedisClient]:
    """The Redis client `open_redis` makes (its side connection on trio), and the same without it (rediss://)."""
    async with open_redis(bridge, REDIS_URL, prefix=f"sessiond-test-{uuid.uuid4().hex[:10]}:") as backend:
        rc = backend.client
        assert rc.side is not None
        side = rc.side
        if request.param == "bridge":
            rc.side = None
        try:
            yield rc
        finally:
            rc.side = side
            await _wipe(rc)


async def _pttl(rc: RedisClient, session_id: str) -> int:
    return int(await rc.call(rc.client.pttl, rc.key(session_id, "lease")))


async def test_renewal_in_chunks_extends_ours_and_names_the_lost(
    client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_cluster, "RENEW_CHUNK", 3)  # 8 leases: three round trips
    leases = RedisLeases(client)
    held = {f"s{i}": await leases.acquire(f"s{i}", "pod-a", 5.0) for i in range(8)}
    for sid in ("s1", "s6"):  # taken over: released by pod-a, acquired by pod-b
        await leases.release(sid, "pod-a", held[sid])
        await leases.acquire(sid, "pod-b", 5.0)
    assert await leases.renew(held, "pod-a", 60.0) == {"s1", "s6"}
    for sid in held:
        ttl = await _pttl(client, sid)
        if sid in ("s1", "s6"):
            assert 0 < ttl <= 5_000  # pod-b's lease, untouched
        else:
            assert 5_000 < ttl <= 60_000  # extended, in every chunk
    assert await leases.renew({}, "pod-a", 60.0) == set()


async def test_an_error_reply_fails_the_renewal_as_an_outage(client: RedisClient) -> None:
    """A lease key Redis cannot GET (here the wrong type) is not vouched for: the keeper's watchdog must act, so the
    renewal fails as StorageUnavailable, the error the keeper handles, not as redis-py's ResponseError."""
    leases = RedisLeases(client)
    token = await leases.acquire("ok", "pod-a", 5.0)
    await client.call(client.client.hset, client.key("odd", "lease"), "f", "v")
    with pytest.raises(StorageUnavailable, match="WRONGTYPE"):
        await leases.renew({"ok": token, "odd": 1}, "pod-a", 60.0)


async def test_a_redis_cluster_renews_through_the_pipeline(bridge: Bridge, redis_cluster_url: str) -> None:  # noqa: F811
    async with open_redis(bridge, redis_cluster_url, prefix=f"sessiond-test-{uuid.uuid4().hex[:10]}:") as backend:
        rc = backend.client
        assert rc.cluster and rc.side is None
        leases = RedisLeases(rc)
        held = {f"s{i}": await leases.acquire(f"s{i}", "pod-a", 5.0) for i in range(12)}  # on several nodes
        await leases.release("s3", "pod-a", held["s3"])
        assert await leases.renew(held, "pod-a", 60.0) == {"s3"}
        assert 5_000 < await _pttl(rc, "s0") <= 60_000
