"""The `cluster` scenario (issue 7): what the cross-pod relay costs, and how fast and how safely a cluster
fails over after a kill -9 of a pod.

1. **Relay cost.** The fanout workload twice, with the same Redis + PostgreSQL configuration: on one pod (every
   device on its session's owner), then on N pods with device j of every session on pod j mod N, so most acks
   and patches cross pods over Redis pub/sub. Latency, throughput and CPU per delivered message (per pod and
   summed over the pods, plus redis-server's) side by side; "relay adds" is the difference.
2. **Failover.** On the N pods still running, F sessions x D SDK devices (client/sdk.py: it reconnects, resumes
   and retransmits unacked ops with their ids) each send `inc /n` at a light rate through a round-robin TCP
   balancer. The pod owning most of them is killed with SIGKILL; for each of its sessions: the time until a REST
   PATCH on a live pod succeeds (polled every 50 ms) and until each of its devices gets an ack again. At the end
   every session's counter must equal the increments acked (REST increments go to another path, `/rest`), and
   no version may be acked twice: lost and duplicated must be 0.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio

from bench.pods import Balancer, Cluster, Pod, check_services, http, run_prefix, running_cluster
from bench.proc import CpuWindow
from bench.scenarios import GENERATOR_SATURATED, Options, Progress, fanout
from bench.server import ServerError, delete_keys
from bench.stats import percentile
from client.sdk import Session, open_session
from client.wire import SessionError

# SessionError codes the client makes up when a request got no answer (it may or may not have been applied);
# every other code is the server's refusal, which means "not applied" (DESIGN §3).
NO_ANSWER = frozenset({"closed", "disconnected", "timeout"})
PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 15.0  # longer than the server's own relay timeout (10 s): an answer, not a guess
PROBE_OUTSTANDING = 8
FAILOVER_GOAL_S = 5.0
RELAY_GOAL_MS = 2.0


async def run(opts: Options, workdir: Path, cpus: set[int] | None,
              progress: Callable[[str], Progress]) -> dict[str, dict[str, Any]]:
    """The whole scenario: `single` (1 pod), `multi` (N pods, with `relay_adds`), `failover`. Raises
    ServerError when Redis or PostgreSQL does not answer; a part that fails is reported as {"failed": ...}."""
    database, redis_pid = await check_services()
    prefix = run_prefix()
    results: dict[str, dict[str, Any]] = {}
    try:
        try:
            async with running_cluster(1, workdir / "single", database_url=database, prefix=f"{prefix}single:",
                                       ttl_s=opts.ttl, redis_pid=redis_pid, cpus=cpus) as one:
                results["single"] = await fanout(one.target("1 pod", spread=False), opts, progress("1 pod"),
                                                 label="c1-")
        except* ServerError as group:
            results["single"] = {"target": "1 pod", "failed": _message(group)}
        name = f"{opts.pods} pods"
        try:
            async with running_cluster(opts.pods, workdir / "multi", database_url=database,
                                       prefix=f"{prefix}multi:", ttl_s=opts.ttl, redis_pid=redis_pid,
                                       cpus=cpus) as many:
                results["multi"] = await fanout(many.target(name, spread=True), opts, progress(name), label="cN-")
                results["multi"]["devices_on_other_pods"] = await _remote_share(many, opts.devices)
                results["multi"]["relay_adds"] = relay_adds(results["single"], results["multi"])
                try:
                    results["failover"] = await failover(many, opts, progress("failover"))
                except* ServerError as group:
                    results["failover"] = {"target": "failover", "failed": _message(group)}
        except* ServerError as group:
            for part in ("multi", "failover"):
                results.setdefault(part, {"target": part, "failed": _message(group)})
    finally:
        with trio.CancelScope(shield=True):
            deleted = await delete_keys(prefix)
    cores = len(cpus) if cpus else len(os.sched_getaffinity(0))
    for result in results.values():
        result["redis_prefix"] = prefix
        result["redis_keys_deleted"] = deleted
        result["server_cores"] = cores
    return results


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _message(group: BaseExceptionGroup[ServerError]) -> str:
    return "; ".join(str(e) for e in group.exceptions)


def relay_adds(single: dict[str, Any], multi: dict[str, Any]) -> dict[str, float]:
    """N pods minus 1 pod: ack and delivery p50/p99 (ms), CPU per delivered message (µs, all pods)."""
    out: dict[str, float] = {}
    if "failed" in single or "failed" in multi:
        return out
    for key in ("ack", "delivery"):
        for q in ("p50", "p99"):
            out[f"{key}_{q}_ms"] = multi[key][f"{q}_ms"] - single[key][f"{q}_ms"]
    out["server_cpu_per_msg_us"] = multi["server_cpu_per_msg_us"] - single["server_cpu_per_msg_us"]
    return out


async def _remote_share(cluster: Cluster, devices: int) -> float:
    """Share of the fanout devices connected to a pod that does not own their session (their acks and the
    patches they receive are relayed), from the owners in the admin view."""
    view = await cluster.admin_view()
    names = [p.name for p in cluster.pods]
    owners = [a["pod"] for a in view["actors"]]  # a fresh cluster: the fanout's sessions only
    if not owners:
        return math.nan
    remote = sum(1 for owner in owners for j in range(devices) if names[j % len(names)] != owner)
    return remote / (len(owners) * devices)


# ---- failover ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Writer:
    """One SDK device sending `inc /n` at a fixed rate (open loop: a slow ack does not slow the sender)."""

    session: str
    device: str
    acks: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, acked, version), trio clock
    refused: Counter[str] = field(default_factory=Counter)  # server refusals by code: not applied
    started: int = 0
    uncertain: int = 0  # ended without an answer: may or may not have been applied
    reconnects: int = 0
    failed: str | None = None  # could not join
    crashed: str | None = None  # the SDK raised something else (e.g. from trio-websocket's reader while closing)
    has_joined: bool = False
    sdk: Session | None = None
    events: list[tuple[float, str]] = field(default_factory=list)  # (trio clock, what): drops, resyncs, errors

    def on_event(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind in ("disconnected", "reconnected", "welcome", "error", "closed") and len(self.events) < 100:
            detail = {k: v for k, v in frame.items() if k in ("code", "reason", "version", "message", "id")}
            self.events.append((trio.current_time(), f"{kind} {orjson.dumps(detail).decode()}"))

    @property
    def unsettled(self) -> int:
        """Requests still waiting when the settle time ran out (also uncertain)."""
        return self.started - len(self.acks) - sum(self.refused.values()) - self.uncertain

    async def run(self, url: str, token: str, rate: float, settle_s: float, joined: Callable[[], None],
                  go: trio.Event, stop: trio.Event) -> None:
        try:
            async with open_session(url, token=token, session=self.session, device=self.device,
                                    backoff_base_s=0.05, max_backoff_s=0.5, connect_timeout_s=20,
                                    on_event=self.on_event) as s:
                self.sdk = s
                self.has_joined = True
                joined()
                await go.wait()
                async with trio.open_nursery() as inflight:
                    interval = 1.0 / rate
                    deadline = trio.current_time() + random.random() * interval
                    while not stop.is_set():
                        with trio.move_on_at(deadline):
                            await stop.wait()
                        if stop.is_set():
                            break
                        inflight.start_soon(self._inc, s)
                        deadline = max(deadline + interval, trio.current_time() - 1.0)
                    inflight.cancel_scope.deadline = trio.current_time() + settle_s
                self.reconnects = s.reconnects
        except* SessionError as group:
            exc = group.exceptions[0]
            assert isinstance(exc, SessionError)
            self.failed = f"{exc.code}: {exc.message}"
        except* Exception as group:
            self.crashed = "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(group))
        if not self.has_joined:
            joined()

    async def _inc(self, s: Session) -> None:
        self.started += 1
        sent = trio.current_time()
        try:
            version = await s.inc("/n")
        except SessionError as exc:
            if exc.code in NO_ANSWER:
                self.uncertain += 1
            else:
                self.refused[exc.code] += 1
            return
        self.acks.append((sent, trio.current_time(), version))


@dataclass(slots=True)
class Probe:
    """REST increments of `/rest` on one session after the kill, a new attempt every 50 ms on the next live pod
    (at most PROBE_OUTSTANDING waiting at once: a request relayed to the dead owner waits until that pod leaves
    the members), until one returns 200; the attempts still waiting then finish (their outcome is counted)."""

    session: str
    writable_s: float | None = None
    ok_versions: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # every answer but 200 (0: none: refused/timeout)
    waiting: int = 0  # attempts sent, not answered yet

    @property
    def uncertain(self) -> int:
        """Attempts without a clear refusal: no answer, or 5xx (`unavailable`: storage could not confirm)."""
        return self.waiting + sum(n for status, n in self.statuses.items() if status == 0 or status >= 500)

    async def run(self, pods: list[Pod], token: str, killed_at: float, until: float, nursery: trio.Nursery) -> None:
        """Probe until writable; the attempts run in `nursery` and may outlive this call (see `waiting`)."""
        body = {"ops": [{"op": "inc", "path": "/rest"}]}
        slots = trio.Semaphore(PROBE_OUTSTANDING)
        done = trio.Event()

        async def attempt(pod: Pod) -> None:
            self.waiting += 1
            try:
                status, reply = await http("PATCH", f"{pod.http_url}/v1/sessions/{self.session}", body, token,
                                           timeout=PROBE_TIMEOUT_S)
            finally:
                slots.release()
            self.waiting -= 1
            if status == 200 and isinstance(reply, dict):
                if self.writable_s is None:
                    self.writable_s = trio.current_time() - killed_at
                self.ok_versions.append(int(reply["version"]))
                done.set()
            else:
                self.statuses[status] += 1

        i = 0
        while trio.current_time() < until and not done.is_set():
            with trio.move_on_at(until):
                await slots.acquire()
            if done.is_set() or trio.current_time() >= until:
                break
            nursery.start_soon(attempt, pods[i % len(pods)])
            i += 1
            with trio.move_on_after(PROBE_INTERVAL_S):
                await done.wait()


async def _owners(cluster: Cluster, sessions: list[str], timeout_s: float = 15.0,
                  partial: bool = False) -> dict[str, str]:
    """session -> owning pod, once every one of `sessions` is live somewhere (the devices' hello activated it);
    with `partial`, what is live after `timeout_s` instead of an error."""
    wanted = set(sessions)
    owners: dict[str, str] = {}
    with trio.move_on_after(timeout_s):
        while True:
            view = await cluster.admin_view()
            owners = {a["session"]: a["pod"] for a in view["actors"] if a["session"] in wanted}
            if len(owners) == len(wanted):
                return owners
            await trio.sleep(0.1)
    if partial:
        return owners
    raise ServerError(f"only {len(owners)} of {len(wanted)} failover sessions are live after {timeout_s:.0f} s")


async def failover(cluster: Cluster, opts: Options, progress: Progress) -> dict[str, Any]:
    """kill -9 the pod owning most failover sessions under light load; recovery times, lost and duplicated."""
    pods = cluster.live()
    target = cluster.target("failover", spread=False)
    token = target.token() or ""
    sessions = await target.create_sessions(opts.failover_sessions, label="fo", state={"n": 0})
    writers = [Writer(sid, f"w{j}") for sid in sessions for j in range(opts.devices)]
    balancer = Balancer([p.ws_port for p in pods])
    run = _FailoverRun(cluster, opts, progress, pods, writers, token)
    async with trio.open_nursery() as outer:
        run.background = outer
        await outer.start(balancer.run)
        async with trio.open_nursery() as devices:
            for w in writers:
                devices.start_soon(w.run, balancer.ws_url, token, opts.failover_rate, opts.settle, run.joined,
                                   run.go, run.stop)
            try:
                await run.drive(sessions)
            finally:
                run.stop.set()  # the devices settle their requests in flight, then close
                if not run.all_joined.is_set():
                    devices.cancel_scope.cancel()
        with trio.move_on_after(PROBE_TIMEOUT_S + 1):  # the probes' last attempts: their outcome is counted
            while any(p.waiting for p in run.probes):
                progress(1, 1, run.status("last REST probes"))
                await trio.sleep(0.05)
        outer.cancel_scope.cancel()
    if run.failed:
        raise ServerError(run.failed)
    progress(1, 1, run.status("checking"))
    final = await _final_states(run.survivors, token, sessions)
    moved = [p.session for p in run.probes]
    moved_to = Counter((await _owners(cluster, moved, 5.0, partial=True)).values()) if moved else Counter()
    return _failover_result(opts, writers, run, final, moved_to, balancer)


class _FailoverRun:
    """The failover's timeline: load, kill, probes until recovered, load after, stop."""

    def __init__(self, cluster: Cluster, opts: Options, progress: Progress, pods: list[Pod], writers: list[Writer],
                 token: str) -> None:
        self.cluster, self.opts, self.progress, self.pods, self.writers, self.token = (
            cluster, opts, progress, pods, writers, token)
        self.joined_count = 0
        self.all_joined, self.go, self.stop = trio.Event(), trio.Event(), trio.Event()
        self.probes: list[Probe] = []
        self.victim: Pod | None = None
        self.survivors = list(pods)
        self.by_pod: Counter[str] = Counter()
        self.go_at = self.killed_at = self.recovered_at = self.stopped_at = math.nan
        self.cpu = CpuWindow(None)
        self.failed: str | None = None
        self.background: trio.Nursery | None = None  # where the probes' attempts run (they may outlive a probe)

    def joined(self) -> None:
        self.joined_count += 1
        if self.joined_count == len(self.writers):
            self.all_joined.set()

    def status(self, phase: str) -> dict[str, Any]:
        return {"phase": phase, "acked": sum(len(w.acks) for w in self.writers),
                "reconnects": sum(w.sdk.reconnects for w in self.writers if w.sdk is not None)}

    def _tick(self, phase: str) -> None:
        total = self.opts.failover_before + self.opts.ttl + 2.0 + self.opts.failover_after
        self.progress(min(trio.current_time() - self.go_at, total), total, self.status(phase))

    def _recovered(self) -> bool:
        return all(p.writable_s is not None for p in self.probes) and all(
            any(sent >= self.killed_at for sent, _, _ in w.acks) for w in self.writers)

    async def drive(self, sessions: list[str]) -> None:
        with trio.move_on_after(30):
            await self.all_joined.wait()
        if not self.all_joined.is_set():
            self.failed = f"only {self.joined_count} of {len(self.writers)} SDK devices joined within 30 s"
            return
        self.cpu.start()
        self.go.set()
        self.go_at = trio.current_time()
        self._tick("load")
        await trio.sleep(self.opts.failover_before)
        try:
            owners = await _owners(self.cluster, sessions)
        except ServerError as exc:
            self.failed = str(exc)
            return
        self.by_pod = Counter(owners.values())
        victim = self.victim = next(p for p in self.pods if p.name == self.by_pod.most_common(1)[0][0])
        self.survivors = [p for p in self.pods if p is not victim]
        self.probes = [Probe(sid) for sid, pod in sorted(owners.items()) if pod == victim.name]
        self.cluster.kill(victim)
        self.killed_at = trio.current_time()
        assert victim.proc is not None
        await victim.proc.wait()
        until = self.killed_at + self.opts.failover_timeout
        assert self.background is not None
        async with trio.open_nursery() as probing:
            for probe in self.probes:
                probing.start_soon(probe.run, self.survivors, self.token, self.killed_at, until, self.background)
            while trio.current_time() < until and not self._recovered():
                self._tick(f"failover +{trio.current_time() - self.killed_at:.1f}s")
                await trio.sleep(0.1)
        self.recovered_at = trio.current_time()
        end = trio.current_time() + self.opts.failover_after
        while trio.current_time() < end:
            self._tick("after")
            await trio.sleep(0.25)
        self.stopped_at = trio.current_time()
        self.cpu.stop()


async def _final_states(pods: list[Pod], token: str, sessions: list[str]) -> dict[str, dict[str, Any]]:
    """Each session's state and version, read over REST from a live pod (retried while it settles)."""
    out: dict[str, dict[str, Any]] = {}

    async def one(i: int, sid: str) -> None:
        with trio.move_on_after(20):
            while True:
                pod = pods[i % len(pods)]
                status, body = await http("GET", f"{pod.http_url}/v1/sessions/{sid}", token=token)
                if status == 200 and isinstance(body, dict):
                    out[sid] = body
                    return
                i += 1
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for i, sid in enumerate(sessions):
            nursery.start_soon(one, i, sid)
    return out


def _summary_s(values: list[float | None]) -> dict[str, float | int]:
    """count, p50, max in seconds of the values that exist; `missing` counts the Nones."""
    ok = sorted(v for v in values if v is not None)
    ns = [round(v * 1e9) for v in ok]
    return {"count": len(ok), "missing": len(values) - len(ok), "p50_s": percentile(ns, 50) / 1e9,
            "max_s": ok[-1] if ok else math.nan}


def _failover_result(opts: Options, writers: list[Writer], run: _FailoverRun, final: dict[str, dict[str, Any]],
                     moved_to: Counter[str], balancer: Balancer) -> dict[str, Any]:
    probes, killed_at, go_at, stopped_at = run.probes, run.killed_at, run.go_at, run.stopped_at
    moved = {p.session for p in probes}
    # time from the kill until each device got an ack for an op it sent after the kill
    again: dict[tuple[str, str], float | None] = {}
    for w in writers:
        after = [acked - killed_at for sent, acked, _ in w.acks if sent >= killed_at]
        again[(w.session, w.device)] = min(after) if after else None
    per_session_again: list[float | None] = []
    for sid in sorted(moved):
        times = [t for (s, _), t in again.items() if s == sid]
        per_session_again.append(None if any(t is None for t in times) else max(t for t in times if t is not None))
    slowest = sorted(((t, key) for key, t in again.items() if t is not None), reverse=True)[:5]
    slowest += [(math.inf, key) for key, t in again.items() if t is None][:5]
    writer_of = {(w.session, w.device): w for w in writers}
    slow_devices = [{
        "session": sid, "device": dev, "acked_again_s": t, "moved": sid in moved,
        "events": [f"{at - killed_at:+.2f}s {what}" for at, what in writer_of[(sid, dev)].events if at >= go_at],
    } for t, (sid, dev) in slowest]
    writable = _summary_s([p.writable_s for p in probes])
    acked_again = _summary_s(per_session_again)
    every_device = _summary_s(list(again.values()))

    lost = duplicated = repeated = mismatched = rest_lost = rest_duplicated = unreadable = 0
    problems: list[str] = []
    probe_of = {p.session: p for p in probes}
    for sid in sorted({w.session for w in writers}):
        mine = [w for w in writers if w.session == sid]
        acked = sum(len(w.acks) for w in mine)
        uncertain = sum(w.uncertain + w.unsettled for w in mine)
        probe = probe_of.get(sid)
        rest_ok = len(probe.ok_versions) if probe else 0
        rest_uncertain = probe.uncertain if probe else 0
        versions = [v for w in mine for _, _, v in w.acks] + (probe.ok_versions if probe else [])
        twice = sum(c - 1 for c in Counter(versions).values() if c > 1)
        body = final.get(sid)
        if body is None or not isinstance(body.get("state"), dict):
            unreadable += 1
            problems.append(f"{sid}: final state unreadable")
            continue
        n, rest, version = body["state"].get("n", 0), body["state"].get("rest", 0), body.get("version")
        s_lost, s_dup = max(0, acked - n), max(0, n - acked - uncertain)
        s_rest_lost, s_rest_dup = max(0, rest_ok - rest), max(0, rest - rest_ok - rest_uncertain)
        lost += s_lost
        duplicated += s_dup
        repeated += twice
        rest_lost += s_rest_lost
        rest_duplicated += s_rest_dup
        if version != n + rest:
            mismatched += 1
        if s_lost or s_dup or twice or s_rest_lost or s_rest_dup or version != n + rest:
            problems.append(f"{sid}: n={n} acked={acked} uncertain={uncertain} rest={rest} rest_ok={rest_ok} "
                            f"rest_uncertain={rest_uncertain} version={version} versions_acked_twice={twice}"
                            f"{' (moved)' if sid in moved else ''}")
    refused = sum((w.refused for w in writers), Counter())
    window = stopped_at - go_at if not math.isnan(stopped_at) else math.nan
    acks = sorted(acked - go_at for w in writers for _, acked, _ in w.acks)
    bucket = 0.1
    rates = [0.0] * (int(window / bucket) + 1 if math.isfinite(window) else 0)
    for t in acks:
        i = int(t / bucket)
        if 0 <= i < len(rates):
            rates[i] += 1 / bucket
    statuses = sum((p.statuses for p in probes), Counter())
    gen_util = run.cpu.self_s / window if window else math.nan
    failed_devices = [f"{w.session}/{w.device}: {w.failed}" for w in writers if w.failed]
    crashed = [f"{w.session}/{w.device}: {w.crashed}" for w in writers if w.crashed]
    return {
        "target": "failover", "pods": opts.pods, "ttl_s": opts.ttl, "sessions": len({w.session for w in writers}),
        "devices": len(writers), "rate": opts.failover_rate,
        "victim": run.victim.name if run.victim else None, "owners_before": dict(run.by_pod),
        "moved_to": dict(moved_to), "recovered_after_s": run.recovered_at - killed_at,
        "sessions_moved": len(moved),
        "writable": writable, "acked_again": acked_again, "every_device_acked_again": every_device,
        "increments_sent": sum(w.started for w in writers),
        "increments_acked": sum(len(w.acks) for w in writers),
        "increments_refused": dict(refused), "increments_uncertain": sum(w.uncertain for w in writers),
        "increments_unsettled": sum(w.unsettled for w in writers),
        "rest_increments_ok": sum(len(p.ok_versions) for p in probes),
        "rest_answers": {str(k): v for k, v in sorted(statuses.items())},
        "lost": lost + rest_lost + unreadable, "duplicated": duplicated + repeated + rest_duplicated,
        "versions_acked_twice": repeated, "rest_lost": rest_lost, "rest_duplicated": rest_duplicated,
        "version_mismatches": mismatched, "unreadable_sessions": unreadable, "problems": problems[:50],
        "device_reconnects": sum(w.reconnects for w in writers), "slowest_devices": slow_devices,
        "devices_failed": failed_devices[:20],
        "balancer_connections": balancer.connections, "balancer_refused": balancer.refused,
        "generator_cpu_util": gen_util, "generator_saturated": gen_util > GENERATOR_SATURATED,
        "sdk_crashes": crashed[:20],
        "errors": {k: v for k, v in (("device_failed", len(failed_devices)), ("sdk_crashed", len(crashed))) if v},
        "error_count": len(failed_devices) + len(crashed),
        "series": {"acks_per_s": rates, "bucket_s": bucket, "kill_s": killed_at - go_at,
                   "writable_s": sorted(p.writable_s for p in probes if p.writable_s is not None),
                   "acked_again_s": sorted(t for t in per_session_again if t is not None)},
    }
