"""A finished connection and a stopped actor are freed by reference counting, not left to the full collection.

The server runs with a rare full (generation-2) collection (`gc.freeze()` and high thresholds, api/server.py), so
cyclic garbage waits long: the soak (issue 8) showed a sawtooth of ~170k blocks and an RSS that ratcheted up with
each peak. Every connection (ws -> on_pong -> watch -> conn, conn -> on_resync -> conn) and every ended session's
actor (actor -> checkpointer -> actor.lease_lost) was such garbage. `gc.DEBUG_SAVEALL` keeps whatever a
collection finds unreachable, so the test sees exactly the objects that needed the cyclic GC.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from client.sdk import open_session
from tests.integration.harness import start_server

# Our server's objects (the clients in this process, the SDK and httpx, have their own cycles).
SERVER_MODULES = ("actors.", "transport.", "runtime.", "storage.")


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize("fast_path", [True, False], ids=["own-websocket", "trio-websocket"])
async def test_churned_sessions_and_device_lives_leave_no_cyclic_garbage(
    nursery: trio.Nursery, tmp_path: Path, saved_garbage: list[object], fast_path: bool
) -> None:
    open_before = _open_connections()
    h = await start_server(nursery, tmp_path / "data", ws_fast_path=fast_path)
    token = h.token()
    steady = await h.create_session()
    churned: list[str] = []
    async with h.rest() as http:
        for _ in range(3):  # session churn: create, a device, incs, delete (the actor stops: `ended`)
            sid = await h.create_session(state={"n": 0})
            churned.append(sid)
            async with open_session(h.ws_url, token=token, session=sid, device="churner") as dev:
                for _ in range(5):
                    await dev.inc("/n")
            assert (await http.delete(f"/v1/sessions/{sid}")).status_code in (200, 204)
        for life in range(3):  # device lives on a session that stays
            async with open_session(h.ws_url, token=token, session=steady, device=f"d{life}") as dev:
                await dev.inc("/n")
    registry = h.running.registry
    with trio.fail_after(10):  # the server's side of the last close, and the ended actors' teardown
        while _open_connections() != open_before or any(registry.lookup(sid) for sid in churned):
            await trio.sleep(0.01)
    gc.collect()
    found = Counter(
        f"{type(obj).__module__}.{type(obj).__qualname__}"
        for obj in saved_garbage
        if type(obj).__module__.startswith(SERVER_MODULES)
    )
    assert not found, f"server objects left as cyclic garbage: {dict(found)}"
    h.running.stop()


def _open_connections() -> float:
    return REGISTRY.get_sample_value("sessiond_ws_connections") or 0.0
