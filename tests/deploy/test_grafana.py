"""deploy/grafana: the dashboard is well formed, and every PromQL expression in it and in the Prometheus rules parses
in promtool and names only metrics (and labels) that a live sessiond exports.

The live check starts a real in-process sessiond (Redis durability, the production shape), sends a little traffic so
labelled series exist, scrapes /metrics, lints the scrape with `promtool check metrics`, and compares. Expressions
are walked with promql-parser (the Rust PromQL parser's Python binding); promtool stays the syntax authority.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import promql_parser as pq
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Harness, raw_device, start_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sessiond-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "sessiond.rules.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

# Concrete values for the dashboard's template variables (what Grafana substitutes before querying).
VARIABLES = {"instance": ".*", "__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
# Series Prometheus makes itself, not the application.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
TARGET_LABELS = {"job", "instance"}  # added by the scrape (deploy/prometheus/prometheus.yml)
# Referenced families that have no series until something rare happens, so their labels cannot be seen in the scrape
# of a short healthy run (their names still must be declared there). Keep this list short and explained.
NO_SERIES_WITHOUT_INCIDENT = {
    "sessiond_slow_consumer_total",  # a device that cannot keep up (its `action` label is checked by the unit tests)
}


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: panel targets, annotations, and variable selectors."""
    dash = dashboard()
    found = []
    for panel in _walk_panels(dash["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"])))
    for note in dash["annotations"]["list"]:
        if "expr" in note:
            found.append((f"annotation {note['name']!r}", substitute(note["expr"])))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: only label_values(selector, label) is used here, got {query!r}"
            found.append((f"variable {var['name']!r}", substitute(match.group(1))))
    return found


def rules() -> list[dict[str, Any]]:
    return [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


# ---- walking PromQL ------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def usage(expr: str) -> Usage:
    """Metric names and label names (matchers, by/without, on/ignoring) an expression uses."""
    found = Usage()

    def visit(node: Any) -> None:
        if isinstance(node, pq.VectorSelector):
            if node.name:
                found.metrics.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    found.metrics.add(matcher.value)
                else:
                    found.labels.add(matcher.name)
        elif isinstance(node, pq.MatrixSelector):
            visit(node.vector_selector)
        elif isinstance(node, pq.AggregateExpr):
            if node.modifier is not None:
                found.labels.update(node.modifier.labels)
            visit(node.expr)
            if node.param is not None:
                visit(node.param)
        elif isinstance(node, pq.BinaryExpr):
            matching = node.modifier.matching if node.modifier is not None else None
            if matching is not None:
                found.labels.update(matching.labels)
            visit(node.lhs)
            visit(node.rhs)
        elif isinstance(node, pq.Call):
            for arg in node.args:
                visit(arg)
        elif isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
            visit(node.expr)

    visit(pq.parse(expr))
    return found


def test_usage_sees_names_and_labels() -> None:
    """The walker itself: a missed node type would silently let unknown names through."""
    got = usage(
        'histogram_quantile(0.9, sum by (le, pod) (rate(a_bucket{x="1"}[5m]))) / on (job) -(b) '
        "and max_over_time((c)[5m:1m]) > bool sum without (y) (d)"
    )
    assert got.metrics == {"a_bucket", "b", "c", "d"}
    assert got.labels == {"le", "pod", "x", "job", "y"}


# ---- the dashboard's shape ----------------------------------------------------------------------------------------


def test_dashboard_uses_the_datasource_variable_and_a_pod_picker() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    pod = variables["instance"]
    assert pod["type"] == "query" and pod["includeAll"] and pod["allValue"] == ".*"
    ids = [p["id"] for p in _walk_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _walk_panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            cluster_wide = target["expr"].startswith(("job:", "count(up{"))
            assert 'instance=~"$instance"' in target["expr"] or cluster_wide, (
                f"{panel['title']}: every per-pod query follows the pod picker"
            )


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needed in (
        "sessiond_ws_connections",
        "instance:sessiond_changes:rate1m",
        "histogram_quantile(0.99, sum by (le) (rate(sessiond_ack_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(sessiond_delivery_latency_seconds_bucket",
        "sum by (code) (rate(sessiond_rest_errors_total",
        "sum by (code) (rate(sessiond_ws_errors_total",
        "sessiond_slow_consumer_total",
        "sessiond_storage_journal_append_seconds_bucket",
        "process_cpu",
    ):
        assert needed in exprs, needed
    table = next(p for p in _walk_panels(dashboard()["panels"]) if p["type"] == "table")
    hot = {next(iter(usage(substitute(t["expr"])).metrics)) for t in table["targets"]}
    assert hot == {
        "sessiond_hot_actor_changes_per_second",
        "sessiond_hot_actor_devices",
        "sessiond_hot_actor_mailbox_depth",
        "sessiond_hot_actor_state_bytes",
    }
    assert all(t.get("instant") and t.get("format") == "table" for t in table["targets"])


def test_provisioning_points_at_the_dashboard_and_the_datasources() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "sessiond.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "sessiond.yml").read_text())
    kinds = {s["type"] for s in sources["datasources"]}
    assert kinds == {"prometheus", "loki"}
    assert sum(1 for s in sources["datasources"] if s.get("isDefault")) == 1


# ---- every expression parses -------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run scripts/tools.sh ensure (Debian package prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def _as_recording_rules(exprs: list[tuple[str, str]], path: Path) -> Path:
    rules_ = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules_}]}))
    return path


