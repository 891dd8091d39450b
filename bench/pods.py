"""A sessiond cluster on loopback for the `cluster` scenario: N `sessiond serve` pods sharing the local Redis
(under a key prefix of their own) and PostgreSQL, a round-robin TCP balancer, the admin view, and the clean-up.

The pods are members of one cluster (DESIGN §6): SESSIOND_REDIS_URL, SESSIOND_REDIS_PREFIX, SESSIOND_POD_ID,
SESSIOND_LEASE_TTL_S, SESSIOND_DATABASE_URL and SESSIOND_DURABILITY=redis. Any pod serves any device; `kill()` is
a kill -9. Admin calls and the failover's REST probes use a small h11 client (`http`).
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import jwt
import orjson
import trio

from bench.proc import pin
from bench.server import (
    BENCH_SERVER_ENV,
    REDIS_URL,
    START_TIMEOUT_S,
    ServerError,
    Target,
    ensure_bench_database,
    free_port,
    redis_client,
    sessiond_command,
    stop_process,
)

SERVICES_HINT = "start them with `scripts/services.sh ensure`"


def run_prefix() -> str:
    """A Redis key prefix for one bench run: `sessiond-bench-<random>:` (deleted at the end)."""
    return f"sessiond-bench-{secrets.token_hex(4)}:"


# ---- the local services ----------------------------------------------------------------------------------


def _redis_check() -> int | None:
    """PING the local Redis; the pid of redis-server when it runs on this machine (for its CPU), else None."""
    import redis

    client = redis_client()
    try:
        client.ping()
        pid = int(client.info("server").get("process_id", 0))
    except redis.RedisError as exc:
        raise ServerError(f"Redis is not reachable at {REDIS_URL} ({exc}); {SERVICES_HINT}") from exc
    finally:
        client.close()
    try:
        comm = Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return None
    return pid if "redis" in comm else None


async def check_services() -> tuple[str, int | None]:
    """Fail with a clear message unless the local Redis and PostgreSQL answer; (database URL, redis-server pid)."""
    redis_pid = await trio.to_thread.run_sync(_redis_check)
    database = await ensure_bench_database()
    return database, redis_pid


# ---- HTTP (setup, admin, the failover probes) ------------------------------------------------------------


async def http(method: str, url: str, body: Any = None, token: str | None = None,
               timeout: float = 10.0) -> tuple[int, Any]:
    """One HTTP/1.1 request on a fresh connection (h11 on trio: many can wait at once without threads);
    (status, JSON body), status 0 when no answer came (connection refused or reset, or `timeout`)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = orjson.dumps(body) if body is not None else b""
    headers = [("Host", f"{host}:{port}"), ("Connection", "close"), ("Content-Length", str(len(data)))]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    conn = h11.Connection(h11.CLIENT)
    status, chunks = 0, []
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return 0, None
        async with stream:
            try:
                out = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
                if data:
                    out += conn.send(h11.Data(data=data)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
                return 0, None
        raw = b"".join(chunks)
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, raw[:300].decode(errors="replace")
    return 0, None


# ---- pods ------------------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    http_port: int
    ws_port: int
    log: Path
    proc: trio.Process | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    """Running pods and how to reach them; made by `running_cluster`."""

    pods: list[Pod]
    secret: str
    prefix: str
    ttl_s: float
    storage: str
    redis_pid: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def live(self) -> list[Pod]:
        return [p for p in self.pods if p.alive]

    def token(self, roles: list[str] | None = None, user: str = "bench") -> str:
        claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 7200}
        if roles:
            claims["roles"] = roles
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def target(self, name: str, *, spread: bool) -> Target:
        """A Target for the load generator: REST on the first pod; with `spread`, device j of every session on
        pod j mod N (so most deliveries cross pods), else every device on the first pod."""
        first = self.pods[0]
        return Target(
            name=name, ws_url=first.ws_url, http_url=first.http_url, pid=None, jwt_secret=self.secret,
            info={"storage": self.storage}, pods={p.name: p.pid for p in self.pods},
            services={"redis": self.redis_pid} if self.redis_pid else {},
            device_urls=[p.ws_url for p in self.pods] if spread else [],
        )

    async def admin_view(self, pod: Pod | None = None) -> dict[str, Any]:
        """`GET /v1/admin/actors` on `pod` (default: the first live one): every pod's actors."""
        pod = pod or self.live()[0]
        status, body = await http("GET", f"{pod.http_url}/v1/admin/actors", token=self.token(["admin"]))
        if status != 200 or not isinstance(body, dict):
            raise ServerError(f"GET /v1/admin/actors on {pod.name}: {status} {body!r}")
        return body

    async def converge(self, timeout_s: float = 20.0) -> dict[str, Any]:
        """Wait until every live pod lists exactly the live pods as members; the last admin view."""
        live = self.live()
        names = sorted(p.name for p in live)
        view: dict[str, Any] = {}
        with trio.move_on_after(timeout_s):
            while True:
                seen = []
                for pod in live:
                    view = await self.admin_view(pod)
                    seen.append(view.get("members"))
                if all(s == names for s in seen):
                    return view
                await trio.sleep(0.1)
        raise ServerError(f"the pods did not agree on the members {names} within {timeout_s:.0f} s: {seen}")

    def kill(self, pod: Pod) -> None:
        """kill -9 (the wait for the exit is the caller's: `await pod.proc.wait()`)."""
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGKILL)


