"""What redis-py's asyncio cluster client does against a real Redis Cluster (and a plain Redis 7).

These tests pin the behaviour the Redis Cluster support is built on: EVAL routing by hash tag, cross-slot
errors, one-call cluster pipelines of EVALs with per-command errors, sharded pub/sub across nodes (how reads,
timeouts and reconnects behave), and telling a cluster node from a plain server before picking a client class.
redis.asyncio is asyncio-only, so every test is sync and drives its coroutine with `asyncio.run` (never inside
the trio loop). The cluster is private to the run (see tests/support/redis_cluster.py); the plain-Redis test
uses only a random channel name on the shared server and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, ClusterPubSub

from tests.support import redis_cluster as helper
from tests.support.redis_cluster_fixture import redis_cluster_url  # noqa: F401

# Writes both keys and returns the first: needs KEYS[1] and KEYS[2] in one slot.
SET_BOTH = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return redis.call('GET', KEYS[1])"
FAIL = "return redis.error_reply('boom')"


def _run(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run an asyncio coroutine to completion from a sync test (redis.asyncio cannot run under trio)."""

    async def main() -> Any:
        return await make()

    return asyncio.run(main())


def _tag() -> str:
    """A per-test random key part, so reruns against the same cluster never see old keys."""
    return secrets.token_hex(4)


def _node_for(client: RedisCluster, key: str) -> ClusterNode:
    """The primary owning `key`'s slot (the client must be initialized)."""
    node = client.get_node_from_key(key)
    assert node is not None
    return node


def _channels_on_distinct_nodes(client: RedisCluster, tag: str, count: int) -> list[str]:
    """`count` channel names `ev:{<tag>-<i>}` whose hash tags land on `count` different nodes."""
    found: dict[str, str] = {}
    for i in range(10_000):
        name = f"ev:{{{tag}-{i}}}"
        found.setdefault(_node_for(client, name).name, name)
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"no {count} names on distinct nodes")


# ---- the helper itself ---------------------------------------------------------------------------


def test_missing_redis_server_is_an_error_not_a_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server is not installed"), helper.redis_cluster(tmp_path):
        pass


def test_half_started_cluster_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[helper._Node] = []
    real_start = helper._start_node

    def spy(exe: str, port: int, base: Path) -> helper._Node:
        node = real_start(exe, port, base)
        started.append(node)
        return node

    def broken(nodes: list[helper._Node]) -> None:
        raise helper.ClusterStartError("simulated failure after the processes started")

    monkeypatch.setattr(helper, "_start_node", spy)
    monkeypatch.setattr(helper, "_form_cluster", broken)
    with pytest.raises(helper.ClusterStartError, match="simulated"), helper.redis_cluster(tmp_path):
        pass
    assert len(started) == 3
    assert all(node.proc.returncode is not None for node in started)


