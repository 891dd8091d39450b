"""The smallest trio-websocket fan-out server for the bench workload: the ceiling of our own transport.

No actors, no auth, no storage, no validation beyond what the load generator needs: `hello` → `welcome`,
`op` → `ack` to the sender and one `patch` (encoded once) to the other devices of the session, `pause`/`claim`
→ `ack` (+ `handoff` to all on claim). Same path and JSON frames as sessiond (DESIGN §3), so the same load
generator drives both unchanged. Run: `python -m bench.baseline --port N [--host H]`.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

JSON_SUBPROTOCOL = "sessiond.v1.json"


@dataclass(slots=True)
class Session:
    version: int = 0
    active: str | None = None
    devices: dict[str, WebSocketConnection] = field(default_factory=dict)
    lock: trio.Lock = field(default_factory=trio.Lock)  # one change fanned out at a time: patches stay in order


class BaselineServer:
    """Sessions created on first hello; state is not kept (the bench only checks the frames)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    async def handle(self, request: WebSocketRequest) -> None:
        """One device connection; never raises (an escaping error would tear down every connection)."""
        if request.path != "/v1/ws":
            await request.reject(404)
            return
        # Like sessiond: the JSON subprotocol when the client offers it (a client that offers one, e.g. Node's ws,
        # refuses a handshake that selects none), nothing when it offers none.
        subprotocol = JSON_SUBPROTOCOL if JSON_SUBPROTOCOL in request.proposed_subprotocols else None
        try:
            ws = await request.accept(subprotocol=subprotocol)
        except ConnectionClosed:
            return
        session: Session | None = None
        device = ""
        try:
            with trio.move_on_after(10):
                hello = orjson.loads(await ws.get_message())
                device = str(hello["device"])
                sid = str(hello["session"])
                session = self.sessions.setdefault(sid, Session())
                session.devices[device] = ws
                await ws.send_message(orjson.dumps({
                    "t": "welcome", "session": sid, "device": device, "version": session.version,
                    "mode": "full", "state": {}, "active": session.active,
                    "devices": [{"device": d, "kind": "other"} for d in session.devices],
                }).decode())
            if session is None:
                return
            while True:
                await self._on_frame(session, device, ws, orjson.loads(await ws.get_message()))
        except (ConnectionClosed, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        finally:
            if session is not None and session.devices.get(device) is ws:
                del session.devices[device]

    async def _on_frame(self, session: Session, device: str, ws: WebSocketConnection, frame: dict) -> None:
        async with session.lock:
            await self._apply(session, device, ws, frame)

    async def _apply(self, session: Session, device: str, ws: WebSocketConnection, frame: dict) -> None:
        kind = frame["t"]
        if kind == "op":
            session.version += 1
            version = session.version
            patch = orjson.dumps({"t": "patch", "version": version, "device": device, "ops": frame["ops"]}).decode()
            await ws.send_message(orjson.dumps({"t": "ack", "id": frame["id"], "version": version}).decode())
            await self._broadcast(session, patch, skip=device)
        elif kind in ("pause", "claim"):
            if kind == "pause":
                session.active = None
            else:
                session.active = device
            await ws.send_message(orjson.dumps({"t": "ack", "id": frame["id"], "version": session.version}).decode())
            if kind == "claim":
                handoff = orjson.dumps({"t": "handoff", "active": device, "version": session.version}).decode()
                await self._broadcast(session, handoff, skip=None)

    @staticmethod
    async def _broadcast(session: Session, message: str, skip: str | None) -> None:
        for other, peer in list(session.devices.items()):
            if other == skip:
                continue
            with contextlib.suppress(ConnectionClosed):
                await peer.send_message(message)


async def serve(host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound port through task_status."""
    server = BaselineServer()
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(serve_websocket, server.handle, host, port, None)
        task_status.started(ws_server.port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.host, args.port)



if __name__ == "__main__":
    main()
