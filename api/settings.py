"""One typed, frozen settings object (DESIGN §9), built once from SESSIOND_* variables and CLI flags.

No other module reads os.environ: the composition root builds Settings and passes it down.
Secrets may come from a variable or from a file named by `<NAME>_FILE` (the Vault Agent pattern).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


POD_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _default_pod_id() -> str:
    """Host name + pid: unique among the pods sharing a Redis, and new at every restart."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "pod"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    http_port: int = 8080
    ws_port: int = 8443
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # PEM text (read from SESSIOND_JWT_PUBLIC_KEY_FILE)
    jwt_algorithm: str | None = None  # HS256 with a secret; RS256/ES256 with a public key
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    data_dir: Path = Path("./.sessiond")
    redis_url: str | None = None
    redis_prefix: str = "sessiond:"  # every key this deployment writes starts with it
    database_url: str | None = None
    amqp_url: str | None = None
    durability: str | None = None  # "memory" | "redis" | "postgres"; None: redis with Redis, else memory
    allow_durability_switch: bool = False  # start in another mode even if the last mode's journal holds changes
    allowed_origins: tuple[str, ...] = ()
    rate_per_s: float = 50.0
    rate_burst: int = 100
    # Quotas (issue 8): REST calls per user per second / burst (per pod), sessions a user may own, devices one
    # session may have, WebSocket connections one user may hold on one pod.
    rest_rate_per_s: float = 50.0
    rest_rate_burst: int = 100
    max_sessions_per_user: int = 1000
    max_devices_per_session: int = 64
    max_connections_per_user: int = 200
    max_frame_bytes: int = 65536
    max_state_bytes: int = 1 << 20
    max_token_bytes: int = 4096
    pod_id: str = field(default_factory=_default_pod_id)
    lease_ttl_s: float = 3.0  # cluster membership and session-lease TTL: failover happens within about this long
    # PEM files: with both set, the WebSocket port serves wss:// and the REST port HTTPS, TLS 1.3 only (api/tls.py);
    # usually a gateway terminates TLS instead (deploy/nginx). Both or neither.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    log_format: str | None = None  # "console" | "json"; None: console on a TTY, else json
    log_level: str = "info"
    # Timings and sizes that tests and benchmarks tune; the defaults are the contract of DESIGN §3/§5.
    hello_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0
    send_queue_frames: int = 1024
    send_queue_bytes: int = 8 << 20
    ws_fast_path: bool = True  # write frames straight to plain-TCP sockets (issue 9); 0 keeps trio-websocket's path
    ws_read_hub: bool = True  # fast path: one task reads every socket; 0: a reader task per connection
    mailbox_size: int = 4096
    replay_window: int = 1000
    passivate_after_s: float = 300.0
    memory_budget_bytes: int = 512 << 20  # live actors' state; idle ones beyond it are passivated (LRU)
    snapshot_every_versions: int = 100  # fast snapshot to Redis (with a Redis journal)
    checkpoint_every_versions: int = 1000  # durable checkpoint (PostgreSQL / SQLite) ...
    checkpoint_every_s: float = 5.0  # ... or this often when changed
    max_restarts: int = 10
    restart_window_s: float = 60.0
    shutdown_grace_s: float = 10.0
    # A REST connection that sends nothing for this long is closed (idle keep-alive, HTTP/1.0, a body that never
    # comes): without it hypercorn + quart-trio keep such sockets open indefinitely (TRAPS).
    http_read_timeout_s: float = 30.0
    request_timeout_s: float = 10.0  # how long a REST call waits for its session's actor (then 503, outcome unknown)
    # The busiest K actors (by each of changes/s, mailbox, devices, state bytes) get per-session metrics,
    # sessiond_hot_actor_*{session} (actors/metrics.py); 0: none. Bounded: at most 4K sessions per pod.
    hot_actors: int = 20
    # The web app (api/web.py): the built PWA served at /app/; default the repo's web/dist when it exists (see
    # load_settings), None: /app/ answers 404 saying how to build it.
    web_dir: Path | None = None
    # POST /v1/dev/token mints a token for any user name (api/devlogin.py): development only. Refused unless the key
    # is the generated dev secret and the host is loopback, or dev_login_force says so.
    dev_login: bool = False
    dev_login_force: bool = False


