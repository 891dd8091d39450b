"""Per-actor metrics with bounded cardinality: the busiest K actors by each dimension, chosen at scrape time, with
nothing left behind for the ones that drop out; the change rate average behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actors.config import ActorConfig
from actors.metrics import HotActorsCollector, HotRow, select_hot
from actors.session_actor import RATE_MIN_DT_S, RATE_TAU_S, SessionActor
from runtime.timers import TimerHeap
from tests.integration.harness import Harness, raw_device, start_server

FAMILIES = (
    "sessiond_hot_actor_changes_per_second",
    "sessiond_hot_actor_mailbox_depth",
    "sessiond_hot_actor_devices",
    "sessiond_hot_actor_state_bytes",
)


def row(session: str, rate: float = 0.0, devices: int = 0, mailbox: int = 0, size: int = 0) -> HotRow:
    return HotRow(session, rate, devices, mailbox, size)


def hot_series(text: str) -> dict[str, dict[str, float]]:
    """family -> session -> value, for the hot-actor families of a scrape."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in FAMILIES:
            found[family.name] = {s.labels["session"]: s.value for s in family.samples}
    return found


# ---- the choice -------------------------------------------------------------------------------------------------


def test_select_hot_is_the_union_of_each_dimensions_top_k() -> None:
    rows = [
        row("busy", rate=50, devices=2, size=900),
        row("warm", rate=5, devices=1, size=800),
        row("stuck", mailbox=4000, devices=1, size=100),
        row("crowd", rate=1, devices=60, size=100),
        row("large", size=10_000),
        row("idle", size=50),
    ]
    assert [r.session for r in select_hot(rows, 1)] == ["busy", "crowd", "stuck", "large"]  # by rate, then mailbox
    # K=2: busy+warm by rate, stuck by mailbox (the only nonzero one), crowd+busy by devices, large+busy by bytes
    assert [r.session for r in select_hot(rows, 2)] == ["busy", "warm", "crowd", "stuck", "large"]
    assert select_hot(rows, 0) == []


def test_select_hot_never_picks_a_zero() -> None:
    rows = [row("a", rate=3, size=10), row("b", size=5), row("c", size=1)]
    assert [r.session for r in select_hot(rows, 1)] == ["a"]  # b and c are not "top" by a zero rate/mailbox/devices
    assert {r.session for r in select_hot(rows, 2)} == {"a", "b"}


# ---- the collector ----------------------------------------------------------------------------------------------


async def test_collector_exports_exactly_the_current_top_and_forgets_the_rest() -> None:
    registry = CollectorRegistry()
    collector = HotActorsCollector()
    registry.register(collector)
    rows = [row("a", rate=9, devices=3, size=300), row("b", rate=4, devices=2, size=200), row("c", size=1)]
    owner = object()
    collector.attach(owner, 2, lambda: list(rows))
    # from the trio thread (read directly) and from a worker thread (read through trio.from_thread), as /metrics does
    for scrape in (generate_latest(registry), await trio.to_thread.run_sync(generate_latest, registry)):
        series = hot_series(scrape.decode())
        assert set(series) == set(FAMILIES)
        assert series["sessiond_hot_actor_changes_per_second"] == {"a": 9.0, "b": 4.0}
        assert series["sessiond_hot_actor_devices"] == {"a": 3.0, "b": 2.0}
        assert series["sessiond_hot_actor_state_bytes"] == {"a": 300.0, "b": 200.0}
        assert series["sessiond_hot_actor_mailbox_depth"] == {"a": 0.0, "b": 0.0}
    rows[1] = row("b")  # b went away (passivated), c became busy
    rows[2] = row("c", rate=7, devices=1, size=50)
    series = hot_series((await trio.to_thread.run_sync(generate_latest, registry)).decode())
    assert all(set(by_session) == {"a", "c"} for by_session in series.values()), series
    assert 'session="b"' not in generate_latest(registry).decode()
    collector.detach(owner)
    assert "sessiond_hot_actor" not in generate_latest(registry).decode()
    collector.attach(owner, 0, lambda: list(rows))  # K=0: not even the metric names
    assert "sessiond_hot_actor" not in generate_latest(registry).decode()


def test_collector_without_a_running_loop_exports_nothing() -> None:
    """A registry whose trio loop ended but that is still attached: the scrape skips it instead of hanging."""
    registry = CollectorRegistry()
    collector = HotActorsCollector()
    registry.register(collector)

    async def attach() -> None:
        collector.attach(registry, 3, lambda: [row("x", rate=1)])

    trio.run(attach)
    families = hot_series(generate_latest(registry).decode())
    assert all(not by_session for by_session in families.values())


# ---- the rate ---------------------------------------------------------------------------------------------------


