"""The four scenarios (issue 4): fanout, saturation, capacity, handoff. Each is bounded in time and stops itself.

A scenario takes a running `Target` and `Options`, drives it with the load generator and returns a flat dict of
numbers (plus series for the plots); the CLI runs it once per target and the report compares them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from bench import node_generator
from bench.loadgen import Device, DeviceSpec, Recorder, now_ns, open_fleet, paused_gc, send_at_rate, wait_drained
from bench.proc import CpuWindow, process_cpu_s, process_rss_bytes, self_cpu_s
from bench.stats import Latency

# progress(done, total, postfix): the CLI draws it with tqdm; scenarios only report
Progress = Callable[[float, float, dict[str, Any]], None]
GENERATOR_SATURATED = 0.9  # share of one core


def no_progress(done: float, total: float, info: dict[str, Any]) -> None:
    """The default progress sink: draws nothing."""


@dataclass(frozen=True, slots=True)
class Options:
    sessions: int = 100
    devices: int = 3
    rate: float = 10.0  # ops/s per device
    duration: float = 10.0  # measured window, s
    warmup: float = 2.0
    drain: float = 3.0  # max wait for outstanding acks/patches after the senders stop
    capacity_devices: int = 10_000
    capacity_hold: float = 3.0
    connect_concurrency: int = 200
    saturation_start: float = 2.0
    saturation_factor: float = 1.5
    saturation_steps: int = 10
    saturation_step_s: float = 4.0
    p99_limit_ms: float = 50.0  # issue 9: the highest rate with delivery p99 <= 50 ms
    delivered_floor: float = 0.95
    handoff_ops: int = 3  # ops the active device sends (acked) between two handoffs
    handoff_rate: float | None = None  # handoffs/s per session (paced); None: each pair as fast as it can
    pods: int = 3  # cluster: pods of the multi-pod run
    ttl: float = 3.0  # cluster: SESSIOND_LEASE_TTL_S
    failover_sessions: int = 30  # cluster: sessions under load when a pod is killed (x devices SDK clients)
    failover_rate: float = 5.0  # cluster: inc ops/s per device during the failover
    failover_before: float = 2.0  # cluster: load before the kill, s
    failover_after: float = 2.0  # cluster: load after every session and device recovered, s
    failover_timeout: float = 30.0  # cluster: most wait for the recovery after the kill, s
    settle: float = 10.0  # cluster: most wait for requests in flight once the devices stop sending, s
    generator: str = "python"  # fanout, saturation, capacity, handoff: "python" (loadgen.py) or "node" (gen.mjs)
    generator_procs: int = 1  # --generator node: Node processes sharing the devices (whole sessions each)

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        """A seconds-long smoke run."""
        base = cls(sessions=10, devices=3, rate=5.0, duration=1.5, warmup=0.5, drain=2.0, capacity_devices=200,
                   capacity_hold=0.5, saturation_start=5.0, saturation_factor=2.0, saturation_steps=3,
                   saturation_step_s=1.0, failover_sessions=6, failover_before=1.0, failover_after=1.0)
        return replace(base, **overrides)


async def _ticker(progress: Progress, total_s: float, rec: Recorder) -> None:
    start, last_count, last_t = trio.current_time(), 0, trio.current_time()
    while True:
        await trio.sleep(0.5)
        t = trio.current_time()
        rate = (rec.delivered_total - last_count) / (t - last_t)
        last_count, last_t = rec.delivered_total, t
        progress(min(t - start, total_s), total_s, {"deliv/s": f"{rate:,.0f}", "errors": sum(rec.errors.values())})


async def _sleep_until_ns(t_ns: int) -> None:
    await trio.sleep(max(0.0, (t_ns - now_ns()) / 1e9))


async def fanout(target: Any, opts: Options, progress: Progress = no_progress, label: str = "f") -> dict[str, Any]:
    """S sessions x D devices, each sending R ops/s; every change reaches the D-1 others."""
    if opts.generator == "node":
        return await _fanout_node(target, opts, progress, label)
    rec = Recorder()
    ids = await target.create_sessions(opts.sessions, label=label)
    specs = [DeviceSpec(sid, f"d{j}", target.device_url(j)) for sid in ids for j in range(opts.devices)]
    cpu = CpuWindow(target.pid, pods=dict(target.pods), services=dict(target.services))
    async with open_fleet(target.ws_url, specs, target.token(), rec,
                          concurrency=opts.connect_concurrency) as devices:
        rec.start_clock(now_ns(), opts.warmup, opts.duration)
        with paused_gc():
            await _drive(devices, rec, cpu, opts, progress)
        expected = rec.sent_in_window * (opts.devices - 1)
        await wait_drained(devices, rec, expected, opts.drain)
        lost_acks = sum(len(d.pending) for d in devices)
    if lost_acks:
        rec.errors["ack_missing"] += lost_acks
    return _fanout_result(target, opts, rec, cpu, expected)


async def _drive(devices: list[Device], rec: Recorder, cpu: CpuWindow, opts: Options, progress: Progress) -> None:
    """Every device sends at R until the window ends; the server's and our CPU are read at its edges."""

    async def window() -> None:
        await _sleep_until_ns(rec.w0_ns)
        cpu.start()
        await _sleep_until_ns(rec.w1_ns)
        cpu.stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticker, progress, opts.warmup + opts.duration, rec)
        async with trio.open_nursery() as senders:
            senders.start_soon(window)
            for device in devices:
                senders.start_soon(send_at_rate, device, opts.rate, rec.w1_ns)
        nursery.cancel_scope.cancel()


