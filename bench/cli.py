"""`python -m bench <scenario>`: start the server(s), run one scenario against each, write the report.

Targets: `baseline` (bench/baseline.py), `sessiond` (`sessiond serve` on free loopback ports, embedded storage, or
Redis / PostgreSQL with --redis / --postgres), or `--url` for a server someone else runs. Server and generator are
pinned to disjoint cores when there are two or more. The `cluster` scenario starts its own pods (bench/cluster.py)
and ignores --target.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from tqdm import tqdm

from bench import cluster, report, soak
from bench.node_generator import GeneratorError, node_command
from bench.proc import cores, pin, plan_pinning, raise_fd_limit
from bench.scenarios import SCENARIOS, Options, align_saturation
from bench.server import ServerError, Target, running_target, url_target

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
CLUSTER = "cluster"
CLUSTER_RATE = 2.0  # the cluster scenario's default R (ops/s per device)
SOAK = "soak"
# The soak's defaults: 35 min, 10 min of warm-up before the RSS slope is fitted, 40 sessions x 2 devices at 2 ops/s.
# Why 10 min: the server's slowest own timescale is passivation (5 min idle), and RSS settles only after the
# first passivations and a full cycle of device lives (issue 8: a 5 min warm-up fitted part of the settling).
SOAK_DEFAULTS = {"duration": 2100.0, "warmup": 600.0, "sessions": 40, "rate": 2.0}
SOAK_QUICK = {"duration": 20.0, "warmup": 5.0, "sessions": 5, "rate": 2.0}
# The soak's hostile clients include a frame flood: the per-connection rate limit stays at its default there.
SOAK_ENV = {"SESSIOND_RATE_LIMIT": "50/100"}
ALL_SCENARIOS: dict[str, Any] = {**SCENARIOS, SOAK: soak.soak}
GENERATORS = ("python", "node")
NODE_SCENARIOS = ("fanout", "saturation", "capacity", "handoff")  # the scenarios --generator node drives


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="sessiond load benchmarks (issue 4).")
    p.add_argument("scenario", choices=sorted([*ALL_SCENARIOS, CLUSTER]))
    p.add_argument("--target", choices=["sessiond", "baseline", "both"], default="both")
    p.add_argument("--sessions", type=int, help="sessions (default 100; capacity: derived from --count)")
    p.add_argument("--devices", type=int, help="devices per session (default 3; handoff always uses 2)")
    p.add_argument("--rate", type=float, help="ops/s per device (fanout; default 10, cluster 2)")
    p.add_argument("--duration", type=float, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before measuring (default 2)")
    p.add_argument("--count", type=int, help="capacity: idle devices to open (default 10000)")
    p.add_argument("--start-rate", type=float, help="saturation: first R (default 2)")
    p.add_argument("--factor", type=float, help="saturation: R multiplier per step (default 1.5)")
    p.add_argument("--steps", type=int, help="saturation: most steps (default 10)")
    p.add_argument("--step-duration", type=float, help="saturation: measured seconds per step (default 4)")
    p.add_argument("--p99-limit", type=float,
                   help="saturation: a step fails above this delivery p99 in ms (default 50, issue 9's bound)")
    p.add_argument("--pods", type=int, help="cluster: pods of the multi-pod run (default 3)")
    p.add_argument("--ttl", type=float, help="cluster: SESSIOND_LEASE_TTL_S, membership and lease TTL (default 3.0)")
    p.add_argument("--failover-sessions", type=int, help="cluster: sessions under load at the kill (default 30)")
    p.add_argument("--failover-rate", type=float, help="cluster: inc ops/s per device during failover (default 5)")
    p.add_argument("--url", help="target a running server's WebSocket URL (ws://host:port/v1/ws) instead")
    p.add_argument("--http-url", help="with --url: its REST base URL (sessiond); without it sessions are made up")
    p.add_argument("--jwt-secret", help="with --url: the HS256 secret of that server")
    p.add_argument("--server-pid", type=int, help="with --url: its pid, for CPU and RSS from /proc")
    p.add_argument("--redis", action="store_true", help="sessiond with SESSIOND_REDIS_URL=redis://127.0.0.1:6379/0")
    p.add_argument("--postgres", action="store_true", help="sessiond with PostgreSQL (database sessiond_bench)")
    p.add_argument("--durability", choices=["memory", "redis", "postgres"],
                   help="SESSIOND_DURABILITY for sessiond (postgres implies --postgres)")
    p.add_argument("--set", action="append", default=[], metavar="SESSIOND_X=V",
                   help="an extra setting for the sessiond it starts (repeatable), e.g. SESSIOND_WS_FAST_PATH=0")
    p.add_argument("--generator", choices=list(GENERATORS), default="python",
                   help="fanout, saturation, capacity, handoff: the load generator, loadgen.py (python) or "
                        "bench/nodegen/gen.mjs on Node's ws (node; install it with `npm ci --prefix bench/nodegen`)")
    p.add_argument("--procs", type=int, help="with --generator node: Node processes sharing the devices (default 1)")
    p.add_argument("--handoff-rate", type=float,
                   help="handoff: handoffs/s per session, paced (default: each pair as fast as it can, a closed loop)")
    p.add_argument("--results", type=Path, help="results folder (default bench/results/<timestamp>-<scenario>)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and generator to cores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.scenario == CLUSTER and args.url:
        p.error("the cluster scenario starts its own pods: --url does not apply")
    if args.scenario == CLUSTER and args.pods is not None and args.pods < 2:
        p.error("--pods must be 2 or more")
    if args.generator != "python" and args.scenario not in NODE_SCENARIOS:
        p.error(f"--generator {args.generator} drives {', '.join(NODE_SCENARIOS)} only")
    if args.procs is not None and (args.generator != "node" or args.procs < 1):
        p.error("--procs wants --generator node and a number >= 1")
    return args


def options(args: argparse.Namespace) -> Options:
    """Options from the defaults (or --quick), overridden by the flags given."""
    base = Options.quick() if args.quick else Options()
    flags = {"sessions": args.sessions, "devices": args.devices, "rate": args.rate, "duration": args.duration,
             "warmup": args.warmup, "capacity_devices": args.count, "saturation_start": args.start_rate,
             "saturation_factor": args.factor, "saturation_steps": args.steps,
             "saturation_step_s": args.step_duration, "p99_limit_ms": args.p99_limit,
             "pods": args.pods, "ttl": args.ttl,
             "failover_sessions": args.failover_sessions, "failover_rate": args.failover_rate,
             "generator": args.generator, "generator_procs": args.procs, "handoff_rate": args.handoff_rate}
    if args.scenario == CLUSTER and not args.quick:
        # A lighter default R: at 10 one pod already fills its core here, and three pods sharing it saturate
        # long before that (the relay costs CPU per message), so latency would be all queueing.
        base = replace(base, rate=CLUSTER_RATE)
    if args.scenario == SOAK:
        base = replace(base, **(SOAK_QUICK if args.quick else SOAK_DEFAULTS))
    return replace(base, **{k: v for k, v in flags.items() if v is not None})


def _progress(bar: tqdm) -> Any:
    def update(done: float, total: float, info: dict[str, Any]) -> None:
        bar.total = round(total, 1)
        bar.n = round(done, 1)
        bar.set_postfix(info, refresh=False)
        bar.refresh()

    return update


async def run_one(name: str, args: argparse.Namespace, opts: Options, workdir: Path,
                  server_cpus: set[int] | None) -> dict[str, Any]:
    """Run the scenario against one target; a target that cannot start is reported, not raised."""
    scenario = ALL_SCENARIOS[args.scenario]
    with tqdm(desc=f"{args.scenario} · {name}", total=1, disable=True if args.no_progress else None,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total}{postfix}", leave=False) as bar:
        if args.url:
            target: Target = url_target(args.url, args.http_url, args.jwt_secret, args.server_pid, name=name)
            try:
                return await scenario(target, opts, _progress(bar))
            except GeneratorError as exc:
                return {"target": name, "failed": str(exc)}
        try:
            extra = {"SESSIOND_DURABILITY": args.durability} if args.durability else {}
            extra.update(_settings(args.set))
            if args.scenario == SOAK:
                extra.update(SOAK_ENV)
            async with running_target(name, workdir, cpus=server_cpus, redis=args.redis or args.durability == "redis",
                                      postgres=args.postgres or args.durability == "postgres",
                                      extra_env=extra) as target:
                return await scenario(target, opts, _progress(bar))
        except (ServerError, GeneratorError) as exc:
            return {"target": name, "failed": str(exc)}


async def run_cluster(args: argparse.Namespace, opts: Options, workdir: Path,
                      server_cpus: set[int] | None) -> dict[str, dict[str, Any]]:
    """The cluster scenario: one progress bar whose label follows its parts (1 pod, N pods, failover)."""
    with tqdm(desc=CLUSTER, total=1, disable=True if args.no_progress else None,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total}{postfix}", leave=False) as bar:

        def stage(name: str) -> Any:
            bar.set_description(f"{CLUSTER} · {name}", refresh=False)
            return _progress(bar)

        return await cluster.run(opts, workdir, server_cpus, stage)


async def run(args: argparse.Namespace, opts: Options, directory: Path, argv: list[str]) -> dict[str, Any]:
    """Run every target in turn (never at once: they would share the cores) and write the report."""
    raise_fd_limit()
    server_cpus, generator_cpus = (None, None) if args.no_pin else plan_pinning()
    before = os.sched_getaffinity(0)
    names = ["url"] if args.url else (["baseline", "sessiond"] if args.target == "both" else [args.target])
    if args.scenario == SOAK and not args.url:
        names = ["sessiond"]  # the soak needs REST and the server's JWT secret: the baseline has neither
    results: dict[str, dict[str, Any]] = {}
    pin(0, generator_cpus)
    try:
        if args.scenario == CLUSTER:
            results = await run_cluster(args, opts, directory, server_cpus)
        else:
            for name in names:
                results[name] = await run_one(name, args, opts, directory, server_cpus)
    finally:
        pin(0, before)
    if args.scenario == "saturation":
        align_saturation(results)
    return {
        "scenario": args.scenario,
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cores": len(cores()),
                    "pinning": f"server {sorted(server_cpus)}, generator {sorted(generator_cpus)}"
                    if server_cpus and generator_cpus else "none"},
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    opts = options(args)
    if args.generator == "node":
        try:  # before any server starts: say how to install it
            node_command(opts.generator_procs)
        except GeneratorError as exc:
            print(f"{args.scenario}: --generator node: {exc}", file=sys.stderr)
            return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = args.results or RESULTS_ROOT / f"{stamp}-{args.scenario}"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        payload = trio.run(run, args, opts, directory, argv)
    except ServerError as exc:  # the cluster scenario's services (Redis, PostgreSQL) are not there
        print(f"\n{args.scenario}: cannot run: {exc}", file=sys.stderr)
        return 2
    table = report.write(directory, payload)
    print(f"\n{args.scenario}: {payload['command']}\n")
    print(table)
    for name, result in payload["results"].items():
        if result.get("generator_saturated"):
            print(f"\nwarning: the load generator's CPU was saturated during the {name} run")
    for line in report.cluster_warnings(payload):
        print(f"\nwarning: {line}")
    broken = report.correctness_failures(payload)
    for line in broken:
        print(f"\nFAILED: {line}")
    print(f"\nresults: {directory}")
    return 1 if broken or any("failed" in r for r in payload["results"].values()) else 0


def _settings(pairs: list[str]) -> dict[str, str]:
    """`--set SESSIOND_X=V` pairs as environment entries; anything else is a usage error."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("SESSIOND_"):
            raise SystemExit(f"--set wants SESSIOND_NAME=VALUE, got {pair!r}")
        env[name] = value
    return env