async def test_change_rate_is_a_recent_average_whoever_reads_it() -> None:
    actor = SessionActor("s", None, ActorConfig(), None, lambda _: None, TimerHeap())  # type: ignore[arg-type]
    t0 = actor._rate_at
    actor.changes = 20
    assert actor.change_rate(t0 + 2) == pytest.approx(10.0)  # first reading: the average since activation
    # steady 10/s: the same figure whether read every 0.1 s or once
    for step in range(1, 31):
        actor.changes = 20 + step
        actor.change_rate(t0 + 2 + step * 0.1)
    assert actor.change_rate(t0 + 5) == pytest.approx(10.0)
    # it stops: the average decays with time constant RATE_TAU_S
    assert actor.change_rate(t0 + 5 + RATE_TAU_S) == pytest.approx(10.0 / 2.718281828, rel=1e-3)
    assert actor.change_rate(t0 + 5 + RATE_TAU_S + 0.01) == actor.change_rate(t0 + 5 + RATE_TAU_S)  # too soon


async def test_a_young_actor_reads_its_average_so_far_not_zero() -> None:
    """A scrape within RATE_MIN_DT_S of activation once showed a busy actor at 0 changes/s (CI, a fast run)."""
    actor = SessionActor("s", None, ActorConfig(), None, lambda _: None, TimerHeap())  # type: ignore[arg-type]
    t0 = actor._rate_at
    actor.changes = 30
    assert actor.change_rate(t0 + RATE_MIN_DT_S / 2) == pytest.approx(30 / (RATE_MIN_DT_S / 2))
    actor.changes = 40  # not kept: the first full reading is still the average since activation
    assert actor.change_rate(t0 + 2) == pytest.approx(20.0)


# ---- a real server ----------------------------------------------------------------------------------------------


async def scrape(h: Harness) -> dict[str, dict[str, float]]:
    async with h.rest(None) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        return hot_series(response.text)


@asynccontextmanager
async def devices(h: Harness, per_session: dict[str, int], ops: dict[str, int]) -> AsyncIterator[None]:
    """Connect devices (staying connected) and send each session's ops from its first device, acked."""
    async with trio.open_nursery() as nursery:
        for sid, count in per_session.items():
            for index in range(count):
                ready = trio.Event()

                async def device(sid: str = sid, index: int = index, ready: trio.Event = ready) -> None:
                    async with raw_device(h, sid, f"d{index}") as dev:
                        for op_id in range(1, (ops.get(sid, 0) if index == 0 else 0) + 1):
                            value = "x" * 200
                            await dev.send({"t": "op", "id": op_id, "ops": [{"op": "set", "path": f"/k{op_id}",
                                                                             "value": value}]})
                            await dev.recv_type("ack")
                        ready.set()
                        await trio.sleep_forever()

                nursery.start_soon(device)
                with trio.fail_after(10):
                    await ready.wait()
        yield
        nursery.cancel_scope.cancel()


async def test_a_real_scrape_shows_exactly_the_busiest_sessions(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_server(nursery, tmp_path / "data", hot_actors=2)
    busy, warm = await h.create_session(), await h.create_session()
    small = await h.create_session(state={"pad": "y" * 50})
    tiny = await h.create_session()
    # warm first: its actor is older, so a higher rate for busy cannot come from a shorter lifetime alone
    async with devices(h, {warm: 1, busy: 2}, {warm: 10, busy: 30}), h.rest() as http:
        for sid in (small, tiny):  # live actors without devices or changes
            assert (await http.get(f"/v1/sessions/{sid}")).status_code == 200
        series = await scrape(h)
        assert set(series) == set(FAMILIES)
        assert all(set(by_session) == {busy, warm} for by_session in series.values()), series
        rates = series["sessiond_hot_actor_changes_per_second"]
        assert rates[busy] > rates[warm] > 0
        assert series["sessiond_hot_actor_devices"] == {busy: 2.0, warm: 1.0}
        assert series["sessiond_hot_actor_state_bytes"][busy] > series["sessiond_hot_actor_state_bytes"][warm] > 2000
        assert series["sessiond_hot_actor_mailbox_depth"] == {busy: 0.0, warm: 0.0}
        # the busiest session ends: its series go, the next largest state comes in
        assert (await http.delete(f"/v1/sessions/{busy}")).status_code == 204
        with trio.fail_after(10):
            while busy in (series := await scrape(h))["sessiond_hot_actor_devices"]:
                await trio.sleep(0.05)
        assert all(set(by_session) == {warm, small} for by_session in series.values()), series
    h.running.stop()


async def test_hot_actors_zero_exports_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_server(nursery, tmp_path / "data", hot_actors=0)
    sid = await h.create_session()
    async with devices(h, {sid: 1}, {sid: 5}), h.rest(None) as http:
        text = (await http.get("/metrics")).text
        assert "sessiond_changes_total" in text  # the aggregates are there
        assert "sessiond_hot_actor" not in text and "session=" not in text
    h.running.stop()


@pytest.mark.parametrize("bad", ["-1", "1001", "many"])
def test_hot_actors_setting_is_validated(bad: str) -> None:
    from api.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="HOT_ACTORS"):
        load_settings({"SESSIOND_HOT_ACTORS": bad})
    assert load_settings({"SESSIOND_HOT_ACTORS": "5"}).hot_actors == 5
    assert load_settings({}).hot_actors == 20
