"""Real sessiond processes on loopback sharing one Redis (and PostgreSQL), and a load balancer in front of them.

`Pods` starts `python -m api.cli serve` children with their own ports and pod ids and the shared stores' URLs,
waits for /readyz, and can kill -9, SIGSTOP, SIGCONT or SIGTERM each one. Logs go to files in the test's
tmp dir (shown by `tail()` when a test fails). `Balancer` is a round-robin TCP proxy with no stickiness, like
the load balancer the README asks for: a connection that fails to reach a pod tries the next one.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from tests.integration.harness import SECRET

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pod:
    name: str
    http: int
    ws: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws}/v1/ws"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Pods:
    """A cluster of sessiond processes; use as a context manager (every child is killed on exit)."""

    tmp: Path
    env: dict[str, str]
    ttl_s: float = 2.0
    pods: dict[str, Pod] = field(default_factory=dict)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __enter__(self) -> Pods:
        return self

    def __exit__(self, *exc: object) -> None:
        for pod in self.pods.values():
            if pod.proc is not None and pod.proc.poll() is None:
                if pod.frozen:
                    pod.proc.send_signal(signal.SIGCONT)
                pod.proc.kill()
                pod.proc.wait(10)

    def spawn(self, extra: dict[str, str] | None = None, name: str | None = None) -> Pod:
        name = name or f"pod-{next(self._names)}"
        pod = Pod(name, free_port(), free_port(), self.tmp / f"{name}.log")
        env = {
            **os.environ,
            "SESSIOND_DATA_DIR": str(self.tmp / name),
            "SESSIOND_HTTP_PORT": str(pod.http),
            "SESSIOND_WS_PORT": str(pod.ws),
            "SESSIOND_JWT_SECRET": SECRET,
            "SESSIOND_LOG_FORMAT": "json",
            "SESSIOND_RATE_LIMIT": "100000/100000",
            "SESSIOND_POD_ID": name,
            "SESSIOND_LEASE_TTL_S": str(self.ttl_s),
            **self.env,
            **(extra or {}),
        }
        with pod.log.open("ab") as log:
            pod.proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.pods[name] = pod
        return pod

    async def start(self, count: int = 1, extra: dict[str, str] | None = None) -> list[Pod]:
        started = [self.spawn(extra) for _ in range(count)]
        for pod in started:
            await self.ready(pod)
        return started

    async def ready(self, pod: Pod, timeout_s: float = 30.0) -> None:
        with trio.fail_after(timeout_s):
            while True:
                assert pod.proc is not None
                if pod.proc.poll() is not None:
                    raise AssertionError(f"{pod.name} exited with {pod.proc.returncode}:\n{self.tail(pod)}")
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"{pod.http_url}/readyz", timeout=2)).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    def live(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.alive and not p.frozen]

    def kill(self, pod: Pod) -> None:
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGKILL)
        pod.proc.wait(10)

    def freeze(self, pod: Pod) -> None:
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGSTOP)
        pod.frozen = True

    def thaw(self, pod: Pod) -> None:
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGCONT)
        pod.frozen = False

    async def terminate(self, pod: Pod, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait for the exit; its return code."""
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout_s):
            while pod.proc.poll() is None:
                await trio.sleep(0.05)
        return pod.proc.returncode

    def tail(self, pod: Pod, lines: int = 40) -> str:
        try:
            return "\n".join(pod.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{self.tail(p, 25)}" for p in self.pods.values())


class Balancer:
    """A round-robin TCP load balancer on loopback (no stickiness); a backend that refuses is skipped."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = free_port()
        self._next = itertools.count()
        self.connections = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        upstream = None
        start = next(self._next)
        backends = list(self.backends)
        for i in range(len(backends)):  # each backend once, starting at this connection's turn
            port = backends[(start + i) % len(backends)]
            try:
                with trio.fail_after(1):
                    upstream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except (OSError, trio.TooSlowError):
                continue
        if upstream is None:
            await client.aclose()
            return
        self.connections += 1
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    while data := await src.receive_some(65536):
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
