"""Process measurements from /proc and CPU pinning: the figures that survive noise on shared machines.

CPU time (utime + stime) per delivered message is the headline number of the bench (TRAPS.md): wall-clock
throughput moves with the neighbours, CPU seconds spent per message much less.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_rss_bytes(pid: int) -> int:
    """Resident set size of `pid`, from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def self_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_busy_s() -> float:
    """CPU seconds spent busy (not idle, not iowait) by all cores since boot, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


@dataclass(slots=True)
class CpuWindow:
    """CPU of the server (when its pid is known) and of this generator between `start()` and `stop()`.

    `pods` (name -> pid) measures several server processes, a cluster: `server_s` is then their sum and `pod_s`
    each one's share. `services` (name -> pid, e.g. redis-server) are measured too, apart from the server and
    from "other processes".
    """

    server_pid: int | None
    pods: dict[str, int] = field(default_factory=dict)
    services: dict[str, int] = field(default_factory=dict)
    server_s: float | None = None
    self_s: float = 0.0
    others_s: float | None = None  # every other process on the machine: the noise of a shared box
    pod_s: dict[str, float] = field(default_factory=dict)
    services_s: dict[str, float] = field(default_factory=dict)
    _server0: float | None = None
    _self0: float = 0.0
    _machine0: float = 0.0
    _pods0: dict[str, float] = field(default_factory=dict)
    _services0: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._machine0 = machine_busy_s()
        self._self0 = self_cpu_s()
        self._server0 = process_cpu_s(self.server_pid) if self.server_pid and not self.pods else None
        self._pods0 = {name: process_cpu_s(pid) for name, pid in self.pods.items()}
        self._services0 = _read_all(self.services)

    def stop(self) -> None:
        self.self_s = self_cpu_s() - self._self0
        if self.pods:
            self.pod_s = {name: process_cpu_s(pid) - self._pods0[name] for name, pid in self.pods.items()}
            self.server_s = sum(self.pod_s.values())
        elif self.server_pid and self._server0 is not None:
            self.server_s = process_cpu_s(self.server_pid) - self._server0
        after = _read_all(self.services)
        self.services_s = {name: after[name] - self._services0[name] for name in after if name in self._services0}
        if self.server_s is not None:
            busy = machine_busy_s() - self._machine0
            self.others_s = max(0.0, busy - self.self_s - self.server_s - sum(self.services_s.values()))


def _read_all(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process still readable (a service may be gone or out of reach)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            out[name] = process_cpu_s(pid)
        except (OSError, ValueError, IndexError):
            continue
    return out


def cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def plan_pinning() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, generator cores): disjoint halves when there are two cores or more, else (None, None)."""
    available = cores()
    if len(available) < 2:
        return None, None
    half = len(available) // 2
    return set(available[:half]), set(available[half:])


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin `pid` (0: the calling thread; threads started later inherit it) to `cpus`; None leaves it alone."""
    if cpus:
        os.sched_setaffinity(pid, cpus)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (the capacity scenario opens thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
