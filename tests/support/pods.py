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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from bench.pods import Balancer
from bench.server import free_port
from tests.integration.harness import SECRET

__all__ = ["Balancer", "Pod", "Pods", "free_port"]

ROOT = Path(__file__).resolve().parents[2]


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
            "SESSIOND_REST_RATE_LIMIT": "100000/100000",
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