async def _fanout_node(target: Any, opts: Options, progress: Progress, label: str) -> dict[str, Any]:
    """The same fanout driven by bench/nodegen/gen.mjs: sessions, token and server CPU stay on this side, the load
    and its measurement run in Node; the result has the same figures (see bench/node_generator.py)."""
    ids = await target.create_sessions(opts.sessions, label=label)
    devices = [{"session": sid, "device": f"d{j}", "url": target.device_url(j)}
               for sid in ids for j in range(opts.devices)]
    job = node_generator.make_job(target.ws_url, devices, target.token(), rate=opts.rate, warmup=opts.warmup,
                                  duration=opts.duration, drain=opts.drain,
                                  connect_concurrency=opts.connect_concurrency)
    cpu = CpuWindow(target.pid, pods=dict(target.pods), services=dict(target.services))
    total = opts.warmup + opts.duration

    def on_progress(elapsed: float, rate: float, errors: int) -> None:
        progress(min(elapsed, total), total, {"deliv/s": f"{rate:,.0f}", "errors": errors})

    run = await node_generator.run(job, cpu, on_progress, procs=opts.generator_procs)
    generator = node_generator.generator_figures(run, cpu, opts.duration)
    rec = node_generator.recorder(run.result)
    return _fanout_result(target, opts, rec, cpu, int(run.result["expected_deliveries"]), generator)