def test_every_expression_parses_in_promtool(tmp_path: Path) -> None:
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) > 60
    result = _promtool("check", "rules", str(_as_recording_rules(exprs, tmp_path / "exprs.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    # ... and the check can fail: a broken expression is refused.
    broken = _as_recording_rules([("broken", "sum by (le (rate(x[5m]))")], tmp_path / "broken.yml")
    assert _promtool("check", "rules", str(broken)).returncode != 0


# ---- every metric exists on a live sessiond -----------------------------------------------------------------------


async def _traffic(h: Harness) -> None:
    """A little of everything: REST 2xx and 4xx, two devices, ops, acks, patches, refused ops, a bad frame, a replaced
    device and a refused handshake."""
    sid = await h.create_session(state={"n": 0, "s": "text"})
    async with h.rest() as http:
        assert (await http.get("/v1/sessions/s_nosuchsession")).status_code == 404
        assert (await http.get(f"/v1/sessions/{sid}")).status_code == 200
    async with raw_device(h, sid, "phone") as phone, raw_device(h, sid, "laptop") as laptop:
        for i in range(1, 21):
            await phone.send({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]})
            await phone.recv_type("ack")
            await laptop.recv_type("patch")
        await phone.send({"t": "op", "id": 99, "ops": [{"op": "inc", "path": "/s"}]})  # inc of a string
        assert (await phone.recv_type("error"))["code"] == "invalid_op"
        async with raw_device(h, sid, "laptop"):  # the same device again: the old connection is replaced (4009)
            assert await laptop.closed_code() == 4009
    async with raw_device(h, sid, "tablet") as tablet:
        await tablet.send({"t": "no-such-frame"})
        assert (await tablet.recv_type("error"))["code"] == "bad_frame"
    async with raw_device(h, sid, "intruder", token="not-a-jwt", expect_welcome=False) as intruder:
        assert await intruder.closed_code() == 4001  # refused handshake: ws_connects and ws_closes by code


@dataclass
class Scrape:
    text: str
    sample_names: set[str]
    declared: dict[str, str]  # family name as on its TYPE line -> type
    labels: dict[str, set[str]]  # sample name -> label names seen
    before: str  # the scrape taken before the traffic


# Samples the scrape must hold before it is taken: they appear a little after the traffic (checkpoints, passivation).
READY_WHEN = ("sessiond_checkpoint_seconds_count{", "sessiond_actor_passivations_total{")


def parse_scrape(text: str, before: str = "") -> Scrape:
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Scrape(text, names, declared, labels, before)


def valid_names(scrape: Scrape) -> set[str]:
    """Every series name the exposition can produce, with or without samples right now."""
    names = set(scrape.sample_names)
    for name, kind in scrape.declared.items():
        if kind in ("histogram", "gaugehistogram"):
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif kind == "summary":
            names.update({name, f"{name}_sum", f"{name}_count"})
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.add(name)
    return names


def family_of(series: str, scrape: Scrape) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and scrape.declared.get(base) in ("histogram", "summary", "gaugehistogram"):
            return base
    return series


async def _serve_and_scrape(data_dir: Path, redis_url: str, redis_prefix: str) -> tuple[str, str]:
    async with trio.open_nursery() as nursery:
        h = await start_server(
            nursery,
            data_dir,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            checkpoint_every_s=0.2,
            passivate_after_s=0.5,
        )
        try:
            async with httpx.AsyncClient(base_url=h.http_url, timeout=5) as http:
                before = (await http.get("/metrics")).text  # the registry is per process: compare, not count
            await _traffic(h)
            # A second session stays busy with a device connected, so the hot-actor gauges have a live actor to show,
            # while the first goes idle: wait (with a deadline) for its checkpoint and its passivation to be counted.
            busy = await h.create_session(state={"n": 0})
            async with raw_device(h, busy, "kiosk") as kiosk, httpx.AsyncClient(base_url=h.http_url, timeout=5) as http:
                with trio.fail_after(15):
                    for i in itertools.count(1):
                        await kiosk.send({"t": "op", "id": i, "ops": [{"op": "inc", "path": "/n"}]})
                        await kiosk.recv_type("ack")
                        text = (await http.get("/metrics")).text
                        if all(needle in text for needle in READY_WHEN):
                            return before, text
                        await trio.sleep(0.1)
            raise AssertionError("unreachable")
        finally:
            h.running.stop()


@pytest.fixture(scope="module")
def live_scrape(tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_prefix: str) -> Scrape:
    """One real sessiond, one round of traffic, one scrape for every test of this module (sync on purpose: a
    module-scoped fixture runs its own trio loop, as pytest-trio's async fixtures are per test)."""
    data_dir = tmp_path_factory.mktemp("live") / "data"
    before, after = trio.run(_serve_and_scrape, data_dir, redis_url, f"{redis_prefix}{secrets.token_hex(3)}:")
    return parse_scrape(after, before)


async def test_the_live_scrape_passes_promtool_check_metrics(live_scrape: Scrape) -> None:
    """promtool's exposition linter on a real scrape. Any finding fails, warnings included: there are none today,
    and each one (a counter without _total, a missing HELP, a non-base unit) would be a naming mistake that dashboards
    and rules then copy; fix the metric rather than relax this."""
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run scripts/tools.sh ensure (Debian package prometheus)"
    result = await trio.run_process(
        [exe, "check", "metrics"],
        stdin=live_scrape.text.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not report.strip(), report


@pytest.mark.parametrize("source", ["dashboard", "rules"])
async def test_every_metric_and_label_used_exists_on_a_live_sessiond(live_scrape: Scrape, source: str) -> None:
    scrape = live_scrape
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    recorded = recorded_names()
    names = valid_names(scrape)
    unknown: list[str] = []
    bad_labels: list[str] = []
    for where, expr in exprs:
        used = usage(expr)
        for metric in used.metrics:
            if metric in PROMETHEUS_SERIES or metric in recorded:
                continue
            if metric not in names:
                unknown.append(f"{where}: {metric}")
        # Labels: each must exist on one of the application series the expression reads, or be a target label.
        app_series = [m for m in used.metrics if m not in PROMETHEUS_SERIES and m not in recorded and m in names]
        if not app_series or any(family_of(m, scrape) in NO_SERIES_WITHOUT_INCIDENT for m in app_series):
            continue
        seen = set().union(*(scrape.labels.get(m, set()) for m in app_series))
        missing_series = [m for m in app_series if m not in scrape.sample_names]
        assert not missing_series, (
            f"{where}: {missing_series} have no series after the traffic; make _traffic produce them, or list the "
            "family in NO_SERIES_WITHOUT_INCIDENT with the reason"
        )
        for label in used.labels - TARGET_LABELS - seen:
            bad_labels.append(f"{where}: label {label!r} not on {sorted(app_series)}")
    assert not unknown, "metrics not exported by sessiond:\n" + "\n".join(sorted(unknown))
    assert not bad_labels, "labels not exported by sessiond:\n" + "\n".join(sorted(bad_labels))


async def test_only_the_hot_actor_gauges_carry_a_session_label(live_scrape: Scrape) -> None:
    """Bounded cardinality: per-session labels only on the top-K hot-actor gauges, never a device label."""
    for name, labels in live_scrape.labels.items():
        assert "device" not in labels, name
        if "session" in labels:
            assert name.startswith("sessiond_hot_actor_"), name


async def test_rest_requests_are_counted_by_status_class(live_scrape: Scrape) -> None:
    """The error-ratio denominator: the traffic made 3 API calls answered 2xx and one 404; the scrapes and probes
    made meanwhile are not counted."""

    def values(text: str) -> dict[str, float]:
        pattern = r'^sessiond_rest_requests_total\{status="(\w+)"\} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}

    before, after = values(live_scrape.before), values(live_scrape.text)
    delta = {status: after[status] - before[status] for status in after}
    assert delta == {"2xx": 3, "4xx": 1, "5xx": 0}, delta
