"""`--generator node`: the fanout and handoff workloads driven by bench/nodegen/gen.mjs (Node's `ws`), not loadgen.py.

The Python generator saturates its core before a sessiond does (issue 9), so its numbers are a floor. The Python side
keeps everything that is not load: it creates the sessions over REST, mints the token, hands the Node program its
whole job as JSON on stdin, reads its progress events on stderr and, on the `start` event, measures the server's CPU
from /proc over exactly the generator's window (both read CLOCK_MONOTONIC: Node's hrtime and time.monotonic_ns).
The Node result (counts, every latency sample, errors, its own CPU) is turned back into a `Recorder`, so
`scenarios._fanout_result` computes the same figures, with the same percentile code, as for the Python generator
(handoff: gen.mjs checks the logs itself, and its handoff samples go through the same `Latency`).
Node inherits this process's CPU affinity when it starts: the generator's cores (cli.run pins this thread first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio

from bench.loadgen import Recorder
from bench.proc import CpuWindow
from bench.stats import Latency, Timeline

NODEGEN_DIR = Path(__file__).resolve().parent / "nodegen"
GEN = NODEGEN_DIR / "gen.mjs"
INSTALL_HINT = "npm ci --prefix bench/nodegen"
# A larger young generation: fewer scavenges while thousands of frames a second are parsed (V8's default is 16 MiB).
NODE_FLAGS = ["--max-semi-space-size=32"]
STDERR_TAIL_LINES = 40
EVENT_PREFIX = b'{"event"'
# progress(elapsed s, delivered msgs/s (handoff: handoffs/s) since the last event, errors so far)
NodeProgress = Callable[[float, float, int], None]


class GeneratorError(RuntimeError):
    """The Node generator cannot run here (no node, not installed) or did not produce a result."""


def node_command(procs: int = 1) -> list[str]:
    """`node gen.mjs --events [--procs N]`; GeneratorError saying how to fix it when node or ws is missing."""
    node = shutil.which("node")
    if node is None:
        raise GeneratorError("node is not installed: --generator node needs Node 20+ (scripts/tools.sh ensure)")
    if not (NODEGEN_DIR / "node_modules" / "ws" / "package.json").is_file():
        raise GeneratorError(f"bench/nodegen has no node_modules/ws: run `{INSTALL_HINT}`")
    return [node, *NODE_FLAGS, str(GEN), "--events", *(["--procs", str(procs)] if procs > 1 else [])]


def bucket_s(warmup_s: float, duration_s: float) -> float:
    """The throughput buckets of Recorder.start_clock: about 40 points over the run, 0.1 s to 1 s each."""
    return max(0.1, min(1.0, round((warmup_s + duration_s) / 40, 1)))


def make_job(url: str, devices: list[dict[str, str]], token: str | None, *, rate: float, warmup: float,
             duration: float, drain: float, connect_concurrency: int) -> dict[str, Any]:
    """The JSON job gen.mjs reads (format: the head of gen.mjs); every latency sample comes back."""
    return {"url": url, "subprotocol": "sessiond.v1.json", "token": token, "devices": devices, "rate": rate,
            "warmup": warmup, "duration": duration, "drain": drain, "connect_concurrency": connect_concurrency,
            "kind": "other", "bucket_s": bucket_s(warmup, duration), "samples": True}


def make_handoff_job(url: str, devices: list[dict[str, str]], token: str | None, *, ops: int, rate: float | None,
                     warmup: float, duration: float, drain: float, connect_concurrency: int) -> dict[str, Any]:
    """The handoff job (gen.mjs `"scenario": "handoff"`): two devices per session pass it back and forth, `ops`
    acked ops between two handoffs, `rate` handoffs/s per session (None or 0: a closed loop)."""
    job = make_job(url, devices, token, rate=0.0, warmup=warmup, duration=duration, drain=drain,
                   connect_concurrency=connect_concurrency)
    return {**job, "scenario": "handoff", "handoff_ops": ops, "handoff_rate": rate or 0.0}


@dataclass(slots=True)
class NodeRun:
    """What one gen.mjs run gave: its JSON result, the cores it was allowed on, its stderr that was not events."""

    result: dict[str, Any]
    pid: int
    cpus: list[int] | None
    log: list[str] = field(default_factory=list)


async def run(job: dict[str, Any], cpu: CpuWindow, progress: NodeProgress, *, procs: int = 1,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> NodeRun:
    """Run gen.mjs on `job`; `cpu` is started and stopped at the window edges the generator announces. Every
    other event (`connecting`, `connected`, `start` too) goes to `on_event`, on arrival. `progress` gets the rate
    of deliveries, or of handoffs for a handoff job."""
    argv = node_command(procs)
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, cwd=NODEGEN_DIR)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        cpus = sorted(os.sched_getaffinity(proc.pid))
    except OSError:
        cpus = None
    stdout = bytearray()
    counter = "handoffs" if job.get("scenario") == "handoff" else "delivered_total"
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    window_done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                assert proc.stdin is not None
                async with proc.stdin:
                    await proc.stdin.send_all(orjson.dumps(job))

            async def read_stdout() -> None:
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    stdout.extend(chunk)

            async def measure(w0_ns: int, w1_ns: int) -> None:
                await trio.sleep(max(0.0, (w0_ns - time.monotonic_ns()) / 1e9))
                cpu.start()
                await trio.sleep(max(0.0, (w1_ns - time.monotonic_ns()) / 1e9))
                cpu.stop()
                window_done.set()

            last = [0.0, 0]  # elapsed, delivered at the previous progress event

            def handle(event: dict[str, Any]) -> None:
                kind = event.get("event")
                if on_event is not None and kind != "progress":
                    on_event(event)
                if kind == "start":
                    nursery.start_soon(measure, int(event["w0_ns"]), int(event["w1_ns"]))
                elif kind == "progress":
                    elapsed, delivered = float(event["elapsed_s"]), int(event[counter])
                    dt = elapsed - last[0]
                    rate = (delivered - last[1]) / dt if dt > 0 else 0.0
                    last[:] = [elapsed, delivered]
                    progress(elapsed, rate, int(event["errors"]))

            async def read_stderr() -> None:
                assert proc.stderr is not None
                pending = b""
                async for chunk in proc.stderr:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.startswith(EVENT_PREFIX):
                            try:
                                handle(orjson.loads(line))
                                continue
                            except orjson.JSONDecodeError:
                                pass
                        tail.append(line.decode(errors="replace"))
                if pending:
                    tail.append(pending.decode(errors="replace"))

            nursery.start_soon(feed)
            nursery.start_soon(read_stderr)
            await read_stdout()
            await proc.wait()
            if proc.returncode != 0:
                nursery.cancel_scope.cancel()  # a window never reached: stop measuring it
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    log = list(tail)
    if proc.returncode != 0 or not stdout.strip():
        raise GeneratorError(f"gen.mjs exited with {proc.returncode}:\n" + "\n".join(log[-20:]))
    if not window_done.is_set():
        raise GeneratorError("gen.mjs finished without announcing its window (no start event)")
    return NodeRun(result=orjson.loads(bytes(stdout)), pid=proc.pid, cpus=cpus, log=log)


def recorder(out: dict[str, Any]) -> Recorder:
    """The Node result as the Python generator's Recorder: the same counts, samples and buckets."""
    series = out["series"]
    rec = Recorder()
    rec.ack = Latency(samples=[int(v) for v in series.get("ack_ns", [])])
    rec.delivery = Latency(samples=[int(v) for v in series.get("delivery_ns", [])])
    rec.sent_total = int(out["sent_total"])
    rec.sent_in_window = int(out["sent_in_window"])
    rec.acked_in_window = int(out["acked_in_window"])
    rec.delivered_total = int(out["delivered_total"])
    rec.delivered_in_window = int(out["delivered_in_window"])
    rec.delivered_of_window_ops = int(out["delivered_of_window_ops"])
    rec.errors = Counter({str(k): int(v) for k, v in out["errors"].items()})
    rec.lag_events = int(out["lag_events"])
    rec.deliveries = Timeline(bucket_s=float(series["bucket_s"]), counts=[int(c) for c in series["deliveries"]])
    rec.sends = Timeline(bucket_s=float(series["bucket_s"]), counts=[int(c) for c in series["sends"]])
    return rec


def generator_figures(run: NodeRun, cpu: CpuWindow, window_s: float) -> dict[str, Any]:
    """The generator's rows of the result: its CPU (as a share of one core, summed over its processes), saturation
    (any one process above the limit), and where it ran. Node's own CPU is taken out of "other processes"."""
    out = run.result
    node_cpu = out["cpu"]
    used_s = float(node_cpu["user_s"]) + float(node_cpu["system_s"])
    if cpu.others_s is not None:
        cpu.others_s = max(0.0, cpu.others_s - used_s)
    util = float(node_cpu["util"]) if node_cpu.get("wall_s") else used_s / window_s
    return {
        "generator": "node",
        "generator_cpu_util": util,
        "generator_max_proc_util": float(node_cpu["max_proc_util"]),
        "generator_procs": int(out["procs"]),
        "generator_cpus": run.cpus,
        "generator_driver_cpu_util": cpu.self_s / window_s,  # this Python process: REST setup aside, it waits
        "node": {"version": out.get("node"), "ws": out.get("ws"), "pid": run.pid, "cpu": node_cpu,
                 **{key: out[key] for key in ("ack", "delivery", "handoff") if key in out},
                 "first_connect_error": out.get("first_connect_error")},
    }
