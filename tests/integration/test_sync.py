"""Two devices over the real server on loopback, with a plain WebSocket client."""

from __future__ import annotations

from tests.integration.harness import Harness, raw_device


async def test_two_devices_sync(server: Harness) -> None:
    sid = await server.create_session(state={"count": 0})
    async with raw_device(server, sid, "phone") as phone, raw_device(server, sid, "laptop") as laptop:
        assert phone.welcome and phone.welcome["mode"] == "full"
        assert phone.welcome["state"] == {"count": 0}
        await phone.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/count", "by": 2}]})
        ack = await phone.recv_type("ack")
        assert ack == {"t": "ack", "id": 1, "version": 1}
        patch = await laptop.recv_type("patch")
        assert patch["version"] == 1 and patch["device"] == "phone"
        assert patch["ops"] == [{"op": "inc", "path": "/count", "by": 2}]


async def test_hundred_patches_in_order(server: Harness) -> None:
    sid = await server.create_session()
    async with raw_device(server, sid, "a") as a, raw_device(server, sid, "b") as b:
        for i in range(100):
            await a.send({"t": "op", "id": i + 1, "ops": [{"op": "set", "path": f"/k{i}", "value": i}]})
        versions = [(await b.recv_type("patch"))["version"] for _ in range(100)]
        assert versions == list(range(1, 101))
        acks = [(await a.recv_type("ack"))["id"] for _ in range(100)]
        assert acks == list(range(1, 101))
    async with server.rest() as http:
        body = (await http.get(f"/v1/sessions/{sid}")).json()
        assert body["version"] == 100 and body["state"]["k99"] == 99