_ENV_PREFIX = "SESSIOND_"
# Names that differ from the field: env name (without prefix) -> field
_ALIASES = {"MAX_FRAME": "max_frame_bytes", "JWT_ALGORITHM": "jwt_algorithm"}
# Settings whose value is (or carries) a credential: each may come from `SESSIOND_<NAME>_FILE` instead, e.g. a file
# the Vault Agent injector renders under /vault/secrets (deploy/k8s). Setting both the variable and its _FILE is an
# error: which one wins would be a guess.
_SECRET_FILES = {
    "JWT_SECRET": "jwt_secret",
    "JWT_PUBLIC_KEY": "jwt_public_key",
    "REDIS_URL": "redis_url",
    "DATABASE_URL": "database_url",
    "AMQP_URL": "amqp_url",
}


def _convert(name: str, raw: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, Path):
            return Path(raw)
        if isinstance(current, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{_ENV_PREFIX}{name.upper()}: cannot read {raw!r}") from exc
    return raw or None


def _read_secret_file(var: str, path: str) -> str:
    """The file's text without surrounding whitespace (templates end with a newline); empty is an error."""
    if not path.strip():
        raise SettingsError(f"{var} is set but empty: give the path of the file holding the value")
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(f"{var}: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{var}: {path} is not UTF-8 text") from exc
    if not value:
        raise SettingsError(f"{var}: {path} is empty")
    return value


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `env` (default os.environ), then keyword overrides (CLI flags), validated."""
    env = os.environ if env is None else env
    base = Settings()
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    for key, raw in env.items():
        if not key.startswith(_ENV_PREFIX):
            continue
        short = key[len(_ENV_PREFIX):]
        if short.endswith("_FILE") and short[:-5] in _SECRET_FILES:
            if env.get(key[:-5]):
                raise SettingsError(f"set {key[:-5]} or {key}, not both")
            values[_SECRET_FILES[short[:-5]]] = _read_secret_file(key, raw)
            continue
        if short == "RATE_LIMIT":
            values.update(_parse_rate(raw))
            continue
        if short == "REST_RATE_LIMIT":
            values.update(_parse_rate(raw, "rest_"))
            continue
        name = _ALIASES.get(short, short.lower())
        if name in names and name not in values:
            values[name] = _convert(name, raw, getattr(base, name))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "web_dir" in values:  # set but empty (SESSIOND_WEB_DIR=): no web app
        values["web_dir"] = Path(values["web_dir"]) if values["web_dir"] else None
    else:
        values["web_dir"] = _default_web_dir()
    if "rate_limit" in values:
        values.update(_parse_rate(values.pop("rate_limit")))
    if "rest_rate_limit" in values:
        values.update(_parse_rate(values.pop("rest_rate_limit"), "rest_"))
    unknown = set(values) - names
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = replace(base, **values)
    _validate(settings)
    return settings


def _default_web_dir() -> Path | None:
    """The repo's built web app (web/dist) when running from a source tree where it was built, else None."""
    dist = Path(__file__).resolve().parent.parent / "web" / "dist"
    return dist if (dist / "index.html").is_file() else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_names() -> frozenset[str]:
    """Every SESSIOND_* variable load_settings reads; deployments (deploy/k8s) are checked against it, since
    load_settings itself ignores names it does not know."""
    names = {f.name for f in fields(Settings)}
    known = {f"{_ENV_PREFIX}{name.upper()}" for name in names}
    known |= {f"{_ENV_PREFIX}{alias}" for alias, name in _ALIASES.items() if name in names}
    known |= {f"{_ENV_PREFIX}{short}_FILE" for short in _SECRET_FILES}
    known |= {f"{_ENV_PREFIX}RATE_LIMIT", f"{_ENV_PREFIX}REST_RATE_LIMIT"}
    return frozenset(known)


def admin_token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """SESSIOND_ADMIN_TOKEN: the admin token `sessiond top` uses when --token is not given (a client setting; the
    server never reads it)."""
    env = os.environ if env is None else env
    return env.get(f"{_ENV_PREFIX}ADMIN_TOKEN") or None


def _parse_rate(raw: str, prefix: str = "") -> dict[str, Any]:
    try:
        rate, _, burst = raw.partition("/")
        return {f"{prefix}rate_per_s": float(rate), f"{prefix}rate_burst": int(burst or float(rate) * 2)}
    except ValueError as exc:
        raise SettingsError(f"SESSIOND_{prefix.upper()}RATE_LIMIT: expected RATE/BURST, got {raw!r}") from exc


def _validate(s: Settings) -> None:
    for name in ("http_port", "ws_port"):
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise SettingsError(f"{name}: {port} is not a port")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise SettingsError("SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE go together: set both (TLS) or neither")
    if s.rate_per_s <= 0 or s.rate_burst < 1 or s.rest_rate_per_s <= 0 or s.rest_rate_burst < 1:
        raise SettingsError("rate limits must be positive")
    if min(s.max_sessions_per_user, s.max_devices_per_session, s.max_connections_per_user) < 1:
        raise SettingsError("quotas must be at least 1")
    if s.max_frame_bytes < 1024:
        raise SettingsError("max_frame_bytes must be at least 1024")
    if s.log_format not in (None, "console", "json"):
        raise SettingsError("log_format must be console or json")
    if s.jwt_algorithm not in (None, "HS256", "RS256", "ES256"):
        raise SettingsError("jwt_algorithm must be HS256, RS256 or ES256")
    if s.durability not in (None, "memory", "redis", "postgres"):
        raise SettingsError("SESSIOND_DURABILITY must be memory, redis or postgres")
    if s.durability == "redis" and not s.redis_url:
        raise SettingsError("SESSIOND_DURABILITY=redis needs SESSIOND_REDIS_URL")
    if s.durability == "postgres" and not s.database_url:
        raise SettingsError("SESSIOND_DURABILITY=postgres needs SESSIOND_DATABASE_URL")
    if not POD_ID_RE.fullmatch(s.pod_id):
        raise SettingsError("SESSIOND_POD_ID must be 1-64 of [A-Za-z0-9._-]")
    if s.request_timeout_s <= 0 or s.request_timeout_s >= s.http_read_timeout_s:
        raise SettingsError("SESSIOND_REQUEST_TIMEOUT_S must be positive and below SESSIOND_HTTP_READ_TIMEOUT_S")
    if not 0 <= s.hot_actors <= 1000:
        raise SettingsError("SESSIOND_HOT_ACTORS must be between 0 (off) and 1000")
    if s.http_read_timeout_s <= 0:
        raise SettingsError("SESSIOND_HTTP_READ_TIMEOUT_S must be positive")
    if not 0.5 <= s.lease_ttl_s <= 60:
        raise SettingsError("SESSIOND_LEASE_TTL_S must be between 0.5 and 60 seconds")
    if s.jwt_algorithm == "HS256" and s.jwt_public_key and not s.jwt_secret:
        raise SettingsError("HS256 needs SESSIOND_JWT_SECRET")
    if s.dev_login:
        if s.jwt_public_key and s.jwt_algorithm != "HS256":
            raise SettingsError("SESSIOND_DEV_LOGIN: cannot mint tokens with only a public key configured")
        if not s.dev_login_force and (s.jwt_secret or s.jwt_public_key):
            raise SettingsError(
                "SESSIOND_DEV_LOGIN mints a token for anyone who asks: it runs only with the generated dev key "
                "(unset SESSIOND_JWT_SECRET / SESSIOND_JWT_PUBLIC_KEY_FILE) or with SESSIOND_DEV_LOGIN_FORCE=1"
            )
        if not s.dev_login_force and not _is_loopback(s.host):
            raise SettingsError(
                f"SESSIOND_DEV_LOGIN on a non-loopback host ({s.host}) lets anyone on the network sign in as "
                "anyone: bind 127.0.0.1, or set SESSIOND_DEV_LOGIN_FORCE=1"
            )
