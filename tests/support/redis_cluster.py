"""Start a throwaway Redis Cluster (N masters, no replicas) on loopback from the `redis-server` binary.

Tests and benchmarks need a real cluster (MOVED routing, hash slots, sharded pub/sub) without depending on a
shared, pre-provisioned one. `redis_cluster()` starts one in a private directory, waits until every node agrees
the cluster is healthy, and stops every process on exit, including after a half-finished start. It is plain
sync code (subprocess + redis-py's sync client) so it can run from a session fixture outside any event loop.

Startup is bounded by Redis itself: a fresh master keeps `cluster_state:fail` for its first ~2 s (Redis'
CLUSTER_WRITABLE_DELAY), so the nodes are started in parallel and the whole start takes a little over 2 s.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

HOST = "127.0.0.1"
SLOTS = 16384
BUS_PORT_OFFSET = 10000  # Redis' cluster bus listens on port + 10000 by default
STARTUP_TIMEOUT = 15.0  # generous ceiling for slow CI machines; a normal start takes ~2.2 s
STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 3  # retries with fresh ports when another process grabbed one between the check and the bind


@dataclass(frozen=True)
class ClusterInfo:
    """Where the running cluster listens: `url` points at the first node, any node works as a seed."""

    ports: list[int]
    url: str
    startup_seconds: float = 0.0  # measured wall time from the first Popen to a healthy cluster


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message names the node and quotes the end of its log."""


class _PortTaken(ClusterStartError):
    """A node could not bind its port (a race with another process): retried with fresh ports."""


def find_redis_server() -> str:
    """Path of `redis-server`, or a RuntimeError: CI must fail, not skip, when it is missing."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "redis-server is not installed (needed to start a throwaway Redis Cluster); "
            "install it with `apt-get install redis-server` or `scripts/services.sh ensure`"
        )
    return exe


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` distinct loopback ports whose cluster-bus port (port + 10000) is free as well.

    The probing sockets stay bound until all ports are chosen so the kernel cannot hand out one twice; there is
    still a short window before redis-server binds, which `redis_cluster` covers by retrying.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 200):
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
            bus = port + BUS_PORT_OFFSET
            if bus > 65535 or bus in ports or port in (p + BUS_PORT_OFFSET for p in ports):
                continue
            if _port_is_free(bus):
                ports.append(port)
        if len(ports) < count:
            raise RuntimeError(f"could not find {count} free loopback ports with a free port + {BUS_PORT_OFFSET}")
        return ports
    finally:
        for sock in held:
            sock.close()


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Node:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=2)

    def failure(self, what: str) -> ClusterStartError:
        """The error to raise about this node, with its log tail; a port race gets its own retryable type."""
        tail = _log_tail(self.log)
        cls = _PortTaken if "Address already in use" in tail else ClusterStartError
        return cls(f"redis-server on port {self.port} {what}; log {self.log}:\n{tail}")


def _start_node(exe: str, port: int, base: Path) -> _Node:
    workdir = base / f"node-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        exe,
        "--port", str(port),
        "--bind", HOST,
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
        "--cluster-node-timeout", "2000",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--protected-mode", "no",
        "--logfile", str(workdir / f"redis-{port}.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _Node(port=port, workdir=workdir, proc=proc)


def _wait_until_answering(nodes: list[_Node], deadline: float) -> None:
    pending = list(nodes)
    while pending:
        for node in list(pending):
            if node.proc.poll() is not None:
                raise node.failure(f"exited with status {node.proc.returncode} during startup")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError), node.client() as client:
                # Check the pid: if another server grabbed the port first, it must not receive our commands.
                if client.info("server").get("process_id") == node.proc.pid:
                    pending.remove(node)
        if pending:
            if time.monotonic() > deadline:
                raise pending[0].failure("did not answer in time")
            time.sleep(0.01)


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slot ranges, one per master (the first ones get the remainder)."""
    base, extra = divmod(SLOTS, masters)
    ranges, start = [], 0
    for i in range(masters):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def _form_cluster(nodes: list[_Node]) -> None:
    """Give each node its slots and a distinct config epoch (avoids epoch-collision rounds), then MEET all."""
    for i, (node, (first, last)) in enumerate(zip(nodes, _slot_ranges(len(nodes)), strict=True)):
        with node.client() as client:
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
    # Full mesh instead of one seed: no waiting for gossip rounds (about 1 s each) to introduce the others.
    for i, node in enumerate(nodes):
        with node.client() as client:
            for other in nodes[i + 1 :]:
                client.execute_command("CLUSTER", "MEET", HOST, other.port)


