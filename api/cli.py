"""`sessiond serve | token | migrate | top | --version` (DESIGN §9). Flags mirror the SESSIOND_* variables."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio

from api.settings import Settings, SettingsError, load_settings


def _version() -> str:
    try:
        return version("sessiond")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


_SERVE_FLAGS: list[tuple[str, type, str]] = [
    ("host", str, "bind address"),
    ("http-port", int, "REST, health and metrics port"),
    ("ws-port", int, "WebSocket port"),
    ("data-dir", str, "embedded store directory"),
    ("redis-url", str, "Redis URL (journal, snapshots)"),
    ("database-url", str, "PostgreSQL URL"),
    ("amqp-url", str, "RabbitMQ URL (events)"),
    ("durability", str, "when an op is acked: memory, redis (journal) or postgres (committed)"),
    ("allowed-origins", str, "comma-separated Origin allowlist"),
    ("rate-limit", str, "frames per second / burst per connection, e.g. 50/100"),
    ("max-frame", int, "largest accepted frame in bytes"),
    ("pod-id", str, "this pod's name in the cluster"),
    ("lease-ttl-s", float, "cluster membership and session-lease TTL in seconds"),
    ("log-format", str, "console or json"),
    ("log-level", str, "debug, info, warning, error"),
    ("jwt-audience", str, "expected JWT aud"),
    ("jwt-issuer", str, "expected JWT iss"),
    ("tls-cert-file", str, "PEM certificate (chain): serve wss:// and HTTPS, TLS 1.3 only; with --tls-key-file"),
    ("tls-key-file", str, "PEM private key of --tls-cert-file"),
    ("web-dir", str, "the built web app (web/dist) served at /app/; empty: none"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessiond", description="Realtime session-state server")
    parser.add_argument("--version", action="version", version=f"sessiond {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    for name, kind, help_text in _SERVE_FLAGS:
        env = "SESSIOND_" + name.upper().replace("-", "_")
        serve.add_argument(f"--{name}", type=kind, default=None, help=f"{help_text} ({env})")
    token = commands.add_parser("token", help="mint a development token signed with the configured key")
    token.add_argument("--user", required=True, help="the JWT sub")
    token.add_argument("--role", action="append", default=[], help="a role, e.g. admin (repeatable)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--data-dir", default=None, help="embedded store directory (dev-mode key lives there)")
    commands.add_parser("migrate", help="apply the PostgreSQL migrations (SESSIOND_DATABASE_URL)")
    from api import top  # `sessiond top`: a client of a running pod, no server settings needed

    top.add_command(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, _, _ in _SERVE_FLAGS:
        value = getattr(args, name.replace("-", "_"), None)
        if value is None:
            continue
        key = {"max-frame": "max_frame_bytes"}.get(name, name.replace("-", "_"))
        if key == "allowed_origins":
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        out[key] = value
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "top":
        from api import top

        return top.main(args)
    try:
        overrides = _overrides(args)
        if "data_dir" in overrides:
            from pathlib import Path

            overrides["data_dir"] = Path(overrides["data_dir"])
        settings = load_settings(**overrides)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "token":
            return _token(settings, args)
        if args.command == "migrate":
            return _migrate(settings)
    except SettingsError as exc:
        print(f"sessiond: {exc}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse requires a command


def _serve(settings: Settings) -> int:
    from actors.router import ClusterConflict
    from api.auth import Authenticator
    from api.logs import configure_logging
    from api.server import serve
    from storage.ports import DurabilitySwitchRefused

    configure_logging(settings.log_format, settings.log_level)
    authenticator = Authenticator.from_settings(settings)  # may create the dev key: before trio.run
    refused: list[BaseException] = []
    try:
        trio.run(serve, settings, authenticator)
    except* (ClusterConflict, DurabilitySwitchRefused) as group:
        refused.extend(group.exceptions)
    if refused:
        print(f"sessiond: refusing to start: {refused[0]}", file=sys.stderr)
        return 3
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from api.auth import Authenticator
    from api.logs import configure_logging

    configure_logging(settings.log_format, "warning")
    authenticator = Authenticator.from_settings(settings)
    print(authenticator.mint(args.user, roles=args.role, ttl_s=args.ttl))
    return 0


def _migrate(settings: Settings) -> int:
    if not settings.database_url:
        print("sessiond: SESSIOND_DATABASE_URL is not set; nothing to migrate", file=sys.stderr)
        return 2
    from storage.postgres import migrate_url

    applied = trio.run(migrate_url, settings.database_url)
    print(f"migrations applied: {applied}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
