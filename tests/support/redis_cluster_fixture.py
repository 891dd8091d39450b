"""Session fixture `redis_cluster_url`: one throwaway 3-master Redis Cluster per test run.

Kept out of tests/conftest.py so only the suites that need a cluster pay its ~2 s startup; opt in with
`from tests.support.redis_cluster_fixture import redis_cluster_url  # noqa: F401` in a conftest or test module.
It is sync on purpose (pytest-trio runs async fixtures per test inside trio; this one spawns processes once).
A missing redis-server or a cluster that does not come up FAILS the requesting tests, it never skips them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.support.redis_cluster import redis_cluster


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`redis://127.0.0.1:<port>` of a private 3-master cluster (any node is a seed), stopped after the run."""
    with contextlib.ExitStack() as stack:
        problem = None
        try:
            info = stack.enter_context(redis_cluster(tmp_path_factory.mktemp("redis-cluster")))
        except RuntimeError as exc:  # missing binary or ClusterStartError (message includes the node's log tail)
            problem = f"cannot start a throwaway Redis Cluster: {exc}"
        if problem:  # failed outside the except block: the message alone, without a chained traceback
            pytest.fail(problem, pytrace=False)
        yield info.url
