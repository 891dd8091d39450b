"""The client SDK against the real server: sync, reconnect with resume, handoff, REST, slow consumers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from client import SessionError, open_session
from tests.integration.harness import Harness, start_server


@pytest.mark.parametrize("subprotocol", ["json", "msgpack"])
async def test_sdk_devices_converge(server: Harness, subprotocol: str) -> None:
    sid = await server.create_session(state={"n": 0})
    token = server.token()
    async with (
        open_session(server.ws_url, token=token, session=sid, device="a", subprotocol=subprotocol) as a,
        open_session(server.ws_url, token=token, session=sid, device="b", subprotocol=subprotocol) as b,
    ):
        async with trio.open_nursery() as n:
            for _ in range(25):
                n.start_soon(a.inc, "/n")
                n.start_soon(b.inc, "/n")
        await a.wait_version(50)
        await b.wait_version(50)
        assert a.state == b.state == {"n": 50}


async def test_sdk_conflict_and_invalid(server: Harness) -> None:
    sid = await server.create_session()
    async with open_session(server.ws_url, token=server.token(), session=sid, device="a") as a:
        await a.set("/x", 1, base=0)
        with pytest.raises(SessionError) as info:
            await a.set("/x", 2, base=0)
        assert info.value.code == "conflict" and info.value.version == 1
        with pytest.raises(SessionError) as info:
            await a.inc("/x/y")
        assert info.value.code == "invalid_op"
        assert a.state == {"x": 1}


async def test_sdk_resumes_after_server_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Graceful restart on the same ports and data dir: the device resumes and nothing acked is lost."""
    h = await start_server(nursery, tmp_path)
    sid = await h.create_session(state={"n": 0})
    token = h.token()
    async with open_session(h.ws_url, token=token, session=sid, device="a", backoff_base_s=0.05) as a:
        for _ in range(5):
            await a.inc("/n")
        ws_port, http_port = h.running.ws_port, h.running.http_port
        h.running.stop()
        with trio.fail_after(15):
            await h.stopped.wait()  # checkpointed and its ports closed: the next one can take them
        h2 = await start_server(nursery, tmp_path, ws_port=ws_port, http_port=http_port)
        assert await a.inc("/n") == 6
        assert a.state == {"n": 6}
        h2.running.stop()


async def test_sdk_handoff_and_rest_and_delete(server: Harness) -> None:
    sid = await server.create_session()
    token = server.token()
    async with (
        open_session(server.ws_url, token=token, session=sid, device="phone") as phone,
        open_session(server.ws_url, token=token, session=sid, device="laptop") as laptop,
    ):
        await phone.claim()
        with trio.fail_after(5):
            while laptop.active != "phone":
                await trio.sleep(0.01)
        await phone.pause()
        await laptop.claim()
        with trio.fail_after(5):
            while phone.active != "laptop":
                await trio.sleep(0.01)
        async with server.rest() as http:
            await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": "/from", "value": "rest"}]})
            await phone.wait_version(1)
            assert phone.state == laptop.state or await laptop.wait_version(1) is None
            assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 204
        with trio.fail_after(5):
            while not (phone.ended and laptop.ended):
                await trio.sleep(0.01)


async def test_slow_consumer_gets_fresh_welcome_or_is_cut(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A device that stops reading: its queue overflows, then it is resynced or disconnected (4008); others go on."""
    from prometheus_client import REGISTRY

    from tests.integration.harness import raw_device

    def slow_consumers() -> float:
        return sum(REGISTRY.get_sample_value("sessiond_slow_consumer_total", {"action": a}) or 0.0
                   for a in ("resync", "disconnect"))

    before = slow_consumers()
    h = await start_server(nursery, tmp_path, send_queue_frames=8, rate_limit="10000/10000")
    sid = await h.create_session()
    async with raw_device(h, sid, "writer") as writer, raw_device(h, sid, "sleeper") as sleeper:
        big = "x" * 30_000
        for i in range(400):
            await writer.send({"t": "op", "id": i + 1, "ops": [{"op": "set", "path": f"/k{i % 5}", "value": big}]})
        acks = 0
        with trio.fail_after(20):
            while acks < 400:
                if (await writer.recv())["t"] == "ack":
                    acks += 1
        code = await sleeper.closed_code(timeout=20)
        frames = [f["t"] for f in sleeper.inbox]
        assert code == 4008 or "welcome" in frames
    assert slow_consumers() > before
    h.running.stop()
