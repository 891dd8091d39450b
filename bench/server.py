"""Starting, reaching and stopping the servers under test: the baseline, sessiond (embedded, Redis,
PostgreSQL) or a URL.

REST calls (session creation) are setup, never measured: they use urllib.request in worker threads
(`trio.to_thread.run_sync`), at most a few at once.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
import trio

from bench.proc import pin

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "sessiond_bench"
START_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """The server under test did not start, or refused the bench's setup calls."""


@dataclass(slots=True)
class Target:
    """How the load generator reaches one server, and the handle to measure it."""

    name: str  # "baseline" | "sessiond" | a label for --url
    ws_url: str
    http_url: str | None = None  # None: sessions are made up locally (the baseline creates them on hello)
    pid: int | None = None  # for /proc CPU and RSS; None when unknown (--url without --server-pid)
    jwt_secret: str | None = None
    user: str = "bench"
    info: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, int] = field(default_factory=dict)  # a cluster: pod name -> pid (CPU per pod); pid is None
    services: dict[str, int] = field(default_factory=dict)  # measured beside the server, e.g. redis-server
    device_urls: list[str] = field(default_factory=list)  # device j of a session connects to [j mod len]
    _counter: int = 0

    def device_url(self, index: int) -> str:
        """The WebSocket URL for device `index` of a session: one pod per index on a cluster, else ws_url."""
        return self.device_urls[index % len(self.device_urls)] if self.device_urls else self.ws_url

    def token(self, ttl_s: int = 7200) -> str | None:
        """An HS256 JWT for the bench user (claims sub + exp), or None when the target needs none."""
        if self.jwt_secret is None:
            return None
        claims = {"sub": self.user, "exp": int(time.time()) + ttl_s}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    async def create_sessions(self, n: int, *, label: str = "s", state: dict[str, Any] | None = None) -> list[str]:
        """n new session ids: `POST /v1/sessions` on sessiond (with `state` if given), fresh local names on the
        baseline."""
        self._counter += 1
        if self.http_url is None:
            return [f"{label}{self._counter}-{i}" for i in range(n)]
        token = self.token()
        limiter = trio.CapacityLimiter(8)
        ids: list[str] = [""] * n

        async def one(i: int) -> None:
            body: dict[str, Any] = {"name": f"bench-{label}{self._counter}-{i}"}
            if state is not None:
                body["state"] = state
            reply = await trio.to_thread.run_sync(_post_json, f"{self.http_url}/v1/sessions", body, token,
                                                  limiter=limiter)
            ids[i] = str(reply["id"])

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return ids


def _post_json(url: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=orjson.dumps(body), method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = orjson.loads(response.read())
            return result
    except urllib.error.HTTPError as exc:
        raise ServerError(f"POST {url}: {exc.code} {exc.read()[:300]!r}") from exc


def redis_client() -> Any:
    """A sync redis-py client for the local Redis (setup and clean-up, in worker threads)."""
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=30)


def _delete_keys(prefix: str) -> int:
    client = redis_client()
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


async def delete_keys(prefix: str) -> int:
    """Unlink every Redis key under `prefix` (a bench run's own); how many there were."""
    return await trio.to_thread.run_sync(_delete_keys, prefix)


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sessiond_command() -> list[str]:
    """`sessiond serve` from this venv (next to the interpreter), else from PATH."""
    exe = Path(sys.executable).with_name("sessiond")
    found = str(exe) if exe.exists() else shutil.which("sessiond")
    if found is None:
        raise ServerError("the sessiond command is not installed")
    return [found, "serve"]


def sessiond_runnable() -> bool:
    """Whether `sessiond serve` can start here (the CLI module exists); used to skip tests until it does."""
    try:
        import importlib.util

        return importlib.util.find_spec("api.cli") is not None and bool(sessiond_command())
    except (ServerError, ImportError):
        return False


async def _wait_ready(proc: trio.Process, port: int, health_url: str | None, log: Path) -> None:
    with trio.move_on_after(START_TIMEOUT_S) as scope:
        while True:
            if proc.returncode is not None or proc.poll() is not None:
                tail = (await trio.Path(log).read_text(errors="replace"))[-2000:]
                raise ServerError(f"server exited with {proc.returncode} while starting:\n{tail}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
                if health_url is None or await trio.to_thread.run_sync(_get_status, health_url) == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.1)
    if scope.cancelled_caught:
        raise ServerError(f"server not ready on port {port} after {START_TIMEOUT_S:.0f} s (log: {log})")


# What every sessiond the bench starts gets: the bench measures cost, not the rate limiters or the quotas (one bench
# user opens thousands of sessions and connections), and it reads JSON logs.
BENCH_SERVER_ENV = {
    "SESSIOND_RATE_LIMIT": "1000000/1000000",
    "SESSIOND_REST_RATE_LIMIT": "1000000/1000000",
    "SESSIOND_MAX_SESSIONS_PER_USER": "1000000",
    "SESSIOND_MAX_CONNECTIONS_PER_USER": "1000000",
    "SESSIOND_LOG_FORMAT": "json",
    "SESSIOND_LOG_LEVEL": "warning",
}


