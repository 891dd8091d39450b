"""Credentials from files (`SESSIOND_<NAME>_FILE`, the Vault Agent pattern deploy/k8s uses).

Unit tests of api/settings.py, then a real `sessiond serve` process given its JWT secret and its PostgreSQL, Redis
and RabbitMQ URLs only as files, checked to use each of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pika
import pytest
import trio

from api.settings import SettingsError, env_names, load_settings
from bench.server import free_port

ROOT = Path(__file__).resolve().parents[2]
FILE_SETTINGS = {
    "SESSIOND_JWT_SECRET_FILE": "jwt_secret",
    "SESSIOND_REDIS_URL_FILE": "redis_url",
    "SESSIOND_DATABASE_URL_FILE": "database_url",
    "SESSIOND_AMQP_URL_FILE": "amqp_url",
}
VALUES = {
    "SESSIOND_JWT_SECRET_FILE": "s3cret-0123456789abcdef0123456789abcdef",
    "SESSIOND_REDIS_URL_FILE": "redis://:p%40ss@redis.example:6379/0",
    "SESSIOND_DATABASE_URL_FILE": "postgresql://sessiond:pw@pg.example:5432/sessiond",
    "SESSIOND_AMQP_URL_FILE": "amqp://sessiond:pw@mq.example:5672/%2F",
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o400)
    return str(path)


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", sorted(FILE_SETTINGS))
def test_each_credential_setting_reads_its_file(var: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "value", VALUES[var] + "\n")  # Vault templates and editors end files with a newline
    settings = load_settings({var: path})
    assert getattr(settings, FILE_SETTINGS[var]) == VALUES[var]


@pytest.mark.parametrize("var", sorted(FILE_SETTINGS))
def test_missing_file_is_a_settings_error_naming_the_variable(var: str, tmp_path: Path) -> None:
    missing = tmp_path / "not-rendered-yet"
    with pytest.raises(SettingsError) as err:
        load_settings({var: str(missing)})
    assert var in str(err.value) and str(missing) in str(err.value)
    assert "No such file" in str(err.value)


def test_unreadable_file_is_a_settings_error(tmp_path: Path) -> None:
    # A directory where the file should be: unreadable as text whatever the user (root reads a chmod 000 file).
    with pytest.raises(SettingsError, match=r"SESSIOND_DATABASE_URL_FILE: cannot read .*: Is a directory"):
        load_settings({"SESSIOND_DATABASE_URL_FILE": str(tmp_path)})


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n"], ids=["empty", "newline", "whitespace"])
def test_empty_file_is_a_settings_error(content: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "redis-url", content)
    with pytest.raises(SettingsError, match=rf"^SESSIOND_REDIS_URL_FILE: {path} is empty$"):
        load_settings({"SESSIOND_REDIS_URL_FILE": path})


def test_empty_file_variable_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"^SESSIOND_AMQP_URL_FILE is set but empty"):
        load_settings({"SESSIOND_AMQP_URL_FILE": ""})


@pytest.mark.parametrize("var", sorted(FILE_SETTINGS))
def test_variable_and_its_file_together_are_refused(var: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "value", VALUES[var])
    plain = var.removesuffix("_FILE")
    for env in ({plain: VALUES[var], var: path}, {var: path, plain: VALUES[var]}):  # either order of the environment
        with pytest.raises(SettingsError, match=rf"^set {plain} or {var}, not both$"):
            load_settings(env)


def test_an_empty_variable_beside_its_file_counts_as_unset(tmp_path: Path) -> None:
    path = _write(tmp_path / "database-url", VALUES["SESSIOND_DATABASE_URL_FILE"])
    settings = load_settings({"SESSIOND_DATABASE_URL": "", "SESSIOND_DATABASE_URL_FILE": path})
    assert settings.database_url == VALUES["SESSIOND_DATABASE_URL_FILE"]


def test_a_file_url_satisfies_the_durability_requirement(tmp_path: Path) -> None:
    """SESSIOND_DURABILITY=redis needs a Redis URL: one from a file counts."""
    path = _write(tmp_path / "redis-url", "redis://redis:6379/0")
    assert load_settings({"SESSIOND_DURABILITY": "redis", "SESSIOND_REDIS_URL_FILE": path}).redis_url
    with pytest.raises(SettingsError, match="needs SESSIOND_REDIS_URL"):
        load_settings({"SESSIOND_DURABILITY": "redis"})


def test_env_names_lists_what_load_settings_reads() -> None:
    names = env_names()
    assert set(FILE_SETTINGS) | {"SESSIOND_JWT_PUBLIC_KEY_FILE"} <= names
    assert {"SESSIOND_HOST", "SESSIOND_POD_ID", "SESSIOND_MAX_FRAME", "SESSIOND_RATE_LIMIT"} <= names
    assert "SESSIOND_DATA_DIR_FILE" not in names and "SESSIOND_NOPE" not in names
    assert all(name.startswith("SESSIOND_") for name in names)


def test_serve_with_a_bad_secret_file_exits_2_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(SESSIOND_DATA_DIR=str(tmp_path), SESSIOND_DATABASE_URL_FILE=str(tmp_path / "absent"))
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sessiond: SESSIOND_DATABASE_URL_FILE: cannot read"), done.stderr
    assert "Traceback" not in done.stderr


# ---- a real server from files ---------------------------------------------------------------------


def _amqp_queue(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare("sessiond.events", "topic", durable=True)
        ch.queue_declare(queue, arguments={"x-expires": 120_000})
        ch.queue_bind(queue, "sessiond.events", routing_key="session.*")
    finally:
        conn.close()


def _amqp_wait_for_session(url: str, queue: str, session_id: str, timeout_s: float) -> dict[str, object] | None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    deadline = time.monotonic() + timeout_s
    try:
        ch = conn.channel()
        while time.monotonic() < deadline:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                conn.sleep(0.05)
                continue
            event = json.loads(body)
            if event.get("session") == session_id:
                return dict(event)
        return None
    finally:
        conn.close()


async def _pg_has_session(pg_url: str, session_id: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM sessions WHERE id = $1", session_id))
    finally:
        await conn.close(timeout=10)


def _spawn_serve(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )


@pytest.fixture
def server_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Holds the started process; it is stopped (SIGKILL if still running) whatever the test did."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_serve_starts_from_secret_files_only(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
    amqp_url: str,
    server_proc: list[subprocess.Popen[bytes]],
) -> None:
    """JWT secret and the PostgreSQL, Redis and RabbitMQ URLs given only as files (mode 0400, trailing newline, as
    the Vault agent writes them): the server is ready, accepts a token signed with the file's secret and no other,
    and its session lands in that database, that Redis and that RabbitMQ vhost."""
    secrets_dir = tmp_path / "vault-secrets"
    secrets_dir.mkdir()
    jwt_secret = secrets.token_urlsafe(48)
    files = {
        "SESSIOND_JWT_SECRET_FILE": _write(secrets_dir / "jwt", jwt_secret + "\n"),
        "SESSIOND_DATABASE_URL_FILE": _write(secrets_dir / "database-url", pg_url + "\n"),
        "SESSIOND_REDIS_URL_FILE": _write(secrets_dir / "redis-url", redis_url + "\n"),
        "SESSIOND_AMQP_URL_FILE": _write(secrets_dir / "amqp-url", amqp_url + "\n"),
    }
    prefix = f"{redis_prefix}files-{secrets.token_hex(3)}:"
    queue = f"sessiond-test-files-{secrets.token_hex(5)}"
    await trio.to_thread.run_sync(_amqp_queue, amqp_url, queue)

    http_port, ws_port = free_port(), free_port()
    # Only the files carry credentials: no SESSIOND_* from the test runner's environment leaks in, except the
    # shared-database allowance every test server needs (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(files)
    env.update(
        SESSIOND_ALLOW_DURABILITY_SWITCH="1",
        SESSIOND_DURABILITY="redis",
        SESSIOND_REDIS_PREFIX=prefix,
        SESSIOND_HTTP_PORT=str(http_port),
        SESSIOND_WS_PORT=str(ws_port),
        SESSIOND_DATA_DIR=str(tmp_path / "data"),
        SESSIOND_LOG_FORMAT="json",
        SESSIOND_POD_ID="files-pod",
        SESSIOND_LEASE_TTL_S="2",
    )
    log_path = tmp_path / "server.log"
    proc = _spawn_serve(env, log_path)
    server_proc.append(proc)
    base = f"http://127.0.0.1:{http_port}"

    def logs() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        with trio.fail_after(45):
            while True:
                assert proc.poll() is None, f"sessiond exited with {proc.returncode}:\n{logs()}"
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)

        def bearer(key: str) -> dict[str, str]:
            token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, key, algorithm="HS256")
            return {"Authorization": f"Bearer {token}"}

        wrong = await http.get("/v1/sessions", headers=bearer("another-secret-0123456789abcdef0123456789"))
        assert wrong.status_code == 401, wrong.text
        created = await http.post("/v1/sessions", json={"name": "from-files"}, headers=bearer(jwt_secret))
        assert created.status_code == 201, f"{created.text}\n{logs()}"
        session_id = created.json()["id"]

    in_pg = await trio.to_thread.run_sync(lambda: asyncio.run(_pg_has_session(pg_url, session_id)))
    assert in_pg, "the session is not in the database of the file's URL"
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert any(True for _ in client.scan_iter(match=f"{prefix}*", count=1000)), "nothing under the prefix"
    finally:
        client.close()
    event = await trio.to_thread.run_sync(_amqp_wait_for_session, amqp_url, queue, session_id, 15.0)
    assert event is not None, f"no session event in the vhost of the file's AMQP URL\n{logs()}"

    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        while proc.poll() is None:
            await trio.sleep(0.05)
    assert proc.returncode == 0, logs()