def _node_ready(node: _Node, masters: int) -> bool:
    """The node sees a healthy cluster: state ok, all slots assigned, every master known and connected."""
    try:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
            if isinstance(info, bytes):
                info = info.decode()
            fields = dict(line.split(":", 1) for line in str(info).splitlines() if ":" in line)
            if (
                fields.get("cluster_state") != "ok"
                or int(fields.get("cluster_slots_assigned", 0)) != SLOTS
                or int(fields.get("cluster_known_nodes", 0)) != masters
            ):
                return False
            raw = client.execute_command("CLUSTER", "NODES")
    except redis.RedisError:  # not ready yet; a persistent error ends in the deadline message with the log tail
        return False
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    # Field 7 is the link state; a node still in handshake or marked fail is not ready for clients.
    return len(lines) == masters and all(
        parts[7] == "connected" and "handshake" not in parts[2] and "fail" not in parts[2] for parts in lines
    )


def _wait_until_ready(nodes: list[_Node], deadline: float) -> None:
    while True:
        for node in nodes:
            if node.proc.poll() is not None:
                raise node.failure(f"exited with status {node.proc.returncode} while the cluster was forming")
        if all(_node_ready(node, len(nodes)) for node in nodes):
            return
        if time.monotonic() > deadline:
            raise nodes[0].failure(f"and its peers did not reach cluster_state:ok within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.02)


def _stop(nodes: list[_Node]) -> None:
    """SIGTERM every node, then SIGKILL the ones still alive after STOP_TIMEOUT; always reaps them."""
    for node in nodes:
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                node.proc.kill()
            node.proc.wait()


@contextlib.contextmanager
def redis_cluster(tmp_dir: Path, masters: int = 3) -> Iterator[ClusterInfo]:
    """Run a `masters`-node Redis Cluster (no replicas) under `tmp_dir` for the duration of the block.

    Every node gets its own directory `tmp_dir/node-<port>` (nodes.conf and log stay there for post-mortems).
    Raises RuntimeError if redis-server is missing and ClusterStartError (a RuntimeError) if the cluster does
    not come up; in every case, all processes started so far are stopped.
    """
    if masters < 1:
        raise ValueError("a cluster needs at least one master")
    exe = find_redis_server()
    started = time.monotonic()
    nodes: list[_Node] = []
    try:
        for attempt in range(_PORT_ATTEMPTS):
            deadline = time.monotonic() + STARTUP_TIMEOUT
            try:
                for port in free_cluster_ports(masters):
                    nodes.append(_start_node(exe, port, tmp_dir))
                _wait_until_answering(nodes, deadline)
                break
            except _PortTaken:
                _stop(nodes)
                nodes.clear()
                if attempt == _PORT_ATTEMPTS - 1:
                    raise
        try:
            _form_cluster(nodes)
        except redis.RedisError as exc:
            raise nodes[0].failure(f"or a peer rejected the cluster setup ({type(exc).__name__}: {exc})") from exc
        _wait_until_ready(nodes, deadline)
        ports = [node.port for node in nodes]
        yield ClusterInfo(ports=ports, url=f"redis://{HOST}:{ports[0]}", startup_seconds=time.monotonic() - started)
    finally:
        _stop(nodes)
