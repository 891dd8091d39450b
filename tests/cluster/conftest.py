"""Fixtures for the multi-pod tests: real sessiond processes sharing the local Redis and PostgreSQL (DESIGN §6).

Each test gets its own Redis key prefix (so its own member list, leases and relay channels) and the run's
database. `redis_kind` runs a test against the local Redis and again against a private 3-master Redis Cluster
started from the redis-server binary (tests/support/redis_cluster.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pods import Pods
from tests.support.redis_cluster_fixture import redis_cluster_url  # noqa: F401  (a fixture)

LEASE_TTL_S = 2.0


@pytest.fixture(params=["redis", "redis-cluster"])
def cluster_redis_url(request: pytest.FixtureRequest) -> str:
    """The Redis the pods share: the local server, or a private Redis Cluster."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    cluster: str = request.getfixturevalue("redis_cluster_url")
    return cluster


@pytest.fixture
def pods(tmp_path: Path, cluster_redis_url: str, redis_prefix: str, pg_url: str) -> Iterator[Pods]:
    env = {
        "SESSIOND_REDIS_URL": cluster_redis_url,
        "SESSIOND_REDIS_PREFIX": f"{redis_prefix}{secrets.token_hex(3)}:",
        "SESSIOND_DATABASE_URL": pg_url,
        "SESSIOND_DURABILITY": "redis",
    }
    with Pods(tmp_path, env, ttl_s=LEASE_TTL_S) as cluster:
        yield cluster
