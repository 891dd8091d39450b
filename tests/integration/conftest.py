from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.integration.harness import Harness, start_server


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_server(nursery, tmp_path / "data")
    yield h
    h.running.stop()