def test_port_race_never_talks_to_a_foreign_server(
    redis_cluster_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If another server wins the port, startup fails (after retries) without sending it any setup command."""
    taken = int(redis_cluster_url.rsplit(":", 1)[1])
    monkeypatch.setattr(helper, "free_cluster_ports", lambda count: [taken] * count)
    with pytest.raises(helper.ClusterStartError, match="Address already in use"), helper.redis_cluster(tmp_path, 1):
        pass
    with redis.Redis.from_url(redis_cluster_url) as other:
        assert other.execute_command("CLUSTER", "INFO").decode().startswith("cluster_state:ok")


def test_ports_leave_the_cluster_bus_port_free() -> None:
    ports = helper.free_cluster_ports(3)
    assert len(set(ports)) == 3
    assert all(p + helper.BUS_PORT_OFFSET <= 65535 for p in ports)


def test_cluster_is_healthy_and_from_url_works(redis_cluster_url: str) -> None:  # noqa: F811
    async def probe() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        try:
            await client.initialize()
            assert len(client.get_primaries()) == 3
            # Typed as one node's dict; with several target nodes it is {node name: that node's dict}.
            states: dict[str, dict[str, Any]] = await client.cluster_info(  # type: ignore[assignment]
                target_nodes=RedisCluster.ALL_NODES
            )
            assert {node_info["cluster_state"] for node_info in states.values()} == {"ok"}
        finally:
            await client.aclose()

    _run(probe)


# ---- a. EVAL and hash tags -----------------------------------------------------------------------


def test_eval_needs_all_keys_in_one_slot(redis_cluster_url: str) -> None:  # noqa: F811
    tag = _tag()

    async def probe() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        same = [f"t:{{{tag}-1}}:a", f"t:{{{tag}-1}}:b"]
        cross = [f"t:{{{tag}-1}}:a", f"t:{{{tag}-2}}:b"]
        try:
            assert client.keyslot(cross[0]) != client.keyslot(cross[1])
            assert await client.eval(SET_BOTH, 2, *same, "v") == b"v"
            # redis-py refuses before sending: it parses EVAL's keys itself (no COMMAND GETKEYS round trip).
            with pytest.raises(redis.RedisClusterException, match="all keys must map to the same key slot"):
                await client.eval(SET_BOTH, 2, *cross, "v")
            # Forced onto one node the server answers CROSSSLOT, mapped to ClusterCrossSlotError (a ResponseError).
            node = _node_for(client, cross[0])
            with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="don't hash to the same slot"):
                await client.execute_command("EVAL", SET_BOTH, 2, *cross, "v", target_nodes=node)
        finally:
            await client.delete(*same)  # multi-slot DEL is split per slot by the cluster client
            await client.aclose()

    _run(probe)


# ---- b. cluster pipeline of EVALs ----------------------------------------------------------------


def test_pipeline_of_evals_spans_nodes_in_one_execute(redis_cluster_url: str) -> None:  # noqa: F811
    tag = _tag()
    sessions = [f"{tag}-{i}" for i in range(30)]

    async def probe() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        try:
            await client.initialize()
            nodes = {_node_for(client, f"t:{{{s}}}:a").name for s in sessions}
            assert len(nodes) == 3

            assert "raise_on_error" in inspect.signature(ClusterPipeline.execute).parameters
            pipe = client.pipeline(transaction=False)
            for i, s in enumerate(sessions):
                pipe.eval(SET_BOTH, 2, f"t:{{{s}}}:a", f"t:{{{s}}}:b", str(i))
            pipe.eval(FAIL, 1, f"t:{{{sessions[0]}}}:a")
            results = await pipe.execute(raise_on_error=False)
            assert results[:-1] == [str(i).encode() for i in range(len(sessions))]
            assert isinstance(results[-1], redis.ResponseError)
            assert str(results[-1]) == "boom"

            # Default raise_on_error=True: the first error is raised, its message names the command's position.
            pipe = client.pipeline()
            pipe.eval(SET_BOTH, 2, f"t:{{{sessions[1]}}}:a", f"t:{{{sessions[1]}}}:b", "x")
            pipe.eval(FAIL, 1, f"t:{{{sessions[1]}}}:a")
            with pytest.raises(redis.ResponseError, match=r"Command # 2 .* caused error"):
                await pipe.execute()

            # A cross-slot EVAL fails the whole execute() while routing, before anything is sent,
            # even with raise_on_error=False: validate hash tags before queueing.
            pipe = client.pipeline()
            pipe.eval(SET_BOTH, 2, f"t:{{{sessions[2]}}}:new", f"t:{{{sessions[2]}}}:new2", "x")
            pipe.eval(SET_BOTH, 2, f"t:{{{sessions[2]}}}:a", f"t:{{{sessions[3]}}}:b", "x")
            with pytest.raises(redis.RedisClusterException, match="same key slot"):
                await pipe.execute(raise_on_error=False)
            assert await client.exists(f"t:{{{sessions[2]}}}:new") == 0

            # EVALSHA: the pipeline method is blocked, the raw command is not; SCRIPT LOAD goes to every primary.
            sha = await client.script_load(SET_BOTH)
            pipe = client.pipeline()
            with pytest.raises(redis.RedisClusterException, match="evalsha is blocked"):
                pipe.evalsha(sha, 2, "t:{x}:a", "t:{x}:b", "v")
            for s in sessions[:6]:
                pipe.execute_command("EVALSHA", sha, 2, f"t:{{{s}}}:a", f"t:{{{s}}}:b", "sha")
            pipe.execute_command("EVALSHA", "0" * 40, 1, f"t:{{{sessions[0]}}}:a")
            results = await pipe.execute(raise_on_error=False)
            assert results[:-1] == [b"sha"] * 6
            assert isinstance(results[-1], redis.exceptions.NoScriptError)

            # transaction=True is MULTI/EXEC on one node: only for keys in a single slot.
            pipe = client.pipeline(transaction=True)
            pipe.eval(SET_BOTH, 2, f"t:{{{sessions[0]}}}:a", f"t:{{{sessions[0]}}}:b", "tx")
            pipe.eval(SET_BOTH, 2, f"t:{{{sessions[1]}}}:a", f"t:{{{sessions[1]}}}:b", "tx")
            with pytest.raises(redis.exceptions.CrossSlotTransactionError):
                await pipe.execute()
        finally:
            pipe = client.pipeline()
            for s in sessions:
                pipe.delete(f"t:{{{s}}}:a", f"t:{{{s}}}:b", f"t:{{{s}}}:new", f"t:{{{s}}}:new2")
            await pipe.execute()
            await client.aclose()

    _run(probe)


# ---- c. sharded pub/sub on the cluster -----------------------------------------------------------


def test_sharded_pubsub_across_nodes(redis_cluster_url: str) -> None:  # noqa: F811
    tag = _tag()

    async def probe() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        await client.initialize()
        a, b = _channels_on_distinct_nodes(client, tag, 2)
        pubsub: ClusterPubSub = client.pubsub()
        try:
            await pubsub.ssubscribe(a, b)  # one SSUBSCRIBE per channel, each on a per-node connection
            assert len(pubsub.node_pubsub_mapping) == 2
            confirmations = [await pubsub.get_sharded_message(timeout=0.5) for _ in range(2)]
            kinds = {(m["type"], m["channel"]) for m in confirmations if m}
            assert kinds == {("ssubscribe", a.encode()), ("ssubscribe", b.encode())}

            assert await client.spublish(a, "to-a") == 1  # number of receivers, like PUBLISH
            assert await client.execute_command("SPUBLISH", b, "to-b") == 1
            received: list[tuple[bytes, bytes]] = []
            deadline = time.monotonic() + 2
            while len(received) < 2 and time.monotonic() < deadline:
                # Round-robin: each call polls the per-node connections in turn, waiting up to `timeout` on EACH.
                msg = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.05)
                if msg is not None:
                    assert msg["type"] == "smessage"
                    received.append((msg["channel"], msg["data"]))
            assert sorted(received) == sorted([(a.encode(), b"to-a"), (b.encode(), b"to-b")])

            # With nothing to read the call waits timeout x (number of subscribed nodes).
            started = time.monotonic()
            assert await pubsub.get_sharded_message(timeout=0.1) is None
            assert time.monotonic() - started >= 0.18

            # target_node reads only that node's connection: a message on another shard is not seen there.
            node_a = _node_for(client, a)
            node_b = _node_for(client, b)
            await client.spublish(b, "only-b")
            assert await pubsub.get_sharded_message(target_node=node_a, timeout=0.1) is None
            msg = await pubsub.get_sharded_message(target_node=node_b, timeout=1)
            assert msg is not None and msg["data"] == b"only-b"
        finally:
            await pubsub.aclose()
            await client.aclose()

    _run(probe)


def test_sharded_pubsub_one_blocking_reader_per_node(redis_cluster_url: str) -> None:  # noqa: F811
    """The low-latency pattern: a task per node blocks in get_sharded_message(target_node=..., timeout=None)."""
    tag = _tag()

    async def probe() -> list[float]:
        client = RedisCluster.from_url(redis_cluster_url)
        await client.initialize()
        channels = _channels_on_distinct_nodes(client, tag, 3)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        inbox: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

        async def reader(node: ClusterNode) -> None:
            while node.name in pubsub.node_pubsub_mapping:  # the per-node PubSub is dropped once unsubscribed
                # Annotated `timeout: float`, but None is passed through to PubSub.get_message: block forever.
                msg = await pubsub.get_sharded_message(target_node=node, timeout=None)  # type: ignore[arg-type]
                if msg is not None:
                    await inbox.put((msg["data"], time.monotonic()))

        readers: list[asyncio.Task[None]] = []
        try:
            await pubsub.ssubscribe(*channels)
            readers = [asyncio.create_task(reader(_node_for(client, c))) for c in channels]
            latencies = []
            for i in range(60):
                sent = time.monotonic()
                assert await client.spublish(channels[i % 3], str(i)) == 1
                data, arrived = await asyncio.wait_for(inbox.get(), 2)
                assert data == str(i).encode()
                latencies.append(arrived - sent)
            return latencies
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await pubsub.aclose()
            await client.aclose()

    latencies = sorted(_run(probe))
    assert latencies[len(latencies) // 2] < 0.05


def test_sharded_pubsub_reconnects_after_one_error(redis_cluster_url: str) -> None:  # noqa: F811
    """A dropped per-node connection surfaces ONE ConnectionError (node pools use retries=0); the next call
    reconnects and re-subscribes. Messages published in the gap are lost (pub/sub is at-most-once)."""
    tag = _tag()

    async def probe() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        await client.initialize()
        (channel,) = _channels_on_distinct_nodes(client, tag, 1)
        node = _node_for(client, channel)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.ssubscribe(channel)
            assert await pubsub.get_sharded_message(timeout=0.2) is None  # consumes the confirmation
            # Private cluster: killing every pub/sub client on this node touches only this test.
            assert await client.execute_command("CLIENT KILL", "TYPE", "pubsub", target_nodes=node) >= 1
            with pytest.raises(redis.ConnectionError):
                for _ in range(10):
                    await pubsub.get_sharded_message(timeout=0.1)
            assert await pubsub.get_sharded_message(timeout=0.2) is None  # reconnects, re-sends SSUBSCRIBE
            assert await client.spublish(channel, "after") == 1
            msg = await pubsub.get_sharded_message(timeout=1)
            assert msg is not None and msg["data"] == b"after"
        finally:
            await pubsub.aclose()
            await client.aclose()

    _run(probe)


# ---- d. sharded pub/sub on a plain Redis 7 -------------------------------------------------------


def test_sharded_pubsub_on_plain_redis(redis_url: str) -> None:
    channel = f"sessiond-probe-{_tag()}:events"

    async def probe() -> None:
        client = Redis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            # The asyncio PubSub has no get_sharded_message (only the sync one aliases it): use get_message.
            assert not hasattr(pubsub, "get_sharded_message")
            await pubsub.ssubscribe(channel)
            confirmation = await pubsub.get_message(timeout=1)
            assert confirmation is not None and confirmation["type"] == "ssubscribe"
            assert await client.spublish(channel, "hello") == 1
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            assert msg is not None
            assert (msg["type"], msg["channel"], msg["data"]) == ("smessage", channel.encode(), b"hello")
            assert await client.pubsub_shardnumsub(channel) == [(channel.encode(), 1)]
            await pubsub.sunsubscribe(channel)
            msg = await pubsub.get_message(timeout=1)
            assert msg is not None and msg["type"] == "sunsubscribe"
            assert await client.pubsub_shardnumsub(channel) == [(channel.encode(), 0)]
        finally:
            await pubsub.aclose()
            await client.aclose()

    _run(probe)


# ---- e. telling a cluster from a plain server ----------------------------------------------------


async def _is_cluster(url: str) -> bool:
    """Ask the server behind `url` with a plain client: INFO cluster works on both kinds (CLUSTER INFO does not)."""
    probe = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return bool((await probe.info("cluster"))["cluster_enabled"])
    finally:
        await probe.aclose()


def test_detect_cluster_mode_from_url(redis_url: str, redis_cluster_url: str) -> None:  # noqa: F811
    async def probe() -> None:
        assert await _is_cluster(redis_cluster_url) is True
        assert await _is_cluster(redis_url) is False
        # Picking the wrong class fails loudly at first use, not silently:
        wrong = RedisCluster.from_url(redis_url)
        try:
            with pytest.raises(redis.RedisClusterException, match="Cluster mode is not enabled"):
                await wrong.initialize()
        finally:
            await wrong.aclose()

    _run(probe)