async def _ready(pod: Pod) -> None:
    assert pod.proc is not None
    with trio.move_on_after(START_TIMEOUT_S):
        while True:
            if pod.proc.poll() is not None:
                raise ServerError(f"{pod.name} exited with {pod.proc.returncode} while starting:\n{pod.tail()}")
            status, _ = await http("GET", f"{pod.http_url}/readyz", timeout=2)
            if status == 200:
                return
            await trio.sleep(0.1)
    raise ServerError(f"{pod.name} not ready after {START_TIMEOUT_S:.0f} s (log: {pod.log}):\n{pod.tail()}")


async def _stop(pods: list[Pod], grace_s: float) -> None:
    """SIGTERM every live pod at once (each drains), SIGKILL what is still running after `grace_s`."""

    async with trio.open_nursery() as nursery:
        for pod in pods:
            if pod.proc is not None:
                nursery.start_soon(stop_process, pod.proc, grace_s)


@asynccontextmanager
async def running_cluster(count: int, workdir: Path, *, database_url: str, prefix: str, ttl_s: float,
                          redis_pid: int | None = None, cpus: set[int] | None = None,
                          durability: str = "redis", extra_env: dict[str, str] | None = None
                          ) -> AsyncIterator[Cluster]:
    """Start `count` pods (pod-1…pod-N) on free loopback ports, wait until they are ready and agree on the
    members, yield the cluster; stop every pod afterwards (also the ones a scenario did not kill)."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    base.update({
        "PYTHONUNBUFFERED": "1",
        "SESSIOND_HOST": "127.0.0.1",
        "SESSIOND_JWT_SECRET": secret,
        **BENCH_SERVER_ENV,
        "SESSIOND_REDIS_URL": REDIS_URL,
        "SESSIOND_REDIS_PREFIX": prefix,
        "SESSIOND_DATABASE_URL": database_url,
        "SESSIOND_DURABILITY": durability,
        "SESSIOND_ALLOW_DURABILITY_SWITCH": "1",  # the bench database serves every mode, one run after another
        "SESSIOND_LEASE_TTL_S": f"{ttl_s:g}",
        **(extra_env or {}),
    })
    pods: list[Pod] = []
    try:
        for i in range(1, count + 1):
            name = f"pod-{i}"
            pod = Pod(name, free_port(), free_port(), workdir / f"{name}.log")
            env = {**base, "SESSIOND_POD_ID": name, "SESSIOND_HTTP_PORT": str(pod.http_port),
                   "SESSIOND_WS_PORT": str(pod.ws_port), "SESSIOND_DATA_DIR": str(workdir / f"{name}-data")}
            with pod.log.open("ab") as out:
                pod.proc = await trio.lowlevel.open_process(sessiond_command(), env=env, stdout=out,
                                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            pods.append(pod)
            pin(pod.pid, cpus)
        async with trio.open_nursery() as nursery:
            for pod in pods:
                nursery.start_soon(_ready, pod)
        cluster = Cluster(pods, secret, prefix, ttl_s, storage=f"redis+postgres, durability={durability}",
                          redis_pid=redis_pid)
        await cluster.converge()
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await _stop(pods, grace_s=15.0)


# ---- the balancer ----------------------------------------------------------------------------------------


class Balancer:
    """A round-robin TCP load balancer on loopback, no stickiness: a connection that cannot reach a pod (it
    refuses: killed) tries the next one, like a cloud balancer between two health checks."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = free_port()
        self._next = itertools.count()
        self.connections = 0
        self.refused = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        # Each connection tries every backend once, from its own turn: a counter shared by the tries of
        # concurrent connections can hand one connection the dead backend every time (it is then refused while
        # live pods exist, and trio-websocket waits out its whole timeout for a handshake closed that way).
        upstream = None
        backends = list(self.backends)
        start = next(self._next)
        for k in range(len(backends)):
            port = backends[(start + k) % len(backends)]
            try:
                with trio.fail_after(1):
                    upstream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except (OSError, trio.TooSlowError):
                self.refused += 1
                continue
        if upstream is None:
            await client.aclose()
            return
        self.connections += 1
        await splice(client, upstream)


async def splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy bytes both ways until either side closes; then close both (a TCP proxy's whole job)."""
    async with a, b, trio.open_nursery() as nursery:

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)
