"""`python -m bench.sendpath_probe`: process CPU per frame of one device's send path, in-process.

`Connection.deliver` plus the connection's writer task, one socket write per frame (the writer runs between two
frames), on a stand-in socket that only returns: what the transport itself costs per patch and per ack, without
the network, the codec of incoming frames or the actor. Used to measure what the latency histograms add
(README, "Watching actors"): run it on two trees (`PYTHONPATH=<other tree> python -m bench.sendpath_probe` with
this file copied there) and compare. Works with trees from before `Outgoing.born` and `Connection.await_ack`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

from actors.messages import Outgoing
from transport.connection import Connection

PATCH = {"t": "patch", "version": 1, "device": "d2", "ops": [{"op": "inc", "path": "/n"}]}
ACK = {"t": "ack", "id": 1, "version": 1}


class _Socket:
    async def send_message(self, data: str | bytes) -> None:
        pass

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        pass


async def probe(frames: int, repeats: int) -> dict[str, float]:
    """Best (lowest) process CPU µs per frame over `repeats` rounds of `frames`, for patches and for acks."""
    conn: Any = Connection(_Socket(), "d1", "sessiond.v1.json", 1024)  # type: ignore[arg-type]
    timed = "born" in Outgoing.__slots__
    results: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run_writer)
        await trio.lowlevel.checkpoint()
        for name, frame in (("patch", PATCH), ("ack", ACK)):
            best = float("inf")
            for _ in range(repeats):
                start = time.process_time()
                for _ in range(frames):
                    now = time.time()
                    if name == "ack" and hasattr(conn, "await_ack"):
                        conn.await_ack(1, 0, now)  # what the reader does for a request
                    conn.deliver(Outgoing(frame, now) if timed else Outgoing(frame))
                    await trio.lowlevel.checkpoint()  # the writer takes it: one write per frame
                best = min(best, (time.process_time() - start) / frames * 1e6)
            results[name] = best
        conn.close(1000, "done")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sendpath_probe", description=__doc__)
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, us in trio.run(probe, args.frames, args.repeats).items():
        print(f"{name}: {us:.3f} µs CPU per frame (best of {args.repeats} x {args.frames})")


if __name__ == "__main__":
    main()
