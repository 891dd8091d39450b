"""`python -m bench.groupcommit_probe`: the CPU the Redis group commit costs the trio thread, per append.

In process, no server: K tasks ("actors") each append one change at a time through the production stack
(`BatchingJournal` over `RedisJournal` on a `TrioRedisConnection`, its watchdog running) and wait for it, as an
actor's turn does. Reported per K: CPU µs of this process per append, wall µs per append, and round trips per
append (1.0 when every append flushes alone; lower when appends share a flush). Then the floor: the same append
script sent on the bare connection, one exchange at a time. The process is pinned to one core when the machine
has two or more; where Redis runs matters (waking it on another core costs the sender its IPI), so the core
redis-server last ran on is printed. Needs the local Redis; uses a key prefix of its own and deletes its keys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from storage.batching import BatchingJournal
from storage.ports import Change
from storage.redis_store import RedisClient, RedisJournal
from storage.redis_trio import TrioRedisConnection

REDIS_URL = "redis://127.0.0.1:6379/0"


def _change(version: int) -> list[Change]:
    return [Change(version, "dev-1", version, [{"op": "inc", "path": "/n", "value": 1}])]


def _redis_core() -> str:
    """The core redis-server last ran on (field 39 of /proc/PID/stat), or '?'."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "redis-server":
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[36]
        except OSError:
            continue
    return "?"


async def _group_commit(keys: RedisClient, appenders: int, appends: int) -> tuple[float, float, float]:
    conn = TrioRedisConnection(REDIS_URL, 5.0)
    journal = BatchingJournal(RedisJournal(keys, 1 << 30, conn))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.watch)
            nursery.start_soon(journal.run)
            await journal.append("warm", _change(1))

            async def actor(k: int) -> None:
                for version in range(1, appends + 1):
                    await journal.append(f"s{k}", _change(version))

            flushes = journal.flushes
            cpu, wall = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as actors:
                for k in range(appenders):
                    actors.start_soon(actor, k)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            nursery.cancel_scope.cancel()
        total = appenders * appends
        return cpu / total * 1e6, wall / total * 1e6, (journal.flushes - flushes) / total
    finally:
        await _delete(keys, ["warm", *(f"s{k}" for k in range(appenders))])
        conn.close()


async def _bare(keys: RedisClient, appends: int) -> tuple[float, float]:
    """The append script on the bare connection: the floor under the group commit."""
    conn = TrioRedisConnection(REDIS_URL, 5.0)
    journal = RedisJournal(keys, 1 << 30, conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.watch)
            commands: list[Any] = [journal._append_args("bare", _change(v), 0) for v in range(1, appends + 1)]
            await conn.exchange([("PING",)])
            cpu, wall = time.process_time(), time.perf_counter()
            for command in commands:
                await conn.exchange([command])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            nursery.cancel_scope.cancel()
        return cpu / appends * 1e6, wall / appends * 1e6
    finally:
        await _delete(keys, ["bare"])
        conn.close()


async def _delete(keys: RedisClient, sessions: list[str]) -> None:
    conn = TrioRedisConnection(REDIS_URL, 5.0)
    try:
        await conn.exchange([("DEL", *(keys.journal_key(s) for s in sessions))])
    finally:
        conn.close()


async def main(appenders: list[int], appends: int, runs: int) -> None:
    # Key naming only: the trio path uses nothing else of the client (no bridge, no redis.asyncio client).
    keys = RedisClient(None, None, f"sessiond-gcprobe-{uuid.uuid4().hex[:8]}:")  # type: ignore[arg-type]
    print(f"pinned to {sorted(os.sched_getaffinity(0))}; redis-server last ran on core {_redis_core()}")
    print(f"{'appenders':>9}  {'CPU µs/append':>22}  {'wall µs/append':>14}  {'round trips/append':>18}")
    for k in appenders:
        rows = [await _group_commit(keys, k, max(appends // k, 50)) for _ in range(runs)]
        cpus = [r[0] for r in rows]
        print(f"{k:>9}  {statistics.median(cpus):>8.1f} ({min(cpus):.1f}-{max(cpus):.1f})"
              f"  {statistics.median(r[1] for r in rows):>14.1f}  {statistics.median(r[2] for r in rows):>18.2f}")
    bare = [await _bare(keys, appends) for _ in range(runs)]
    cpus = [b[0] for b in bare]
    print(f"{'bare':>9}  {statistics.median(cpus):>8.1f} ({min(cpus):.1f}-{max(cpus):.1f})"
          f"  {statistics.median(b[1] for b in bare):>14.1f}  {1.0:>18.2f}")
    print(f"redis-server last ran on core {_redis_core()}")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.groupcommit_probe", description=__doc__)
    parser.add_argument("--appenders", type=int, nargs="+", default=[1, 3, 20], help="K concurrent appenders")
    parser.add_argument("--appends", type=int, default=3000, help="appends per run (split among the K)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median and range reported)")
    args = parser.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    trio.run(main, args.appenders, args.appends, args.runs)


if __name__ == "__main__":
    cli()
