"""The `sessiond` command line: --version, token, migrate, and clear errors on bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from api.cli import main


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    full.update(env or {})
    argv = [sys.executable, "-m", "api.cli", *args]
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60)


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.startswith("sessiond ")


def test_token_is_signed_with_the_configured_secret(tmp_path: Path) -> None:
    secret = "s" * 40
    done = _run("token", "--user", "alice", "--role", "admin", "--ttl", "60", env={"SESSIOND_JWT_SECRET": secret})
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["roles"] == ["admin"]
    assert "eyJ" not in done.stderr  # the token goes to stdout only, never into the logs


def test_dev_mode_token_uses_the_data_dir_secret(tmp_path: Path) -> None:
    done = _run("token", "--user", "bob", env={"SESSIOND_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    secret = (tmp_path / "jwt-secret").read_text().strip()
    assert jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "bob"


@pytest.mark.parametrize(
    "env",
    [
        {"SESSIOND_HTTP_PORT": "not-a-port"},
        {"SESSIOND_RATE_LIMIT": "fast"},
        {"SESSIOND_DURABILITY": "postgres"},
        {"SESSIOND_JWT_SECRET_FILE": "/nonexistent/secret"},
    ],
)
def test_bad_settings_fail_with_a_clear_message(env: dict[str, str]) -> None:
    done = _run("serve", env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("sessiond: ") and "Traceback" not in done.stderr


def test_migrate_without_database_url() -> None:
    assert main(["migrate"]) == 2


def test_migrate_applies_then_is_idempotent(pg_url: str) -> None:
    first = _run("migrate", env={"SESSIOND_DATABASE_URL": pg_url})
    second = _run("migrate", env={"SESSIOND_DATABASE_URL": pg_url})
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert second.stdout.strip() == "migrations applied: []"
