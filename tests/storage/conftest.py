"""The `storage` fixture: every conformance test runs once per backend in BACKENDS.

To add a backend, write an async context manager factory `(request, tmp_path) -> Storage` and add one
`pytest.param(..., id=NAME)` to BACKENDS (with `marks=pytest.mark.services` when it needs the real servers;
such a factory takes the session fixtures `pg_url`, `redis_url`, `redis_prefix` through `request`, so a down
server fails the test, never skips it). The tests make unique ids, so backends on a shared server need no
cleanup between tests. The production backends go through `open_production_storage`, exactly as `serve` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.bridge import Bridge, open_bridge
from storage.memory import memory_storage
from storage.ports import Storage
from storage.production import open_production_storage
from storage.sqlite import open_sqlite_storage


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    """The storage layer's asyncio thread, for the backend tests that open a client on it themselves."""
    async with open_bridge() as b:
        yield b


BackendFactory = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[Storage]]


@dataclass(frozen=True)
class ServiceSettings:
    """The ProductionConfig fields (what api.settings.Settings provides), set per backend."""

    data_dir: Path
    redis_url: str | None = None
    database_url: str | None = None
    amqp_url: str | None = None
    durability: str | None = None
    # The test run shares one database between modes: the guard against a switch is tested on its own database.
    allow_durability_switch: bool = True


@asynccontextmanager
async def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    yield memory_storage()


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> AbstractAsyncContextManager[Storage]:
    return open_sqlite_storage(tmp_path / "sqlite")


def _production(*, redis: bool, postgres: bool, durability: str | None = None) -> BackendFactory:
    @asynccontextmanager
    async def factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
        settings = ServiceSettings(
            data_dir=tmp_path / "embedded",
            redis_url=request.getfixturevalue("redis_url") if redis else None,
            database_url=request.getfixturevalue("pg_url") if postgres else None,
            durability=durability,
        )
        prefix = request.getfixturevalue("redis_prefix") if redis else "sessiond:"
        async with open_production_storage(settings, key_prefix=prefix) as storage:
            yield storage

    return factory


BACKENDS = [
    pytest.param(_memory, id="memory"),
    pytest.param(_sqlite, id="sqlite"),
    pytest.param(_production(redis=True, postgres=False), id="redis", marks=pytest.mark.services),
    pytest.param(_production(redis=False, postgres=True), id="postgres", marks=pytest.mark.services),
    pytest.param(_production(redis=True, postgres=True), id="redis+postgres", marks=pytest.mark.services),
    pytest.param(
        _production(redis=False, postgres=True, durability="postgres"),
        id="postgres-journal",
        marks=pytest.mark.services,
    ),
]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    factory: BackendFactory = request.param
    async with factory(request, tmp_path) as backend:
        yield backend
