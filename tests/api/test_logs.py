"""Structured logging: JSON lines with bound context, stdlib routing, and no tokens or secrets in the output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from api.auth import Authenticator
from api.logs import REDACTED, configure_logging, get_logger, redact, reset_logging
from api.settings import Settings

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0"
    ".c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
)
ALG_NONE_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."

module_logger = get_logger("tests.module")  # created before any configure_logging call


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    reset_logging()


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_line_with_context_vars(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(session="s-1", device="d-9", pod="pod-a")
    get_logger("sessiond.test").info("patch applied", version=7)
    structlog.contextvars.clear_contextvars()
    get_logger("sessiond.test").info("after clear")
    first, second = lines(out)
    assert first["event"] == "patch applied" and first["version"] == 7
    assert (first["session"], first["device"], first["pod"]) == ("s-1", "d-9", "pod-a")
    assert first["level"] == "info" and first["logger"] == "sessiond.test"
    assert datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert "session" not in second


def test_logger_created_before_configure_follows_it(out: io.StringIO) -> None:
    module_logger.warning("late configured")
    (entry,) = lines(out)
    assert entry["logger"] == "tests.module" and entry["level"] == "warning"


def test_level_filters(out: io.StringIO) -> None:
    configure_logging("json", level="warning", stream=out)
    log = get_logger("x")
    log.debug("d")
    log.info("i")
    log.error("e")
    assert [e["event"] for e in lines(out)] == ["e"]


@pytest.mark.parametrize("key", ["token", "Token", "AUTHORIZATION", "secret", "password", "jwt_secret", "access_token"])
def test_sensitive_keys_redacted(out: io.StringIO, key: str) -> None:
    get_logger("x").info("login", **{key: "hunter2-value"}, user="alice")
    (entry,) = lines(out)
    assert entry[key] == REDACTED and entry["user"] == "alice"
    assert "hunter2-value" not in out.getvalue()


def test_nested_keys_redacted(out: io.StringIO) -> None:
    request: dict[str, Any] = {"path": "/v1/sessions", "headers": {"Authorization": "Basic abc", "Accept": "json"}}
    get_logger("x").info("request", request=request, items=[{"password": "p4ss"}, "ok"], max_token_bytes=4096)
    (entry,) = lines(out)
    assert entry["request"] == {"path": "/v1/sessions", "headers": {"Authorization": REDACTED, "Accept": "json"}}
    assert entry["items"] == [{"password": REDACTED}, "ok"]
    assert entry["max_token_bytes"] == 4096
    assert request["headers"]["Authorization"] == "Basic abc"  # the caller's dict is not mutated


def test_jwt_pattern_redacted_in_any_string(out: io.StringIO) -> None:
    log = get_logger("x")
    log.info(f"hello frame with token {JWT} from device")
    log.info("upgrade", header=f"Bearer {JWT}", note=f"prefix:{ALG_NONE_JWT} suffix", more=[f"x {JWT}"])
    log.info("bearer", raw="Authorization: Bearer opaque-token-123, next")
    text = out.getvalue()
    assert JWT not in text and ALG_NONE_JWT not in text and "opaque-token-123" not in text
    first, second, third = lines(out)
    assert first["event"] == f"hello frame with token {REDACTED} from device"
    assert second["note"] == f"prefix:{REDACTED} suffix"
    assert second["more"] == [f"x {REDACTED}"]
    assert "Bearer" in second["header"] and "Bearer" in third["raw"]


def test_redact_leaves_ordinary_values_alone() -> None:
    event = {"event": "eyJ is just text", "n": 3, "tags": ("a", "b"), "sessions": {"s1": {"v": 1}}}
    assert redact(None, "info", dict(event)) == {**event, "tags": ["a", "b"]}


def test_exception_formatted_and_redacted(out: io.StringIO) -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        get_logger("x").exception("handler crashed")
    (entry,) = lines(out)
    assert entry["level"] == "error"
    assert "Traceback" in entry["exception"] and "ValueError: bad token [redacted]" in entry["exception"]
    assert JWT not in out.getvalue()


def test_stdlib_routed_through_same_pipeline(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(pod="pod-a")
    logging.getLogger("hypercorn.error").warning("client sent %s", JWT)
    logging.getLogger("trio-websocket").info("chatty detail")
    structlog.contextvars.clear_contextvars()
    (entry,) = lines(out)
    assert entry["logger"] == "hypercorn.error" and entry["level"] == "warning"
    assert entry["event"] == f"client sent {REDACTED}" and entry["pod"] == "pod-a"
    assert "timestamp" in entry


def test_stdlib_level_configurable() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream, stdlib_level="info")
    logging.getLogger("trio-websocket").info("now visible")
    assert [e["event"] for e in lines(stream)] == ["now visible"]


def test_reconfigure_switches_stream_and_does_not_duplicate() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)
    get_logger("x").warning("structlog")
    logging.getLogger("hypercorn.error").warning("stdlib")
    assert first.getvalue() == ""
    assert [e["event"] for e in lines(second)] == ["structlog", "stdlib"]
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_sessiond_handler", False)]
    assert len(ours) == 1


def test_renderer_choice() -> None:
    piped = io.StringIO()
    configure_logging(None, stream=piped)
    get_logger("x").info("auto", token="t0k")
    assert json.loads(piped.getvalue())["token"] == REDACTED

    tty = TTYStream()
    configure_logging(None, stream=tty)
    get_logger("x").info("auto on tty", token="t0k")
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue())
    assert "auto on tty" in tty.getvalue() and "t0k" not in tty.getvalue()

    console = io.StringIO()
    configure_logging("console", stream=console)
    get_logger("x").info("forced console", secret="s3cr3t", note=JWT)
    text = console.getvalue()
    assert "forced console" in text and "s3cr3t" not in text and JWT not in text
    assert "\x1b[" not in text  # no colours when not on a TTY


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", stream=io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("json", level="loud", stream=io.StringIO())


def test_auth_dev_mode_warning_is_logged_without_secret(out: io.StringIO, tmp_path: Path) -> None:
    Authenticator.from_settings(Settings(data_dir=tmp_path))
    secret = (tmp_path / "jwt-secret").read_text().strip()
    entries = lines(out)
    assert any(e["level"] == "warning" and "dev mode" in e["event"] and e["logger"] == "sessiond.auth" for e in entries)
    assert secret not in out.getvalue()
