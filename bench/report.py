"""The end of a run: a terminal table (targets side by side, sessiond/baseline ratio), a JSON file, a Markdown
report and PNG plots (latency distribution, throughput over time) in the results folder."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

Getter = Callable[[dict[str, Any]], Any]
# (label, getter, format, ratio wanted)
Row = tuple[str, Getter, str, bool]
SAMPLE_SERIES = ("delivery_ms", "ack_ms", "handoff_ms")


def _quantile(key: str, q: str) -> Getter:
    def get(r: dict[str, Any]) -> Any:
        return r[key][f"{q}_ms"]

    return get


def _lat(key: str) -> list[Row]:
    return [(f"{key} {q} ms", _quantile(key, q), "{:.2f}", True) for q in ("p50", "p90", "p99", "max")]


def _gen(r: dict[str, Any]) -> str:
    util = r.get("generator_cpu_util")
    if util is None:
        return "SATURATED" if r.get("generator_saturated") else "ok"
    lagged = f" (lagged {r['generator_lag_events']}x)" if r.get("generator_lag_events") else ""
    procs = f" over {r['generator_procs']} procs" if r.get("generator_procs", 1) > 1 else ""
    return f"{util:.0%}{procs}{' SATURATED' if r['generator_saturated'] else ''}{lagged}"


def _generator(r: dict[str, Any]) -> str:
    """Which load generator ran: python (loadgen.py) or node (gen.mjs on ws, with its versions)."""
    node = r.get("node")
    if r.get("generator") == "node" and isinstance(node, dict):
        return f"node {node.get('version')} ws {node.get('ws')}"
    return str(r.get("generator", "python"))


ROWS: dict[str, list[Row]] = {
    "fanout": [
        ("load generator", _generator, "{}", False),
        ("offered ops/s", lambda r: r["offered_ops_per_s"], "{:,.0f}", False),
        ("delivered msgs/s", lambda r: r["delivered_per_s"], "{:,.0f}", True),
        ("delivered / offered", lambda r: r["delivered_ratio"], "{:.1%}", False),
        *_lat("ack"), *_lat("delivery"),
        ("errors", lambda r: r["error_count"], "{:d}", False),
        ("server CPU util", lambda r: r["server_cpu_util"], "{:.0%}", False),
        ("server CPU µs / delivered msg", lambda r: r["server_cpu_per_msg_us"], "{:.1f}", True),
        ("generator CPU (one core)", _gen, "{}", False),
        ("other processes CPU (cores)", lambda r: r["other_processes_cpu_util"], "{:.2f}", False),
    ],
    "saturation": [
        ("load generator", _generator, "{}", False),
        ("max sustained R (ops/s/device)", lambda r: r["max_rate_per_device"], "{:g}", True),
        ("delivered msgs/s at max", lambda r: r["max_delivered_per_s"], "{:,.0f}", True),
        ("delivery p99 ms at max", lambda r: r["p99_at_max_ms"], "{:.2f}", True),
        ("server CPU µs / msg at max", lambda r: r["cpu_per_msg_us_at_max"], "{:.1f}", False),
        ("R sustained by all targets", lambda r: r["common_rate"], "{:g}", False),
        ("server CPU µs / msg at that R", lambda r: r["cpu_per_msg_us_at_common_rate"], "{:.1f}", True),
        ("steps run", lambda r: len(r["steps"]), "{:d}", False),
        ("stopped by", lambda r: r["stopped_by"], "{}", False),
        ("errors", lambda r: r["error_count"], "{:d}", False),
        ("generator saturated", lambda r: "YES" if r["generator_saturated"] else "no", "{}", False),
    ],
    "capacity": [
        ("devices connected", lambda r: r["devices_connected"], "{:,d}", False),
        ("alive after hold", lambda r: r["devices_alive_after_hold"], "{:,d}", False),
        ("connect rate /s", lambda r: r["connect_rate_per_s"], "{:,.0f}", True),
        ("server CPU ms / connect", lambda r: r["server_cpu_per_connect_ms"], "{:.2f}", True),
        ("server RSS before MiB", lambda r: r["rss_before_mb"], "{:.1f}", False),
        ("server RSS after MiB", lambda r: r["rss_after_mb"], "{:.1f}", False),
        ("server RSS KiB / device", lambda r: r["rss_per_device_kb"], "{:.1f}", True),
        ("generator CPU while connecting", _gen, "{}", False),
        ("errors", lambda r: r["error_count"], "{:d}", False),
    ],
    "handoff": [
        ("load generator", _generator, "{}", False),
        ("pacing", lambda r: r.get("pacing", "closed loop"), "{}", False),
        ("handoffs", lambda r: r["handoffs"], "{:,d}", False),
        ("handoffs/s", lambda r: r["handoffs_per_s"], "{:,.0f}", True),
        *_lat("handoff"),
        ("server CPU ms / handoff (incl. its ops)", lambda r: r["server_cpu_per_handoff_ms"], "{:.2f}", True),
        ("generator CPU (one core)", _gen, "{}", False),
        ("changes acked", lambda r: r["changes_acked"], "{:,d}", False),
        ("lost", lambda r: r["lost"], "{:d}", False),
        ("duplicated", lambda r: r["duplicated"], "{:d}", False),
        ("version gaps", lambda r: r["version_gaps"], "{:d}", False),
        ("errors", lambda r: r["error_count"], "{:d}", False),
    ],
    "soak": [
        ("duration s", lambda r: r["duration_s"], "{:,.0f}", False),
        ("RSS start / after warm-up / end MiB",
         lambda r: f"{r['rss_start_mb']:.1f} / {r['rss_after_warmup_mb']:.1f} / {r['rss_end_mb']:.1f}", "{}", False),
        ("RSS slope after warm-up MB/h (goal < 5)", lambda r: r["rss_slope_mb_per_h"], "{:+.2f}", False),
        ("open fds start / end", lambda r: f"{r['fds_start']} / {r['fds_end']}", "{}", False),
        ("server CPU util", lambda r: r["cpu_util"], "{:.0%}", False),
        ("increments acked", lambda r: r["acked"], "{:,d}", False),
        ("lost / doubled", lambda r: f"{r['lost']} / {r['doubled']}", "{}", False),
        ("uncertain (no answer)", lambda r: r["uncertain"], "{:,d}", False),
        ("device lives / connections cut", lambda r: f"{r['device_lives']:,} / {r['connections_cut']:,}", "{}",
         False),
        ("SDK reconnects", lambda r: r["reconnects"], "{:,d}", False),
        ("sessions churned", lambda r: r["churned_sessions"], "{:,d}", False),
        ("hostile clients / unexpected answers", lambda r: f"{r['hostile_clients']:,} / {r['hostile_unexpected']}",
         "{}", False),
    ],
}


def _cell(result: dict[str, Any], getter: Getter, fmt: str) -> tuple[str, Any]:
    if "failed" in result:
        return "—", None
    try:
        value = getter(result)
    except (KeyError, TypeError):
        return "—", None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—", None
    try:
        return fmt.format(value), value
    except (ValueError, TypeError):
        return str(value), value


def table_rows(scenario: str, results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per target, plus sessiond/baseline when both ran."""
    names = list(results)
    ratio = "sessiond" in results and "baseline" in results
    header = ["metric", *names, *(["sessiond/baseline"] if ratio else [])]
    rows = [["storage", *(str(results[n].get("storage", "")) for n in names), *([""] if ratio else [])]]
    for label, getter, fmt, wants_ratio in ROWS[scenario]:
        cells = [_cell(results[n], getter, fmt) for n in names]
        row = [label, *(c[0] for c in cells)]
        if ratio:
            a, b = _cell(results["sessiond"], getter, fmt)[1], _cell(results["baseline"], getter, fmt)[1]
            ok = wants_ratio and isinstance(a, int | float) and isinstance(b, int | float) and b
            row.append(f"{a / b:.2f}x" if ok else "")
        rows.append(row)
    for n in names:
        if "failed" in results[n]:
            rows.append([f"{n} failed", _last_line(results[n]["failed"]), *[""] * (len(header) - 2)])
    return header, rows


