"""`--generator node`: the fanout load (and capacity, handoff) from bench/nodegen/gen.mjs (Node's ws) through
`python -m bench ... --quick`, against a real sessiond and the baseline (issue 9). Like test_smoke.py: the run
completes, every change is delivered to every other device, no error, the figures are there; never a speed threshold.

Needs node 20+ and npm (scripts/tools.sh ensure); a missing tool fails, it never skips. `npm ci` runs only when
bench/nodegen/node_modules is missing or older than the lockfile (the npm registry is the only download).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.bench.test_smoke import REPO, run_bench, sane_latency

NODEGEN = REPO / "bench" / "nodegen"
NPM_CI_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def nodegen() -> Path:
    """bench/nodegen's node_modules as its lockfile says (npm ci when missing or older than the lockfile)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: --generator node needs Node 20+ and npm (scripts/tools.sh ensure)")
    lock = NODEGEN / "package-lock.json"
    assert lock.is_file(), "bench/nodegen/package-lock.json must be committed"
    marker = NODEGEN / "node_modules" / ".package-lock.json"  # written by npm ci / npm install
    if not marker.is_file() or marker.stat().st_mtime < lock.stat().st_mtime:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
        try:
            done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODEGEN, env=env, capture_output=True,
                                  text=True, timeout=NPM_CI_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci in {NODEGEN} took more than {NPM_CI_TIMEOUT_S} s")
        if done.returncode != 0:
            pytest.fail(f"npm ci in {NODEGEN} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return NODEGEN


def delivered_everything(r: dict[str, Any]) -> None:
    """Every op sent in the window reached the D-1 other devices, was acked, and nothing went wrong."""
    assert r["generator"] == "node"
    assert r["sent_in_window"] > 0
    assert r["delivered_of_window_ops"] == r["expected_deliveries"] == r["sent_in_window"] * (r["devices"] - 1)
    assert r["acked_ratio"] == 1.0
    assert r["error_count"] == 0 and r["errors"] == {}
    assert r["generator_lag_events"] == 0


async def test_fanout_with_the_node_generator(nodegen: Path, tmp_path: Path) -> None:
    r = await run_bench("fanout", "sessiond", tmp_path, "--generator", "node")
    delivered_everything(r)
    sane_latency(r["ack"])
    sane_latency(r["delivery"])
    assert r["delivery"]["count"] == r["expected_deliveries"] and r["ack"]["count"] == r["sent_in_window"]
    # gen.mjs summarises its own samples; the bench recomputes them with bench/stats.py: the same figures
    for key in ("ack", "delivery"):
        node, ours = r["node"][key], r[key]
        assert {q: node[q] for q in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")} == \
               {q: ours[q] for q in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
        assert node["mean_ms"] == pytest.approx(ours["mean_ms"])
    assert r["delivered_per_s"] > 0 and math.isfinite(r["server_cpu_per_msg_us"]) and r["server_cpu_per_msg_us"] > 0
    assert 0 < r["generator_cpu_util"] < 1.5 and r["generator_saturated"] is False
    assert r["generator_procs"] == 1 and r["node"]["version"].startswith("v") and r["node"]["ws"]
    assert r["generator_cpus"], "the generator's CPU affinity is recorded"
    assert sum(r["series"]["deliveries_per_s"]) > 0
    assert (tmp_path / "latency.png").exists() and (tmp_path / "throughput.png").exists()
    assert "load generator" in (tmp_path / "report.md").read_text()


async def test_saturation_with_two_node_processes(nodegen: Path, tmp_path: Path) -> None:
    """Every step runs gen.mjs again; --procs 2 splits the sessions over two Node processes and merges them."""
    r = await run_bench("saturation", "baseline", tmp_path, "--generator", "node", "--procs", "2")
    assert r["generator"] == "node" and 1 <= len(r["steps"]) <= 3
    for step in r["steps"]:
        delivered_everything(step)
        sane_latency(step["delivery"])
        assert step["generator_procs"] == 2
        assert len(step["node"]["cpu"]["procs"]) == 3  # two workers and the parent that merges them
        assert step["generator_max_proc_util"] <= step["generator_cpu_util"]


async def test_gen_mjs_alone_refuses_a_bad_job(nodegen: Path) -> None:
    done = await trio.run_process(["node", "gen.mjs", "-"], stdin=b'{"devices": []}', cwd=nodegen,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 2 and done.stdout == b""
    assert b"job.devices" in done.stderr


@pytest.mark.parametrize("target", ["sessiond", "baseline"])
async def test_capacity_with_the_node_generator(nodegen: Path, tmp_path: Path, target: str) -> None:
    """Idle devices on Node (rate 0): all connect and stay; the connect rate and the server's CPU come from the
    generator's own connect phase, the RSS from the hold."""
    r = await run_bench("capacity", target, tmp_path, "--generator", "node", "--count", "150", "--procs", "2")
    assert r["generator"] == "node"
    assert r["devices_connected"] == r["devices_alive_after_hold"] == 150
    assert r["error_count"] == 0 and r["errors"] == {}
    assert r["connect_s"] > 0 and r["connect_rate_per_s"] == pytest.approx(150 / r["connect_s"])
    assert r["server_cpu_per_connect_ms"] > 0 and math.isfinite(r["rss_per_device_kb"])
    assert 0 < r["generator_max_proc_util"] <= r["generator_cpu_util"]


def handed_off_everything(r: dict[str, Any]) -> None:
    """Handoffs happened, every acked change reached the other device exactly once, nothing went wrong."""
    assert r["generator"] == "node"
    assert r["handoffs"] > 0 and r["handoff"]["count"] == r["handoffs"]
    assert r["changes_acked"] == r["handoffs"] * 3  # each pair stops after a whole handoff: 3 acked ops each
    assert (r["lost"], r["duplicated"], r["version_gaps"]) == (0, 0, 0)
    assert r["error_count"] == 0 and r["errors"] == {}
    sane_latency(r["handoff"])
    assert 0 < r["handoffs_in_window"] <= r["handoffs"]
    assert math.isfinite(r["server_cpu_per_handoff_ms"]) and r["server_cpu_per_handoff_ms"] > 0
    assert 0 < r["generator_max_proc_util"] <= r["generator_cpu_util"]


async def test_handoff_with_the_node_generator(nodegen: Path, tmp_path: Path) -> None:
    """The closed loop on Node against sessiond: the same keys as the Python handoff, the latency recomputed by
    bench/stats.py from gen.mjs's samples equal to gen.mjs's own summary."""
    r = await run_bench("handoff", "sessiond", tmp_path, "--generator", "node")
    handed_off_everything(r)
    assert r["pacing"] == "closed loop" and r["generator_procs"] == 1
    node, ours = r["node"]["handoff"], r["handoff"]
    assert {q: node[q] for q in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")} == \
           {q: ours[q] for q in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    assert "load generator" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "latency.png").exists()


async def test_paced_handoff_on_two_node_processes(nodegen: Path, tmp_path: Path) -> None:
    """--handoff-rate paces each pair; --procs 2 splits the pairs over two Node processes and merges them."""
    r = await run_bench("handoff", "baseline", tmp_path, "--generator", "node", "--handoff-rate", "2",
                        "--procs", "2")
    handed_off_everything(r)
    assert r["pacing"] == "2/s per session"
    per_session = r["handoffs"] / r["sessions"] / r["duration_s"]
    assert 0.5 <= per_session <= 2.5, per_session  # about 2 a second, never the closed loop's
    assert r["generator_procs"] == 2 and len(r["node"]["cpu"]["procs"]) == 3  # two workers and their parent


async def test_gen_mjs_refuses_a_handoff_job_without_pairs(nodegen: Path) -> None:
    job = b'{"url": "ws://127.0.0.1:1/v1/ws", "scenario": "handoff", "devices": [{"session": "s", "device": "a"}]}'
    done = await trio.run_process(["node", "gen.mjs", "-"], stdin=job, cwd=nodegen, capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert done.returncode == 2 and done.stdout == b""
    assert b"exactly two devices" in done.stderr


async def test_the_node_generator_drives_fanout_saturation_capacity_and_handoff_only(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench", "soak", "--generator", "node", "--results", str(tmp_path)]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    assert done.returncode == 2 and b"fanout, saturation, capacity, handoff only" in done.stderr
