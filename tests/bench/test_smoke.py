"""Seconds-long smoke runs of every bench scenario through the CLI (`python -m bench <scenario> --quick`).

They assert that a run completes, writes its report and reports sane numbers; never a speed threshold.
The sessiond variants run once `sessiond serve` exists. The cluster run needs the local Redis and PostgreSQL
(the `redis_url` and `pg_url` fixtures fail the test with a clear message when they are down).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from bench import durability_ratio, soak
from bench.proc import process_cpu_s, process_rss_bytes
from bench.server import sessiond_runnable
from bench.stats import Latency, percentile

TARGETS = ["baseline", "sessiond"]  # a sessiond that cannot run fails these tests (never a skip)


def test_the_sessiond_command_is_runnable() -> None:
    """The bench starts `sessiond serve`; a missing command is a failure here, not a silently skipped bench."""
    assert sessiond_runnable(), "the sessiond command is not installed in the venv (pip install -e .)"
TOLERATED: set[str] = set()
REPO = Path(__file__).resolve().parents[2]


async def run_bench(scenario: str, target: str, results: Path, *extra: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench", scenario, "--quick", "--target", target, "--results", str(results),
            "--no-progress", *extra]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                  cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    assert "results:" in output
    assert (results / "report.md").exists()
    payload = json.loads((results / "results.json").read_text())
    assert payload["scenario"] == scenario
    result: dict[str, Any] = payload["results"][target]
    assert "failed" not in result, result
    assert set(result["errors"]) <= TOLERATED, result["errors"]
    return result


def sane_latency(summary: dict[str, float]) -> None:
    assert summary["count"] > 0
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]


@pytest.mark.parametrize("target", TARGETS)
async def test_fanout(target: str, tmp_path: Path) -> None:
    r = await run_bench("fanout", target, tmp_path)
    assert r["delivered_per_s"] > 0
    assert r["offered_ops_per_s"] > 0
    assert 0.5 < r["delivered_ratio"] <= 1.0
    sane_latency(r["ack"])
    sane_latency(r["delivery"])
    assert r["server_cpu_per_msg_us"] > 0 and math.isfinite(r["server_cpu_per_msg_us"])
    assert 0 <= r["generator_cpu_util"] < 2
    assert (tmp_path / "latency.png").exists() and (tmp_path / "throughput.png").exists()


@pytest.mark.parametrize("target", TARGETS)
async def test_saturation(target: str, tmp_path: Path) -> None:
    r = await run_bench("saturation", target, tmp_path)
    assert 1 <= len(r["steps"]) <= 3
    assert r["max_rate_per_device"] >= 0
    assert all(step["delivered_per_s"] > 0 for step in r["steps"])
    assert r["stopped_by"] in {"limit reached", "max steps"}


@pytest.mark.parametrize("target", TARGETS)
async def test_capacity(target: str, tmp_path: Path) -> None:
    r = await run_bench("capacity", target, tmp_path, "--count", "150")
    assert r["devices_connected"] == 150
    assert r["devices_alive_after_hold"] == 150
    assert r["connect_rate_per_s"] > 0
    assert r["rss_after_mb"] > 0 and math.isfinite(r["rss_per_device_kb"])


@pytest.mark.parametrize("target", TARGETS)
async def test_handoff(target: str, tmp_path: Path) -> None:
    r = await run_bench("handoff", target, tmp_path)
    assert r["handoffs"] > 0
    assert r["changes_acked"] > 0
    assert (r["lost"], r["duplicated"], r["version_gaps"]) == (0, 0, 0)
    sane_latency(r["handoff"])


async def test_paced_handoff_keeps_its_pace(tmp_path: Path) -> None:
    """--handoff-rate: each pair hands off at that rate (the latency of one handoff, not of a saturated queue)."""
    r = await run_bench("handoff", "sessiond", tmp_path, "--handoff-rate", "2")
    assert r["pacing"] == "2/s per session"
    per_session = r["handoffs"] / r["sessions"] / r["duration_s"]
    assert 0.5 <= per_session <= 2.5, per_session  # the quick run: about 2 a second, never the closed loop's
    assert (r["lost"], r["duplicated"], r["version_gaps"]) == (0, 0, 0)
    sane_latency(r["handoff"])


@pytest.mark.slow
async def test_cluster(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    """One pod, three pods with devices spread over them, then a kill -9 under load: nothing lost or doubled."""
    argv = [sys.executable, "-m", "bench", "cluster", "--quick", "--results", str(tmp_path), "--no-progress"]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    payload = json.loads((tmp_path / "results.json").read_text())
    results = payload["results"]
    for part in ("single", "multi", "failover"):
        assert "failed" not in results[part], results[part]
    f = results["failover"]
    assert (f["lost"], f["duplicated"]) == (0, 0), f["problems"]
    assert done.returncode == 0, output
    assert (tmp_path / "report.md").exists() and (tmp_path / "failover.png").exists()
    for part in ("single", "multi"):
        r = results[part]
        assert r["delivered_per_s"] > 0 and r["error_count"] == 0, r["errors"]
        sane_latency(r["ack"])
        sane_latency(r["delivery"])
    assert set(results["multi"]["pod_cpu_per_msg_us"]) == {"pod-1", "pod-2", "pod-3"}
    assert results["multi"]["devices_on_other_pods"] > 0.5
    assert f["sessions_moved"] >= 1 and f["writable"]["missing"] == 0 and f["acked_again"]["missing"] == 0
    assert f["increments_acked"] > 0 and f["rest_increments_ok"] >= f["sessions_moved"]
    assert f["redis_keys_deleted"] > 0


def test_percentile_and_summary() -> None:
    assert percentile([], 50) != percentile([], 50)  # nan
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    lat = Latency()
    for ns in (1_000_000, 2_000_000, 3_000_000):
        lat.add(ns)
    assert lat.summary()["p50_ms"] == 2.0 and lat.summary()["max_ms"] == 3.0


def test_proc_readers_on_self() -> None:
    import os

    assert process_cpu_s(os.getpid()) > 0
    assert process_rss_bytes(os.getpid()) > 1 << 20


@pytest.mark.slow
async def test_soak(tmp_path: Path) -> None:
    """A 20 s soak: churn, cut connections and hostile clients at once; every increment counted exactly."""
    argv = [sys.executable, "-m", "bench", "soak", "--quick", "--results", str(tmp_path), "--no-progress"]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    r = json.loads((tmp_path / "results.json").read_text())["results"]["sessiond"]
    assert "failed" not in r, r
    assert (r["lost"], r["doubled"], r["unreadable"]) == (0, 0, 0), r["problems"]
    assert r["acked"] > 0 and r["connections_cut"] > 0 and r["reconnects"] > 0
    assert r["churned_sessions"] > 0 and not r["churn"].get("mismatched"), r["churn_problems"]
    assert r["hostile_clients"] >= len(soak.HOSTILES) and r["hostile_unexpected"] == 0, r["hostile_unexpected_examples"]
    assert len(r["series"]["rss"]) >= 3 and (tmp_path / "rss.png").exists()


def test_soak_slope_is_a_least_squares_fit_per_hour() -> None:
    assert soak.slope_per_hour([(0.0, 10.0), (1800.0, 12.5), (3600.0, 15.0)]) == pytest.approx(5.0)
    assert soak.slope_per_hour([(0.0, 10.0), (60.0, 10.0), (120.0, 10.0)]) == 0.0
    assert math.isnan(soak.slope_per_hour([(0.0, 1.0), (1.0, 2.0)]))


def test_soak_failures_name_loss_doubles_hostile_answers_and_a_leak() -> None:
    clean = {"lost": 0, "doubled": 0, "unreadable": 0, "churn": {}, "hostile_unexpected": 0, "device_failures": [],
             "rss_slope_mb_per_h": 1.0, "duration_s": 1800}
    assert soak.correctness_failures(clean) == []
    assert "lost" in soak.correctness_failures({**clean, "lost": 1})[0]
    assert "twice" in soak.correctness_failures({**clean, "doubled": 2})[0]
    assert "hostile" in soak.correctness_failures({**clean, "hostile_unexpected": 1})[0]
    assert "RSS grows" in soak.correctness_failures({**clean, "rss_slope_mb_per_h": 7.5})[0]
    assert soak.correctness_failures({**clean, "rss_slope_mb_per_h": 7.5, "duration_s": 60}) == []  # too short


@pytest.mark.services
async def test_the_group_commit_probe_reports_shared_round_trips(redis_url: str) -> None:
    """`python -m bench.groupcommit_probe` runs against the local Redis and shows the group commit at work: three
    appenders in step share round trips (fewer than one per append), one alone takes one per append."""
    argv = [sys.executable, "-m", "bench.groupcommit_probe", "--appenders", "1", "3", "--appends", "150", "--runs", "1"]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    rows = {row[0]: row for row in map(str.split, output.splitlines()) if row[:1] in (["1"], ["3"], ["bare"])}
    assert set(rows) == {"1", "3", "bare"}, output
    assert float(rows["1"][-1]) == 1.0 and float(rows["3"][-1]) < 0.5, output
    assert all(float(row[1]) > 0 for row in rows.values()), output


def test_durability_ratio_summary_pairs_runs_in_order() -> None:
    summary = durability_ratio.summarize([100.0, 120.0, 90.0], [120.0, 126.0, 117.0])
    assert summary.pair_ratios == pytest.approx([1.2, 1.05, 1.3])
    assert summary.median_pair_ratio == pytest.approx(1.2)
    assert summary.ratio_of_medians == pytest.approx(120.0 / 100.0)
    with pytest.raises(ValueError):
        durability_ratio.summarize([100.0], [])


async def run_ratio(results: Path, *extra: str) -> tuple[int, str]:
    """One quick pair of `python -m bench.durability_ratio` (Python generator): its exit code and output."""
    argv = [sys.executable, "-m", "bench.durability_ratio", "--pairs", "1", "--quick", "--generator", "python",
            "--results", str(results), *extra]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.services
async def test_durability_ratio_runs_a_pair(redis_url: str, tmp_path: Path) -> None:
    """`python -m bench.durability_ratio` runs memory mode and Redis mode (the local Redis) and reports the ratio."""
    returncode, output = await run_ratio(tmp_path)
    assert returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pairs"] == 1 and summary["memory_us"][0] > 0 and summary["redis_us"][0] > 0, summary
    runs = {mode: json.loads((tmp_path / f"pair01-{mode}" / "results.json").read_text())["results"]["sessiond"]
            for mode in ("memory", "redis")}
    assert runs["memory"]["storage"] == "embedded" and runs["redis"]["storage"] == "redis", runs
    assert "ratio of medians" in output, output


async def test_durability_ratio_passes_settings_to_the_servers(tmp_path: Path) -> None:
    """`--set` reaches the servers it starts: one they refuse (HOT_ACTORS above 1000) fails the first run, memory
    mode, which needs no Redis."""
    returncode, output = await run_ratio(tmp_path, "--set", "SESSIOND_HOT_ACTORS=5000")
    assert returncode != 0 and "memory run failed" in output, output
    assert "HOT_ACTORS" in (tmp_path / "pair01-memory" / "output.txt").read_text()