# ---- the cluster scenario: relay cost (1 pod, N pods, difference, goal) and failover (value, goal) ------------

GOAL_OK, GOAL_MISSED = "ok", "MISSED"


def _verdict(value: Any, limit: float, label: str) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return f"{label}: —"
    return f"{label}: {GOAL_OK if value <= limit else GOAL_MISSED}"


def _pod_rows(single: dict[str, Any], multi: dict[str, Any]) -> list[Row]:
    names = sorted({*single.get("pod_cpu_per_msg_us", {}), *multi.get("pod_cpu_per_msg_us", {})})
    return [(f"  {name} CPU µs / delivered msg", lambda r, n=name: r["pod_cpu_per_msg_us"][n], "{:.1f}", False)
            for name in names]


def cluster_tables(results: dict[str, dict[str, Any]]) -> list[tuple[list[str], list[list[str]]]]:
    """Two tables: the relay cost (1 pod | N pods | relay adds | goal) and the failover (value | goal)."""
    single, multi = results.get("single", {}), results.get("multi", {})
    adds = multi.get("relay_adds", {})
    diff = ("ack p50 ms", "ack p99 ms", "delivery p50 ms", "delivery p99 ms", "server CPU µs / delivered msg")
    goal = {"ack p50 ms": ("ack_p50_ms", "≤ 2 ms"), "delivery p50 ms": ("delivery_p50_ms", "≤ 2 ms")}
    key = {"ack p50 ms": "ack_p50_ms", "ack p99 ms": "ack_p99_ms", "delivery p50 ms": "delivery_p50_ms",
           "delivery p99 ms": "delivery_p99_ms", "server CPU µs / delivered msg": "server_cpu_per_msg_us"}
    rows_spec: list[Row] = [("devices on a non-owner pod", lambda r: r.get("devices_on_other_pods", 0.0), "{:.0%}",
                             False)]
    for row in ROWS["fanout"]:
        rows_spec.append(row)
        if row[0] == "server CPU µs / delivered msg":
            rows_spec += [*_pod_rows(single, multi),
                          ("redis-server CPU µs / delivered msg", lambda r: r["service_cpu_per_msg_us"]["redis"],
                           "{:.1f}", False)]
    header = ["metric", single.get("target", "1 pod"), multi.get("target", "N pods"), "relay adds", "goal"]
    rows = [["storage", str(single.get("storage", "")), str(multi.get("storage", "")), "", ""]]
    for label, getter, fmt, _ in rows_spec:
        if label == "server CPU util":
            label = "server CPU util (all pods, one core = 100%)"
        cells = [_cell(single, getter, fmt)[0], _cell(multi, getter, fmt)[0]]
        name = label.replace(" (all pods, one core = 100%)", "")
        added = adds.get(key.get(name, ""))
        extra = f"{added:+.2f}" if name in diff and isinstance(added, int | float) else ""
        target = goal.get(name)
        verdict = _verdict(adds.get(target[0]), 2.0, target[1]) if target else ""
        if name == "server CPU µs / delivered msg":
            verdict = "1 pod: ±10 % of today's"
        rows.append([label, *cells, extra, verdict])
    for part, r in (("1 pod", single), ("N pods", multi)):
        if "failed" in r:
            rows.append([f"{part} failed", _last_line(r["failed"]), "", "", ""])
    relay = (header, rows)

    f = results.get("failover", {})
    fheader = ["failover", "value", "goal"]
    if not f or "failed" in f:
        return [relay, (fheader, [["failed", _last_line(f.get("failed", "not run")), ""]])]

    def sec(summary: str, q: str) -> str:
        v = f[summary][f"{q}_s"]
        missing = f[summary].get("missing", 0)
        text = "—" if v != v else f"{v:.2f}"
        return text + (f" ({missing} never)" if missing else "")

    moved_to = ", ".join(f"{k}: {v}" for k, v in sorted(f["moved_to"].items())) or "—"
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(f["increments_refused"].items())) or "0"
    rest_answers = ", ".join(f"{k or 'none'}: {v}" for k, v in f["rest_answers"].items()) or "—"
    frows = [
        ["pods, lease TTL", f"{f['pods']} pods, TTL {f['ttl_s']:g} s", ""],
        ["load", f"{f['sessions']} sessions x {f['devices'] // max(1, f['sessions'])} SDK devices, "
                 f"{f['rate']:g} inc/s each, via a round-robin balancer", ""],
        ["killed (kill -9)", f"{f['victim']}, owner of {f['sessions_moved']} of {f['sessions']} sessions", ""],
        ["its sessions now on", moved_to, ""],
        ["writable again (REST 200) p50 s", sec("writable", "p50"), ""],
        ["writable again max s", sec("writable", "max"), _verdict(f["writable"]["max_s"], 5.0, "≤ 5 s")],
        ["all its devices acked again p50 s", sec("acked_again", "p50"), ""],
        ["all its devices acked again max s", sec("acked_again", "max"),
         _verdict(f["acked_again"]["max_s"], 5.0, "≤ 5 s")],
        ["every device acked again max s", sec("every_device_acked_again", "max"), ""],
        ["device reconnects", f"{f['device_reconnects']:,d}", ""],
        ["increments acked / sent", f"{f['increments_acked']:,d} / {f['increments_sent']:,d}", ""],
        ["increments refused (not applied)", refused, ""],
        ["increments without answer", f"{f['increments_uncertain'] + f['increments_unsettled']:d}", ""],
        ["REST increments ok; other answers", f"{f['rest_increments_ok']:d}; {rest_answers}", ""],
        ["lost", f"{f['lost']:d}", "0: " + (GOAL_OK if f["lost"] == 0 else GOAL_MISSED)],
        ["duplicated", f"{f['duplicated']:d}", "0: " + (GOAL_OK if f["duplicated"] == 0 else GOAL_MISSED)],
        ["version ≠ counters", f"{f['version_mismatches']:d}", ""],
        ["errors", f"{f['error_count']:d}", ""],
        ["generator CPU (one core)", _gen(f), ""],
    ]
    return [relay, (fheader, frows)]


