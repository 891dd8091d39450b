"""`python -m bench.durability_ratio`: what Redis durability costs in server CPU per delivered message, as a ratio
to memory mode (issue 9's goal: at most 1.2x), measured so that a noisy host does not decide it.

Why a command of its own: on a shared 2-core host one fanout run's CPU per message drifts by 10-50 % from one run to
the next, more than the effect. So this runs `python -m bench fanout --target sessiond` in pairs, one run in memory
mode and one with `--redis` (a fresh server each), alternating which goes first, and reports each pair's ratio, the
median of those, and the ratio of the two modes' medians. Every run's full report stays in its own folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO / "bench" / "results"
MODES = ("memory", "redis")


@dataclass(frozen=True)
class Summary:
    pairs: int
    memory_us: list[float]  # CPU µs per delivered message, one per run, in run order
    redis_us: list[float]
    pair_ratios: list[float]
    median_pair_ratio: float
    ratio_of_medians: float


def summarize(memory_us: list[float], redis_us: list[float]) -> Summary:
    """Pair i is (memory_us[i], redis_us[i])."""
    if not memory_us or len(memory_us) != len(redis_us):
        raise ValueError("one memory-mode run per Redis-mode run, at least one pair")
    ratios = [r / m for m, r in zip(memory_us, redis_us, strict=True)]
    return Summary(
        pairs=len(ratios),
        memory_us=memory_us,
        redis_us=redis_us,
        pair_ratios=ratios,
        median_pair_ratio=statistics.median(ratios),
        ratio_of_medians=statistics.median(redis_us) / statistics.median(memory_us),
    )


def _fanout(mode: str, folder: Path, args: argparse.Namespace) -> float:
    """One fanout run; its CPU µs per delivered message. A failed run stops the whole measurement."""
    argv = [sys.executable, "-m", "bench", "fanout", "--target", "sessiond", "--generator", args.generator,
            "--no-progress", "--results", str(folder)]
    argv += ["--quick"] if args.quick else ["--rate", str(args.rate), "--duration", str(args.duration)]
    argv += ["--redis"] if mode == "redis" else []
    for setting in args.set:
        argv += ["--set", setting]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    (folder / "output.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {done.returncode}); see {folder / 'output.txt'}")
    result = json.loads((folder / "results.json").read_text())["results"]["sessiond"]
    return float(result["server_cpu_per_msg_us"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability_ratio", description=__doc__)
    parser.add_argument("--pairs", type=int, default=5, help="memory/Redis pairs (default 5)")
    parser.add_argument("--rate", type=float, default=5.0,
                        help="ops/s per device, 100 x 3 devices (default 5: 3k msgs/s)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--generator", choices=["node", "python"], default="node", help="load generator (default node)")
    parser.add_argument("--quick", action="store_true", help="seconds-long runs (a smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="SESSIOND_X=V",
                        help="a setting for every sessiond started, both modes (repeatable), as `python -m bench "
                             "--set`")
    parser.add_argument("--results", type=Path, help="folder (default bench/results/<timestamp>-durability-ratio)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    directory = args.results or RESULTS_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-durability-ratio"
    directory.mkdir(parents=True, exist_ok=True)
    measured: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.pairs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:  # alternate the order: a drifting host favours neither
            folder = directory / f"pair{i + 1:02d}-{mode}"
            folder.mkdir()
            measured[mode].append(_fanout(mode, folder, args))
        m, r = measured["memory"][-1], measured["redis"][-1]
        print(f"pair {i + 1}: memory {m:.1f} µs/msg, redis {r:.1f} µs/msg, ratio {r / m:.3f}", flush=True)
    summary = summarize(measured["memory"], measured["redis"])
    (directory / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    ratios = summary.pair_ratios
    print(f"\nRedis / memory CPU per delivered message over {summary.pairs} pairs: median of pair ratios "
          f"{summary.median_pair_ratio:.3f} ({min(ratios):.2f}-{max(ratios):.2f}); ratio of medians "
          f"{summary.ratio_of_medians:.3f} (memory {statistics.median(summary.memory_us):.1f}, "
          f"redis {statistics.median(summary.redis_us):.1f} µs/msg)")
    print(f"results: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