async def stop_process(proc: trio.Process, grace_s: float = 15.0) -> None:
    """SIGTERM (a sessiond drains), then SIGKILL after `grace_s`; returns once the process is gone."""
    if proc.poll() is not None:
        await proc.wait()
        return
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await proc.wait()
        return
    proc.kill()
    await proc.wait()


async def ensure_bench_database() -> str:
    """Create the bench database on the local PostgreSQL if missing; returns its URL. ServerError when PostgreSQL
    cannot be reached (or psql is missing), with what to do about it."""
    psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc"]

    async def run(sql: str) -> bytes:
        try:
            done = await trio.run_process([*psql, sql], capture_stdout=True, capture_stderr=True, check=False)
        except FileNotFoundError as exc:
            raise ServerError("psql is not installed: it is needed to create the bench database") from exc
        if done.returncode != 0 and b"already exists" not in done.stderr:  # a concurrent run created it
            raise ServerError(f"PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) refused `{sql}`: "
                              f"{done.stderr.decode(errors='replace').strip()}; start it with "
                              f"`scripts/services.sh ensure`")
        return bytes(done.stdout)

    if (await run(f"SELECT 1 FROM pg_database WHERE datname='{BENCH_DB}'")).strip() != b"1":
        await run(f"CREATE DATABASE {BENCH_DB}")
    return f"postgresql://postgres@127.0.0.1:5432/{BENCH_DB}"


@asynccontextmanager
async def spawned(name: str, argv: list[str], env: dict[str, str], port: int, health_url: str | None,
                  workdir: Path, cpus: set[int] | None) -> AsyncIterator[trio.Process]:
    """Run `argv` with its output in workdir/<name>.log, pinned to `cpus`, until the block exits."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        proc = await trio.lowlevel.open_process(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
    try:
        pin(proc.pid, cpus)
        await _wait_ready(proc, port, health_url, log)
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(proc)


@asynccontextmanager
async def running_target(
    name: str,
    workdir: Path,
    *,
    cpus: set[int] | None = None,
    redis: bool = False,
    postgres: bool = False,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Target]:
    """Start `baseline` or `sessiond` on free loopback ports, yield how to reach it, stop it afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env["PYTHONUNBUFFERED"] = "1"
    if name == "baseline":
        port = free_port()
        argv = [sys.executable, "-m", "bench.baseline", "--host", "127.0.0.1", "--port", str(port)]
        async with spawned(name, argv, env, port, None, workdir, cpus) as proc:
            yield Target(name=name, ws_url=f"ws://127.0.0.1:{port}/v1/ws", pid=proc.pid,
                         info={"storage": "none"})
        return
    if name != "sessiond":
        raise ValueError(f"unknown target {name!r}")
    http_port, ws_port = free_port(), free_port()
    secret = secrets.token_urlsafe(32)
    env.update({
        "SESSIOND_HOST": "127.0.0.1",
        "SESSIOND_HTTP_PORT": str(http_port),
        "SESSIOND_WS_PORT": str(ws_port),
        "SESSIOND_DATA_DIR": str(workdir / "sessiond-data"),
        "SESSIOND_JWT_SECRET": secret,
        **BENCH_SERVER_ENV,
    })
    if redis:
        env["SESSIOND_REDIS_URL"] = REDIS_URL
        env["SESSIOND_REDIS_PREFIX"] = f"sessiond-bench-{secrets.token_hex(4)}:"  # never mixes with other runs
    if postgres:
        env["SESSIOND_DATABASE_URL"] = await ensure_bench_database()
        env["SESSIOND_ALLOW_DURABILITY_SWITCH"] = "1"  # the bench database serves every mode, run after run
    env.update(extra_env or {})
    storage = [s for s, on in (("redis", redis), ("postgres", postgres)) if on] or ["embedded"]
    if env.get("SESSIOND_DURABILITY"):
        storage.append(f"durability={env['SESSIOND_DURABILITY']}")
    http = f"http://127.0.0.1:{http_port}"
    try:
        async with spawned(name, sessiond_command(), env, ws_port, f"{http}/healthz", workdir, cpus) as proc:
            yield Target(name=name, ws_url=f"ws://127.0.0.1:{ws_port}/v1/ws", http_url=http, pid=proc.pid,
                         jwt_secret=secret, info={"storage": "+".join(storage)})
    finally:
        if redis:  # the server has stopped: its keys (journals, snapshots, leases) go with it
            with trio.CancelScope(shield=True):
                await delete_keys(env["SESSIOND_REDIS_PREFIX"])


def url_target(ws_url: str, http_url: str | None, jwt_secret: str | None, pid: int | None,
               name: str = "url") -> Target:
    """A server someone else runs: REST and JWT secret needed for sessiond, none for a baseline."""
    return Target(name=name, ws_url=ws_url, http_url=http_url, pid=pid, jwt_secret=jwt_secret,
                  info={"storage": "unknown (--url)"})