def cluster_warnings(payload: dict[str, Any]) -> list[str]:
    """Cluster runs whose pods kept their cores over 90 % busy: their latency is queueing for the CPU."""
    if payload.get("scenario") != "cluster":
        return []
    out = []
    for r in payload["results"].values():
        cores, util = r.get("server_cores"), r.get("server_cpu_util")
        if cores and util is not None and util / cores > 0.9:
            out.append(f"the {r.get('target')} run kept its {cores} server core(s) {util / cores:.0%} busy: its "
                       "latency is mostly queueing for the CPU, not the relay hop (a lower --rate shows the hop)")
    return out


def correctness_failures(payload: dict[str, Any]) -> list[str]:
    """What makes a run fail besides a part that could not run: lost or duplicated changes (cluster, soak), and
    for the soak also unexpected answers to hostile clients and a memory leak."""
    if payload.get("scenario") == "soak":
        from bench.soak import correctness_failures as soak_failures

        return [line for r in payload["results"].values() if "failed" not in r for line in soak_failures(r)]
    if payload.get("scenario") != "cluster":
        return []
    f = payload["results"].get("failover", {})
    out = []
    if f.get("lost"):
        out.append(f"{f['lost']} acked change(s) lost across the failover (server bug): {f.get('problems')}")
    if f.get("duplicated"):
        out.append(f"{f['duplicated']} change(s) applied or acked twice (server bug): {f.get('problems')}")
    return out


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:100] if lines else "failed"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    for row in rows:
        out.append("  ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths,
                                                                                              strict=True))))
    return "\n".join(out)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _strip_samples(result: dict[str, Any]) -> dict[str, Any]:
    series = result.get("series")
    if not series:
        return result
    return {**result, "series": {k: v for k, v in series.items() if k not in SAMPLE_SERIES}}


