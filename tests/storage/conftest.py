"""The `storage` fixture: every conformance test runs once per backend in BACKENDS.

To add a backend, write an async context manager `(tmp_path) -> Storage` and add one
`pytest.param(..., id=NAME)` to BACKENDS (with `marks=pytest.mark.services` when it needs the real
servers). The tests make unique ids, so backends on a shared server need no cleanup between tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from storage.memory import memory_storage
from storage.ports import Storage
from storage.sqlite import open_sqlite_storage

BackendFactory = Callable[[Path], AbstractAsyncContextManager[Storage]]


@asynccontextmanager
async def _memory(tmp_path: Path) -> AsyncIterator[Storage]:
    yield memory_storage()


def _sqlite(tmp_path: Path) -> AbstractAsyncContextManager[Storage]:
    return open_sqlite_storage(tmp_path / "sqlite")


BACKENDS = [
    pytest.param(_memory, id="memory"),
    pytest.param(_sqlite, id="sqlite"),
]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    factory: BackendFactory = request.param
    async with factory(tmp_path) as backend:
        yield backend
