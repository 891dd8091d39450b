"""Structured logging (DESIGN §9): one structlog pipeline for our loggers and stdlib ones (hypercorn, ...).

JSON when not on a TTY (containers, log shippers), console otherwise. Context bound with
`structlog.contextvars.bind_contextvars` (session, device, pod) lands on every line. A redaction step keeps
tokens and secrets out of the logs, by key name and by the shape of a JWT inside any string.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import IO, Any, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

REDACTED = "[redacted]"
_SENSITIVE_KEYS = frozenset({"token", "authorization", "secret", "password"})
_SENSITIVE_SUFFIXES = ("_token", "_secret", "_password")
# Three base64url parts, the header starting with '{"' (eyJ); the signature may be empty (alg none).
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_MAX_DEPTH = 8
_HANDLER_MARK = "_sessiond_handler"


def _sensitive(key: object) -> bool:
    if not isinstance(key, str):
        return False
    low = key.lower()
    return low in _SENSITIVE_KEYS or low.endswith(_SENSITIVE_SUFFIXES)


def _scrub_str(text: str) -> str:
    if "eyJ" in text:
        text = _JWT_RE.sub(REDACTED, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _scrub(value: Any, depth: int = 0) -> Any:
    """Redacted copy of value; containers are rebuilt only when needed."""
    if isinstance(value, str):
        return _scrub_str(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if _sensitive(k) else _scrub(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets by key name (any depth) and JWT/Bearer-looking text in strings."""
    for key, value in event_dict.items():
        if key.startswith("_"):  # structlog/stdlib plumbing (_record, _from_structlog)
            continue
        if _sensitive(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _scrub(value)
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """WriteLogger that remembers the name given to get_logger, for the `logger` key."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name and "logger" not in event_dict:
        event_dict["logger"] = name
    return event_dict


def _orjson_dumps(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, default=kw.get("default", repr), option=orjson.OPT_NON_STR_KEYS).decode()


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def _level(name: str) -> int:
    value = logging.getLevelName(name.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {name!r}")
    return value


def configure_logging(
    fmt: str | None,
    level: str = "info",
    stream: IO[str] | None = None,
    *,
    stdlib_level: str = "warning",
) -> None:
    """(Re)configure structlog and the stdlib root logger; safe to call again (tests, CLI)."""
    out = stream if stream is not None else sys.stderr
    if fmt not in (None, "json", "console"):
        raise ValueError("log format must be json or console")
    own_level, foreign_level = _level(level), _level(stdlib_level)
    as_json = fmt == "json" or (fmt is None and not _is_tty(out))
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
    ]
    file = cast(TextIO, out)
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,  # before redact, so tracebacks are scrubbed too
        redact,
        renderer,
    ]
    structlog.configure(
        processors=[*shared, _add_logger_name, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(own_level),
        logger_factory=lambda *args: _NamedWriteLogger(file, args[0] if args else None),
        cache_logger_on_first_use=False,  # reconfiguration must reach loggers created at import time
    )
    _route_stdlib(out, shared, tail, foreign_level)


def _route_stdlib(out: IO[str], shared: list[Processor], tail: list[Processor], level: int) -> None:
    """Send stdlib records (hypercorn, trio-websocket) through the same processors and renderer."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    _remove_handlers(root)
    root.addHandler(handler)
    root.setLevel(level)


def _remove_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()


def reset_logging() -> None:
    """Undo configure_logging (tests): structlog defaults and no handler of ours on the root logger."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    _remove_handlers(logging.getLogger())
    logging.getLogger().setLevel(logging.WARNING)


def get_logger(name: str) -> FilteringBoundLogger:
    """A lazy structlog logger carrying `logger=name`; it follows later configure_logging calls."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))