def _fanout_result(target: Any, opts: Options, rec: Recorder, cpu: CpuWindow, expected: int,
                   generator: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fanout figures; `generator` (from node_generator.generator_figures) replaces this process's CPU as the
    generator's when the load ran in Node."""
    window = opts.duration
    cpu_per_msg = (cpu.server_s / rec.delivered_in_window * 1e6
                   if cpu.server_s is not None and rec.delivered_in_window else math.nan)
    gen = generator or {"generator": "python", "generator_cpu_util": cpu.self_s / window}
    gen_util = gen["generator_cpu_util"]
    gen_saturated = gen.get("generator_max_proc_util", gen_util) > GENERATOR_SATURATED
    return {
        "target": target.name, "storage": target.info.get("storage"),
        "sessions": opts.sessions, "devices": opts.devices, "rate": opts.rate, "duration_s": window,
        "offered_ops_per_s": rec.sent_in_window / window,
        "offered_deliveries_per_s": expected / window,
        "delivered_per_s": rec.delivered_in_window / window,
        "sent_in_window": rec.sent_in_window, "expected_deliveries": expected,
        "delivered_of_window_ops": rec.delivered_of_window_ops,
        "delivered_ratio": rec.delivered_of_window_ops / expected if expected else math.nan,
        "acked_ratio": rec.acked_in_window / rec.sent_in_window if rec.sent_in_window else math.nan,
        "ack": rec.ack.summary(), "delivery": rec.delivery.summary(),
        "errors": dict(rec.errors), "error_count": sum(rec.errors.values()),
        "server_cpu_s": cpu.server_s, "server_cpu_util": cpu.server_s / window if cpu.server_s is not None else None,
        "server_cpu_per_msg_us": cpu_per_msg,
        **gen, "generator_saturated": gen_saturated,
        "generator_lag_events": rec.lag_events,
        "other_processes_cpu_util": cpu.others_s / window if cpu.others_s is not None else None,
        **_per_process(cpu, rec.delivered_in_window, window),
        "series": {"delivery_ms": rec.delivery.ms(), "ack_ms": rec.ack.ms(),
                   "deliveries_per_s": rec.deliveries.rates(), "sends_per_s": rec.sends.rates(),
                   "bucket_s": rec.deliveries.bucket_s,
                   "window_s": [opts.warmup, opts.warmup + opts.duration]},
    }


def _per_process(cpu: CpuWindow, delivered: int, window: float) -> dict[str, Any]:
    """CPU of each pod of a cluster and of the measured services (Redis), per delivered message and as a share
    of one core; nothing for a single server."""
    out: dict[str, Any] = {}
    if cpu.pod_s:
        out["pod_cpu_per_msg_us"] = {n: s / delivered * 1e6 if delivered else math.nan for n, s in cpu.pod_s.items()}
        out["pod_cpu_util"] = {n: s / window for n, s in cpu.pod_s.items()}
    if cpu.services_s:
        out["service_cpu_per_msg_us"] = {n: s / delivered * 1e6 if delivered else math.nan
                                         for n, s in cpu.services_s.items()}
        out["service_cpu_util"] = {n: s / window for n, s in cpu.services_s.items()}
    return out


def sustained(result: dict[str, Any], opts: Options) -> bool:
    """A fanout step holds when p99 delivery ≤ the limit and ≥ 95 % of the offered deliveries arrived."""
    p99 = result["delivery"]["p99_ms"]
    return (not math.isnan(p99) and p99 <= opts.p99_limit_ms
            and result["delivered_ratio"] >= opts.delivered_floor)


async def saturation(target: Any, opts: Options, progress: Progress = no_progress) -> dict[str, Any]:
    """Raise R step by step until a step no longer holds; report the highest sustained rate."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    rate = opts.saturation_start
    step_opts = replace(opts, duration=opts.saturation_step_s, warmup=min(opts.warmup, 1.0))
    for i in range(opts.saturation_steps):

        def step_progress(done: float, total: float, info: dict[str, Any], i: int = i, rate: float = rate) -> None:
            progress(i + done / total, opts.saturation_steps, {"step": i + 1, "R": f"{rate:g}", **info})

        result = await fanout(target, replace(step_opts, rate=rate), step_progress, label=f"sat{i}-")
        result["sustained"] = sustained(result, opts)
        result.pop("series")
        steps.append(result)
        if not result["sustained"]:
            break
        best = result
        rate = round(rate * opts.saturation_factor, 2)
    progress(opts.saturation_steps, opts.saturation_steps, {})
    return {
        "target": target.name, "storage": target.info.get("storage"),
        "sessions": opts.sessions, "devices": opts.devices,
        "max_rate_per_device": best["rate"] if best else 0.0,
        "max_delivered_per_s": best["delivered_per_s"] if best else 0.0,
        "cpu_per_msg_us_at_max": best["server_cpu_per_msg_us"] if best else math.nan,
        "p99_at_max_ms": best["delivery"]["p99_ms"] if best else math.nan,
        "generator": opts.generator,
        "node": next((s["node"] for s in steps if "node" in s), None),
        "generator_saturated": any(s["generator_saturated"] for s in steps),
        "stopped_by": "limit reached" if steps and not steps[-1]["sustained"] else "max steps",
        "errors": dict(sum((Counter(s["errors"]) for s in steps), Counter())),
        "error_count": sum(s["error_count"] for s in steps),
        "steps": steps,
    }


async def capacity(target: Any, opts: Options, progress: Progress = no_progress) -> dict[str, Any]:
    """Open N idle devices across sessions (D per session); connect rate and server RSS per device."""
    if opts.generator == "node":
        return await _capacity_node(target, opts, progress)
    n = opts.capacity_devices
    per = max(1, opts.devices)
    rec = Recorder()
    rss0 = process_rss_bytes(target.pid) if target.pid else None
    ids = await target.create_sessions(math.ceil(n / per), label="cap")
    specs = [DeviceSpec(ids[i // per], f"d{i % per}") for i in range(n)]
    cpu0 = process_cpu_s(target.pid) if target.pid else None
    def on_connect(count: int) -> None:
        if count % 100 == 0 or count == n:
            progress(count, n, {"errors": sum(rec.errors.values())})

    t0, self0 = now_ns(), self_cpu_s()
    async with open_fleet(target.ws_url, specs, target.token(), rec, concurrency=opts.connect_concurrency,
                          on_connect=on_connect) as devices:
        elapsed = (now_ns() - t0) / 1e9
        gen_util = (self_cpu_s() - self0) / elapsed if elapsed else 0.0
        connect_cpu = process_cpu_s(target.pid) - cpu0 if target.pid and cpu0 is not None else None
        await trio.sleep(opts.capacity_hold)
        rss1 = process_rss_bytes(target.pid) if target.pid else None
        connected = len(devices)
        alive = sum(not d.closed for d in devices)
    generator = {"generator_cpu_util": gen_util, "generator_saturated": gen_util > GENERATOR_SATURATED}
    return _capacity_result(target, n, connected, alive, elapsed, connect_cpu, rss0, rss1, dict(rec.errors),
                            generator)


def _capacity_result(target: Any, requested: int, connected: int, alive: int, elapsed: float,
                     connect_cpu_s: float | None, rss0: int | None, rss1: int | None, errors: dict[str, int],
                     generator: dict[str, Any]) -> dict[str, Any]:
    """The capacity figures, whichever generator connected the devices."""
    per_device = (rss1 - rss0) / connected if rss0 is not None and rss1 is not None and connected else math.nan
    return {
        "target": target.name, "storage": target.info.get("storage"),
        "devices_requested": requested, "devices_connected": connected, "devices_alive_after_hold": alive,
        "connect_s": elapsed, "connect_rate_per_s": connected / elapsed if elapsed else math.nan,
        "server_cpu_per_connect_ms": connect_cpu_s / connected * 1e3 if connect_cpu_s is not None and connected
        else math.nan,
        "rss_before_mb": rss0 / 2**20 if rss0 else math.nan, "rss_after_mb": rss1 / 2**20 if rss1 else math.nan,
        "rss_per_device_kb": per_device / 1024,
        **generator,
        "errors": errors, "error_count": sum(errors.values()),
    }


async def _capacity_node(target: Any, opts: Options, progress: Progress) -> dict[str, Any]:
    """The same capacity figures with the devices on Node's `ws` (gen.mjs at rate 0): the connect rate is then
    the server's, not that of a Python client near its own limit. The server's CPU is read over exactly the
    connect phase (gen.mjs's `connecting` and `connected` events), its RSS once the devices were held
    `capacity_hold` seconds."""
    n = opts.capacity_devices
    per = max(1, opts.devices)
    rss0 = process_rss_bytes(target.pid) if target.pid else None
    ids = await target.create_sessions(math.ceil(n / per), label="cap")
    devices = [{"session": ids[i // per], "device": f"d{i % per}"} for i in range(n)]
    hold = max(opts.capacity_hold, 0.5)
    job = node_generator.make_job(target.ws_url, devices, target.token(), rate=0.0, warmup=hold, duration=0.5,
                                  drain=0.0, connect_concurrency=opts.connect_concurrency)
    connect_cpu = CpuWindow(target.pid)
    seen: dict[str, Any] = {}
    holding = trio.Event()  # gen.mjs announced its window: the devices are connected and held
    held = trio.Event()
    progress(0, n, {})

    def on_event(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "connecting":
            connect_cpu.start()
        elif kind == "connected":
            connect_cpu.stop()
            seen.update(event)
            progress(int(event["connected"]), n, {"errors": int(event["failed"])})
        elif kind == "start":
            seen["hold_until_ns"] = (int(event["w0_ns"]) + int(event["w1_ns"])) // 2
            holding.set()

    async def read_rss() -> None:
        await holding.wait()
        await _sleep_until_ns(seen["hold_until_ns"])
        seen["rss1"] = process_rss_bytes(target.pid) if target.pid else None
        held.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_rss)
        run = await node_generator.run(job, CpuWindow(None), lambda *_: None, procs=opts.generator_procs,
                                       on_event=on_event)
        with trio.move_on_after(5):
            await held.wait()
        nursery.cancel_scope.cancel()
    out = run.result
    connected = int(seen.get("connected", out["connected"]))
    elapsed = float(seen.get("connect_s", math.nan))
    rss1 = seen.get("rss1")
    errors = {str(k): int(v) for k, v in out["errors"].items()}
    gen_util = float(seen.get("connect_cpu_s", math.nan)) / elapsed if elapsed else math.nan
    max_proc = float(seen.get("connect_max_proc_cpu_s", math.nan)) / elapsed if elapsed else math.nan
    generator = {"generator": "node", "generator_cpu_util": gen_util, "generator_max_proc_util": max_proc,
                 "generator_saturated": max_proc > GENERATOR_SATURATED}
    return _capacity_result(target, n, connected, connected - errors.get("disconnected", 0), elapsed,
                            connect_cpu.server_s, rss0, rss1, errors, generator)


async def handoff(target: Any, opts: Options, progress: Progress = no_progress) -> dict[str, Any]:
    """Two devices per session pass the session back and forth (pause, claim) for the whole duration;
    every change acked by one must reach the other exactly once."""
    if opts.generator == "node":
        return await _handoff_node(target, opts, progress)
    rec = Recorder()
    latency = Latency()
    ids = await target.create_sessions(opts.sessions, label="h")
    specs = [DeviceSpec(sid, d) for sid in ids for d in ("a", "b")]
    total_s = opts.warmup + opts.duration
    handoffs = 0
    async with open_fleet(target.ws_url, specs, target.token(), rec, keep_log=True,
                          concurrency=opts.connect_concurrency) as devices:
        pairs: dict[str, list[Device]] = {}
        for device in devices:
            pairs.setdefault(device.spec.session, []).append(device)
        rec.start_clock(now_ns(), 0.0, total_s)  # every op counts: no warm-up for correctness
        end = trio.current_time() + total_s

        async def loop(pair: list[Device]) -> None:
            nonlocal handoffs
            active, other = sorted(pair, key=lambda d: d.spec.device)
            if await active.request("claim") is None:
                return
            period = 1.0 / opts.handoff_rate if opts.handoff_rate else 0.0
            due = trio.current_time() + random.uniform(0.0, period)  # pairs spread over the period
            while trio.current_time() < end:
                if period:  # paced: a handoff's latency, not the queue of a saturated server
                    await trio.sleep_until(due)
                    due += period
                for _ in range(opts.handoff_ops):
                    if await active.request("op") is None:
                        return
                t = now_ns()
                if await active.request("pause") is None or await other.request("claim") is None:
                    return
                latency.add(now_ns() - t)
                handoffs += 1
                active, other = other, active

        async def tick() -> None:
            start = trio.current_time()
            while True:
                await trio.sleep(0.5)
                progress(min(trio.current_time() - start, total_s), total_s,
                         {"handoffs": handoffs, "errors": sum(rec.errors.values())})

        cpu = CpuWindow(target.pid)
        cpu.start()
        with paused_gc():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                async with trio.open_nursery() as loops:
                    for pair in pairs.values():
                        if len(pair) == 2:
                            loops.start_soon(loop, pair)
                nursery.cancel_scope.cancel()
        cpu.stop()
        await _wait_logs(list(pairs.values()), opts.drain)
        check = _check_logs(list(pairs.values()))
    cpu_per_handoff = cpu.server_s / handoffs * 1e3 if cpu.server_s is not None and handoffs else math.nan
    return _handoff_result(target, opts, handoffs, latency, check, cpu_per_handoff, dict(rec.errors),
                           {"generator_cpu_util": cpu.self_s / total_s})


def _handoff_result(target: Any, opts: Options, handoffs: int, latency: Latency, check: dict[str, int],
                    cpu_per_handoff_ms: float, errors: dict[str, int], generator: dict[str, Any]) -> dict[str, Any]:
    """The handoff figures, whichever generator passed the sessions around; `generator` holds its CPU (and for
    Node its other figures: saturated when any one of its processes was)."""
    total_s = opts.warmup + opts.duration
    util = generator["generator_cpu_util"]
    return {
        "target": target.name, "storage": target.info.get("storage"), "sessions": opts.sessions,
        "duration_s": total_s, "handoffs": handoffs, "handoffs_per_s": handoffs / total_s,
        "pacing": f"{opts.handoff_rate:g}/s per session" if opts.handoff_rate else "closed loop",
        "handoff": latency.summary(), "changes_acked": check["acked"],
        "server_cpu_per_handoff_ms": cpu_per_handoff_ms,
        **generator, "generator_saturated": generator.get("generator_max_proc_util", util) > GENERATOR_SATURATED,
        "lost": check["lost"], "duplicated": check["duplicated"], "version_gaps": check["gaps"],
        "errors": errors, "error_count": sum(errors.values()),
        "series": {"handoff_ms": latency.ms()},
    }


async def _handoff_node(target: Any, opts: Options, progress: Progress) -> dict[str, Any]:
    """The same handoffs driven by gen.mjs: the Python generator fills its core in the closed loop, so the latency
    it reports is mostly its own. gen.mjs runs the pairs, checks the logs (as _check_logs) and times every handoff;
    the server's CPU is read over the whole run (gen.mjs's window: warm-up + duration, as here) and divided by the
    handoffs done inside it."""
    ids = await target.create_sessions(opts.sessions, label="h")
    devices = [{"session": sid, "device": d} for sid in ids for d in ("a", "b")]
    total_s = opts.warmup + opts.duration
    job = node_generator.make_handoff_job(target.ws_url, devices, target.token(), ops=opts.handoff_ops,
                                          rate=opts.handoff_rate, warmup=opts.warmup, duration=opts.duration,
                                          drain=opts.drain, connect_concurrency=opts.connect_concurrency)
    cpu = CpuWindow(target.pid)

    def on_progress(elapsed: float, rate: float, errors: int) -> None:
        progress(min(elapsed, total_s), total_s, {"handoffs/s": f"{rate:,.0f}", "errors": errors})

    run = await node_generator.run(job, cpu, on_progress, procs=opts.generator_procs)
    generator = node_generator.generator_figures(run, cpu, total_s)
    out = run.result
    in_window = int(out["handoffs_in_window"])
    cpu_per_handoff = cpu.server_s / in_window * 1e3 if cpu.server_s is not None and in_window else math.nan
    check = {"acked": int(out["changes_acked"]), "lost": int(out["lost"]), "duplicated": int(out["duplicated"]),
             "gaps": int(out["version_gaps"])}
    latency = Latency(samples=[int(v) for v in out["series"].get("handoff_ns", [])])
    errors = {str(k): int(v) for k, v in out["errors"].items()}
    return {**_handoff_result(target, opts, int(out["handoffs"]), latency, check, cpu_per_handoff, errors, generator),
            "handoffs_in_window": in_window,
            "other_processes_cpu_util": cpu.others_s / total_s if cpu.others_s is not None else None}


async def _wait_logs(pairs: list[list[Device]], timeout: float) -> None:
    def done() -> bool:
        return all(len(x.acked) <= len(y.patches) and len(y.acked) <= len(x.patches)
                   for x, y in (p for p in pairs if len(p) == 2))

    with trio.move_on_after(timeout):
        while True:
            if done():
                return
            await trio.sleep(0.05)


def _check_logs(pairs: list[list[Device]]) -> dict[str, int]:
    """Count acked changes missing at the other device, changes seen twice, and holes in the version sequence."""
    acked = lost = duplicated = gaps = 0
    for pair in pairs:
        if len(pair) != 2:
            continue
        versions: list[int] = []
        for sender, receiver in (pair, pair[::-1]):
            seen = Counter((v, n) for v, d, n in receiver.patches if d == sender.spec.device)
            duplicated += sum(c - 1 for c in seen.values() if c > 1)
            for version, n in sender.acked:
                acked += 1
                versions.append(version)
                if seen[(version, n)] == 0:
                    lost += 1
        if versions:
            unique = set(versions)
            gaps += (max(unique) - min(unique) + 1) - len(unique)
    return {"acked": acked, "lost": lost, "duplicated": duplicated, "gaps": gaps}


def align_saturation(results: dict[str, dict[str, Any]]) -> None:
    """Add, to every saturation result, CPU per message at the highest R that *all* targets sustained: at equal
    load the ratio compares like with like (batching makes CPU per message fall as the rate rises)."""
    runs = [r for r in results.values() if "steps" in r]
    sustained_rates = [{s["rate"] for s in r["steps"] if s["sustained"]} for r in runs]
    common = set.intersection(*sustained_rates) if sustained_rates else set()
    rate = max(common) if common else None
    for r in runs:
        step = next((s for s in r["steps"] if s["rate"] == rate), None)
        r["common_rate"] = rate
        r["cpu_per_msg_us_at_common_rate"] = step["server_cpu_per_msg_us"] if step else math.nan


SCENARIOS = {"fanout": fanout, "saturation": saturation, "capacity": capacity, "handoff": handoff}
