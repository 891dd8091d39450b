"""deploy/alertmanager: amtool accepts the configuration, routes page and ticket alerts to their receivers, and a
real alertmanager started with it delivers them there and holds back the alerts its inhibit rules name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.server import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is missing: run scripts/tools.sh ensure (Debian package prometheus-alertmanager)"
    return exe


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("amtool"), *args], capture_output=True, text=True, timeout=30)


def test_config_passes_amtool_check() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "4 inhibit rules" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=page", "alertname=SessiondStorageUnavailable", "job=sessiond"], "pager"),
        (["severity=ticket", "alertname=SessiondSlowConsumersHigh", "job=sessiond"], "tickets"),
        (["alertname=SomethingWithoutSeverity"], "tickets"),  # never lost: the default receiver
    ],
)
def test_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = amtool("config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_a_page_does_not_route_to_tickets() -> None:
    """The route test can fail: amtool says so when the receiver is not the expected one."""
    result = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", "--verify.receivers=tickets", "severity=page"
    )
    assert result.returncode != 0
    assert result.stdout.strip().splitlines()[0] == "pager"


class _Sink:
    """A webhook receiver on 127.0.0.1 that keeps every notification alertmanager posts."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts_by_receiver(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for note in list(self.notifications):
            names = {a["labels"]["alertname"] for a in note["alerts"] if a["status"] == "firing"}
            seen.setdefault(note["receiver"], set()).update(names)
        return seen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[_Sink]:
    s = _Sink()
    yield s
    s.close()


def _local_copy(tmp: Path, sink: _Sink) -> Path:
    """The configuration under test with only its placeholder URLs pointed at the sink and its waits shortened."""
    config = yaml.safe_load(CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            assert ".example.invalid/" in hook["url"]
            hook["url"] = f"http://127.0.0.1:{sink.port}/{receiver['name']}"
    for route in [config["route"], *config["route"]["routes"]]:
        route["group_wait"] = "1s"
        route["group_interval"] = "1s"
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": name, "severity": severity, "job": "sessiond", **labels},
        "annotations": {"summary": name},
    }


def test_real_alertmanager_delivers_pages_and_tickets_and_inhibits(tmp_path: Path, sink: _Sink) -> None:
    port = free_port()
    config = _local_copy(tmp_path, sink)
    log = (tmp_path / "alertmanager.log").open("wb")
    proc = subprocess.Popen(
        [
            tool("prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: a single instance
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/api/v2"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            try:
                if httpx.get(f"{base}/status", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "alertmanager did not start"
            time.sleep(0.1)

        alerts = [
            _alert("SessiondStorageUnavailable", "page", instance="pod-a", backend="redis"),
            _alert("SessiondAckLatencyHigh", "page", instance="pod-a"),  # inhibited by the storage outage
            _alert("SessiondPodCpuSaturated", "ticket", instance="pod-b"),
            _alert("SessiondLeasesLost", "ticket", instance="pod-c"),
        ]
        assert httpx.post(f"{base}/alerts", json=alerts, timeout=5).status_code == 200

        deadline = time.monotonic() + 15
        while sink.alerts_by_receiver() != {
            "pager": {"SessiondStorageUnavailable"},
            "tickets": {"SessiondPodCpuSaturated", "SessiondLeasesLost"},
        }:
            assert time.monotonic() < deadline, f"notifications so far: {sink.alerts_by_receiver()}"
            time.sleep(0.1)

        state = {a["labels"]["alertname"]: a["status"] for a in httpx.get(f"{base}/alerts", timeout=5).json()}
        assert state["SessiondAckLatencyHigh"]["state"] == "suppressed"
        assert state["SessiondAckLatencyHigh"]["inhibitedBy"]
        assert state["SessiondStorageUnavailable"]["state"] == "active"
        assert state["SessiondLeasesLost"]["state"] == "active"  # no renewal errors on pod-c: not inhibited
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
