"""deploy/loki/promtail.yml: its pipeline fits the lines a real sessiond writes, and its labels stay bounded.

No promtail (or Alloy) binary is packaged for Debian and nothing may be downloaded at test time, so the file is
checked in Python: its structure, then its json -> template -> labels / structured_metadata -> timestamp stages are
applied, with promtail's semantics for the simple forms used here, to every line a real `sessiond serve` process
(SESSIOND_LOG_FORMAT=json) wrote during some traffic and a SIGTERM.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import yaml
from trio_websocket import ConnectionRejected, open_websocket_url

from api.auth import Authenticator
from api.settings import load_settings
from tests.integration.harness import SECRET
from tests.support.pods import Pods

ROOT = Path(__file__).resolve().parents[2]
PROMTAIL = ROOT / "deploy" / "loki" / "promtail.yml"

BOUNDED_LABELS = {"app", "namespace", "pod", "container", "level"}
NEVER_LABELS = {"session", "device", "user", "event", "error", "origin"}  # unbounded ids and free text
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def config() -> dict[str, Any]:
    return dict(yaml.safe_load(PROMTAIL.read_text()))


def stages(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pipeline of the sessiond job, by stage kind (each kind is used once here)."""
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "sessiond"]
    found: dict[str, Any] = {}
    for stage in job["pipeline_stages"]:
        ((kind, body),) = stage.items()
        assert kind not in found, f"stage {kind} twice: extend the checks below first"
        found[kind] = body or {}
    return found


def label_problems(cfg: dict[str, Any]) -> list[str]:
    """Labels outside the bounded set, from the labels stage or from relabelling (static or discovered)."""
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "sessiond"]
    names = set(stages(cfg).get("labels", {}))
    relabels = job.get("relabel_configs", [])
    names |= {r["target_label"] for r in relabels if not r.get("target_label", "__").startswith("__")}
    problems = [
        f"relabel action {r['action']} copies labels wholesale" for r in relabels if r.get("action") == "labelmap"
    ]
    for static in job.get("static_configs", []):
        names |= set(static.get("labels", {}))
    problems += [f"label {n!r} is not in the bounded set" for n in sorted(names - BOUNDED_LABELS)]
    problems += [f"label {n!r} is unbounded" for n in sorted(names & NEVER_LABELS)]
    return problems


def allowed_levels(template: str) -> set[str]:
    match = re.search(r'eq \.Value((?: "[^"]+")+) \}\}', template)
    assert match, f"unexpected level template {template!r}"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def test_promtail_file_has_the_pipeline_and_only_bounded_labels() -> None:
    cfg = config()
    assert cfg["clients"][0]["url"].endswith("/loki/api/v1/push")
    found = stages(cfg)
    assert list(found) == ["cri", "json", "template", "labels", "structured_metadata", "timestamp"]
    assert label_problems(cfg) == []
    assert {"session", "device"} <= set(found["structured_metadata"])
    assert found["template"]["source"] == "level" and "level" in found["labels"]
    assert allowed_levels(found["template"]["template"]) == {"debug", "info", "warning", "error", "critical"}


def test_the_label_check_catches_a_session_label() -> None:
    cfg = copy.deepcopy(config())
    (job,) = cfg["scrape_configs"]
    for stage in job["pipeline_stages"]:
        if "labels" in stage:
            stage["labels"]["session"] = None
    assert label_problems(cfg) == ["label 'session' is not in the bounded set", "label 'session' is unbounded"]


# ---- against a real sessiond ------------------------------------------------------------------------------------


async def _traffic(pods: Pods) -> None:
    (pod,) = await pods.start(1)
    token = Authenticator.from_settings(load_settings({}, jwt_secret=SECRET, data_dir=pods.tmp)).mint("alice")
    async with httpx.AsyncClient(base_url=pod.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        created = await http.post("/v1/sessions", json={"name": "logs", "state": {"n": 0}})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
    origin = [(b"Origin", b"https://app.example")]
    async with open_websocket_url(pod.ws_url, extra_headers=origin) as ws:
        await ws.send_message(orjson.dumps({"t": "hello", "token": token, "session": sid, "device": "phone"}).decode())
        assert orjson.loads(await ws.get_message())["t"] == "welcome"
        await ws.send_message(orjson.dumps({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}]}).decode())
        assert orjson.loads(await ws.get_message())["t"] == "ack"
    with pytest.raises(ConnectionRejected):  # a warning line: the origin is not allowed
        async with open_websocket_url(pod.ws_url, extra_headers=[(b"Origin", b"https://evil.example")]):
            pass
    # The session passivates once idle (an info line with its session); wait for it with a deadline.
    with trio.fail_after(10):
        while b'"passivated"' not in pod.log.read_bytes():
            await trio.sleep(0.05)
    assert await pods.terminate(pod) == 0


@pytest.fixture(scope="module")
def real_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("loki")
    env = {"SESSIOND_PASSIVATE_AFTER_S": "0.3", "SESSIOND_ALLOWED_ORIGINS": "https://app.example"}
    with Pods(tmp, env) as pods:
        trio.run(_traffic, pods)
        lines = [line for pod in pods.pods.values() for line in pod.log.read_text().splitlines()]
    assert len(lines) >= 5
    return lines


def _extract(lines: list[str], expressions: dict[str, str]) -> list[dict[str, Any]]:
    """promtail's json stage for plain-key expressions (a bare identifier is a JMESPath field lookup)."""
    extracted = []
    for line in lines:
        obj = orjson.loads(line)  # a line the json stage cannot parse would lose its level and timestamp
        assert isinstance(obj, dict), line
        extracted.append({name: obj[path] for name, path in expressions.items() if path in obj})
    return extracted


def test_every_real_line_is_json_with_the_fields_the_pipeline_extracts(real_lines: list[str]) -> None:
    found = stages(config())
    expressions: dict[str, str] = found["json"]["expressions"]
    assert all(IDENTIFIER.fullmatch(path) for path in expressions.values()), "only plain keys are emulated here"
    extracted = _extract(real_lines, expressions)
    # Fields every line needs: the label source and the timestamp (and the event, the line's message).
    for needed in {"level", found["timestamp"]["source"], "event", "logger"}:
        missing = [line for line, fields in zip(real_lines, extracted, strict=True) if needed not in fields]
        assert not missing, f"{needed!r} missing from: {missing[:3]}"
    # Every other extracted field occurs in real lines (a renamed key in api/logs.py would make it vanish).
    for name in expressions:
        assert any(name in fields for fields in extracted), f"no real line has {expressions[name]!r}"


def test_real_lines_give_bounded_labels_and_parseable_timestamps(real_lines: list[str]) -> None:
    found = stages(config())
    extracted = _extract(real_lines, found["json"]["expressions"])
    levels = allowed_levels(found["template"]["template"])
    seen_levels = {fields["level"] for fields in extracted}
    assert seen_levels <= levels, f"levels promtail would file as 'other': {seen_levels - levels}"
    assert {"info", "warning"} <= seen_levels
    for fields in extracted:
        stamp = fields[found["timestamp"]["source"]]
        assert found["timestamp"]["format"] == "RFC3339Nano"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", stamp), stamp
        assert datetime.fromisoformat(stamp).tzinfo is not None
    # The unbounded ids the pipeline keeps as metadata really are per-session/per-device values in real lines.
    metadata = set(found["structured_metadata"])
    assert {"session", "device"} <= metadata
    assert any("session" in f for f in extracted) and any("device" in f for f in extracted)
