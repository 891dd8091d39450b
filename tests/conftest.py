"""Shared fixtures for tests that need the real servers on 127.0.0.1 (never mocks).

Each test run gets its own PostgreSQL database, Redis key prefix and RabbitMQ vhost, created lazily (only when
a test asks for the fixture) and removed at the end, so concurrent runs on one machine do not see each other.
A server that is down makes the fixture FAIL with a message saying how to fix it: in CI a missing service is a
failure, never a skip. `scripts/services.sh ensure` starts them.

Session-scoped fixtures are sync on purpose (pytest-trio runs async fixtures per test inside trio): they use
subprocess, redis-py's sync client and asyncpg under `asyncio.run`, all outside the trio loop.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

HOST = "127.0.0.1"
PG_PORT = 5432
REDIS_PORT = 6379
AMQP_PORT = 5672
PG_ADMIN_URL = f"postgresql://postgres@{HOST}:{PG_PORT}/postgres"
FIX_HINT = "start it with `scripts/services.sh ensure` (or `make services`)"

SERVICE_FIXTURES = frozenset({"pg_url", "redis_url", "redis_prefix", "amqp_url"})

# The whole run shares one PostgreSQL database between durability modes, which a deployment never does: servers
# started as child processes (they inherit the environment) may switch modes. The guard itself is tested on a
# database of its own (tests/integration/test_durability.py).
os.environ["SESSIOND_ALLOW_DURABILITY_SWITCH"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use a real server with `services`, so `-m 'not services'` gives a quick local run."""
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def run_id() -> str:
    """A short random name shared by this test run's database, key prefix and vhost."""
    return secrets.token_hex(4)


# ---- PostgreSQL ----------------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    import asyncpg  # imported here: only runs that use PostgreSQL pay for it

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close(timeout=10)


def _pg_run(sql: str) -> None:
    asyncio.run(_pg_admin(sql))


@pytest.fixture(scope="session")
def pg_url(run_id: str) -> Iterator[str]:
    """URL of a fresh, empty database `sessiond_test_<run>` on the local PostgreSQL, dropped after the run."""
    name = f"sessiond_test_{run_id}"
    problem = None
    try:
        _pg_run(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:
        problem = f"PostgreSQL is not reachable at {HOST}:{PG_PORT} ({exc}); {FIX_HINT}"
    except Exception as exc:  # asyncpg errors: bad auth, cannot create the database, ...
        problem = (
            f"PostgreSQL at {HOST}:{PG_PORT} refused to create database {name} as user postgres "
            f"({type(exc).__name__}: {exc}); it must accept user postgres with trust auth"
        )
    if problem:  # failed outside the except block: the message alone, without a chained traceback
        pytest.fail(problem, pytrace=False)
    try:
        yield f"postgresql://postgres@{HOST}:{PG_PORT}/{name}"
    finally:
        _pg_run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the local Redis (db 0), checked to answer; keep every key under `redis_prefix`."""
    import redis

    url = f"redis://{HOST}:{REDIS_PORT}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    problem = None
    try:
        client.ping()
    except redis.RedisError as exc:
        problem = f"Redis is not reachable at {HOST}:{REDIS_PORT} ({exc}); {FIX_HINT}"
    finally:
        client.close()
    if problem:
        pytest.fail(problem, pytrace=False)
    return url


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str, run_id: str) -> Iterator[str]:
    """Key (and channel) prefix `sessiond-test-<run>:` owned by this run; its keys are deleted at the end."""
    import redis

    prefix = f"sessiond-test-{run_id}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


# ---- RabbitMQ ------------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.fail(f"rabbitmqctl is not installed (needed to create a test vhost); {FIX_HINT}", pytrace=False)
    return subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=60, check=False)


def _amqp_answers() -> bool:
    """True when something on the AMQP port answers the protocol header like RabbitMQ does."""
    import socket

    try:
        with socket.create_connection((HOST, AMQP_PORT), timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url(run_id: str) -> Iterator[str]:
    """AMQP URL (guest/guest) of a fresh vhost `sessiond-test-<run>` on the local RabbitMQ, then deleted."""
    if not _amqp_answers():
        pytest.fail(f"RabbitMQ is not reachable at {HOST}:{AMQP_PORT}; {FIX_HINT}", pytrace=False)
    vhost = f"sessiond-test-{run_id}"
    for args in (("add_vhost", vhost), ("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")):
        done = _rabbitmqctl(*args)
        if done.returncode != 0:
            _rabbitmqctl("delete_vhost", vhost)
            pytest.fail(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}",
                pytrace=False,
            )
    try:
        yield f"amqp://guest:guest@{HOST}:{AMQP_PORT}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)
