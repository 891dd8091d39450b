"""deploy/prometheus: the rules load in promtool, their unit tests pass, every alert is shown firing and not firing,
the unit tests catch a broken threshold, and the example scrape configuration is valid.

The metric names the rules use are checked against a live sessiond in test_grafana.py (with the dashboard's).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "sessiond.rules.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the real promtool (scripts/tools.sh installs it; missing means a failure, not a skip)."""
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run scripts/tools.sh ensure (Debian package prometheus)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass() -> None:
    assert len(UNIT_TESTS) >= 4
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_every_alert_has_severity_annotations_and_a_runbook() -> None:
    alerts = alert_rules()
    assert len(alerts) >= 15
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alerts:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        notes = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert notes.get(key, "").strip(), f"{rule['alert']} lacks annotation {key}"
    severities = {a["labels"]["severity"] for a in alerts}
    assert severities == {"page", "ticket"}


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alert_rules()}
    assert names - firing == set(), f"alerts never shown firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never shown quiet: {sorted(names - quiet)}"
    assert (firing | quiet) - names == set(), f"tests name unknown alerts: {sorted((firing | quiet) - names)}"


def test_unit_tests_catch_a_broken_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: with the ack-latency threshold raised 100x they must."""
    rules = tmp_path / "rules"
    rules.mkdir()
    text = RULES.read_text()
    assert "instance:sessiond_ack_latency_seconds:p99_5m > 0.25" in text
    (rules / RULES.name).write_text(text.replace("p99_5m > 0.25", "p99_5m > 25"))
    shutil.copytree(PROM / "tests", tmp_path / "tests")
    result = promtool("test", "rules", "tests/latency.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "SessiondAckLatencyHigh" in result.stdout + result.stderr


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    config = PROM / "prometheus.yml"
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    jobs = [job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]]
    assert "sessiond" in jobs  # the job every rule and panel selects on


def test_observability_yaml_passes_yamllint() -> None:
    """deploy/.yamllint.yml covers every YAML file under deploy/; these are the monitoring ones."""
    dirs = [ROOT / "deploy" / d for d in ("prometheus", "alertmanager", "grafana", "loki")]
    yamllint = Path(sys.executable).with_name("yamllint")
    assert yamllint.exists(), "yamllint is missing: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(yamllint), "--strict", "-c", str(ROOT / "deploy" / ".yamllint.yml"), *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