def plot(directory: Path, scenario: str, results: dict[str, dict[str, Any]]) -> list[str]:
    """PNG plots for the run; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    ok = {n: r for n, r in results.items() if "failed" not in r}
    samples = {n: {k: r.get("series", {}).get(k) or [] for k in SAMPLE_SERIES} for n, r in ok.items()}
    if any(any(s.values()) for s in samples.values()):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        every = [v for s in samples.values() for vs in s.values() for v in vs if v > 0]
        lo, hi = max(min(every), 1e-3), max(every)
        bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 30
        for name, series in samples.items():
            for key, values in series.items():
                if values:
                    label = ok[name].get("target", name) if scenario == "cluster" else name
                    ax.hist(values, bins=bins, histtype="step", label=f"{label} {key.removesuffix('_ms')}")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("samples")
        ax.set_title(f"{scenario}: latency distribution")
        ax.legend()
        files.append(_save(fig, directory / "latency.png"))
    fanouts = {n: r for n, r in ok.items() if "deliveries_per_s" in r.get("series", {})}
    if scenario in ("fanout", "cluster") and fanouts:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in fanouts.items():
            rates = r["series"]["deliveries_per_s"]
            step = r["series"]["bucket_s"]
            label = r.get("target", name) if scenario == "cluster" else name
            ax.plot([(i + 0.5) * step for i in range(len(rates))], rates, marker=".", label=f"{label} delivered/s")
            ax.axvspan(*r["series"]["window_s"], alpha=0.08)
        ax.set_xlabel("time (s); shaded: measured window")
        ax.set_ylabel("messages / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{scenario}: throughput over time")
        ax.legend()
        files.append(_save(fig, directory / "throughput.png"))
    failover = ok.get("failover") if scenario == "cluster" else None
    if failover and failover.get("series", {}).get("acks_per_s"):
        series = failover["series"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        rates, step = series["acks_per_s"], series["bucket_s"]
        ax.plot([(i + 0.5) * step for i in range(len(rates))], rates, label="increments acked/s (all devices)")
        kill = series["kill_s"]
        ax.axvline(kill, color="red", linestyle="--", label=f"kill -9 {failover['victim']}")
        for key, marker, label in (("writable_s", "|", "session writable again"),
                                   ("acked_again_s", "x", "session's devices acked again")):
            points = series.get(key) or []
            if points:
                ax.scatter([kill + t for t in points], [0] * len(points), marker=marker, label=label, zorder=3)
        ax.set_xlabel("time since the load started (s)")
        ax.set_ylabel("acks / s")
        ax.set_ylim(bottom=-max(rates or [1]) * 0.05)
        ax.set_title("cluster: failover under load")
        ax.legend()
        files.append(_save(fig, directory / "failover.png"))
    soaks = {n: r for n, r in ok.items() if r.get("series", {}).get("rss")}
    if scenario == "soak" and soaks:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in soaks.items():
            points = r["series"]["rss"]
            ax.plot([p[0] / 60 for p in points], [p[1] for p in points], marker=".", label=f"{name} RSS")
            ax.axvspan(0, r["series"]["warmup_s"] / 60, alpha=0.08)
            ax.set_title(f"soak: server RSS over time (slope after warm-up {r['rss_slope_mb_per_h']:+.2f} MB/h)")
        ax.set_xlabel("minutes; shaded: warm-up")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.legend()
        files.append(_save(fig, directory / "rss.png"))
    if scenario == "saturation" and ok:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name, r in ok.items():
            offered = [s["offered_deliveries_per_s"] for s in r["steps"]]
            left.plot(offered, [s["delivered_per_s"] for s in r["steps"]], marker="o", label=name)
            right.plot(offered, [s["delivery"]["p99_ms"] for s in r["steps"]], marker="o", label=name)
        left.set_xlabel("offered deliveries/s")
        left.set_ylabel("delivered msgs/s")
        right.set_xlabel("offered deliveries/s")
        right.set_ylabel("delivery p99 (ms)")
        right.set_yscale("log")
        left.legend()
        fig.suptitle("saturation: throughput and p99 by offered load")
        files.append(_save(fig, directory / "throughput.png"))
    return files


def _steps_tables(results: dict[str, dict[str, Any]]) -> list[str]:
    out: list[str] = []
    header = ["R", "offered deliveries/s", "delivered/s", "delivered/offered", "p99 ms", "CPU µs/msg", "generator",
              "held"]
    for name, r in results.items():
        rows = [[f"{s['rate']:g}", f"{s['offered_deliveries_per_s']:,.0f}", f"{s['delivered_per_s']:,.0f}",
                 f"{s['delivered_ratio']:.1%}", f"{s['delivery']['p99_ms']:.1f}", f"{s['server_cpu_per_msg_us']:.1f}",
                 _gen(s), "yes" if s["sustained"] else "no"] for s in r.get("steps", [])]
        if rows:
            out += ["", f"### steps: {name}", "", markdown_table(header, rows)]
    return out


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write(directory: Path, payload: dict[str, Any]) -> str:
    """Write results.json, the plots and report.md; return the terminal table."""
    directory.mkdir(parents=True, exist_ok=True)
    scenario, results = payload["scenario"], payload["results"]
    tables = cluster_tables(results) if scenario == "cluster" else [table_rows(scenario, results)]
    slim = {**payload, "results": {n: _strip_samples(r) for n, r in results.items()}}
    (directory / "results.json").write_bytes(orjson.dumps(slim, option=orjson.OPT_INDENT_2,
                                                          default=str))
    images = plot(directory, scenario, results)
    steps = _steps_tables(results) if scenario == "saturation" else []
    notes = [f"- **generator CPU saturated** for `{n}`: its numbers are a floor, not the server's limit"
             for n, r in results.items() if r.get("generator_saturated")]
    notes += [f"- other processes used {r['other_processes_cpu_util']:.2f} cores during the `{n}` window: "
              "latency and throughput are noisy; CPU per message is the robust figure"
              for n, r in results.items() if (r.get("other_processes_cpu_util") or 0) > 0.2]
    notes += [f"- **{line}**" for line in correctness_failures(payload)]
    notes += [f"- {line}" for line in cluster_warnings(payload)]
    notes += [f"- failover: `{line}`" for line in results.get("failover", {}).get("problems", [])[:10]]
    md = [f"# bench: {scenario}", "", f"`{payload['command']}`", "",
          f"{payload['started']} · {payload['machine']['cores']} cores · pinning: {payload['machine']['pinning']}",
          *(line for header, rows in tables for line in ("", markdown_table(header, rows))), "", *notes, *steps,
          "", *(f"![{i}]({i})" for i in images), ""]
    (directory / "report.md").write_text("\n".join(md))
    return "\n\n".join(text_table(header, rows) for header, rows in tables)
