"""The lean load generator: raw trio-websocket clients speaking the v1 JSON frames (not the SDK, so it stays cheap).

Each op carries its send time: `{"op":"set","path":"/d/<device>","value":{"t":<ns>,"n":<seq>}}`, so a receiving
device measures delivery latency without a clock shared with the server (all devices live in this process).
Only ops sent inside the measured window count towards latency; deliveries are counted both by receive time
(for throughput and server CPU per message) and by send time (to compare delivered with offered).
"""

from __future__ import annotations

import gc
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

from bench.stats import Latency, Timeline

now_ns = time.perf_counter_ns


@dataclass(slots=True)
class Recorder:
    """Everything the devices observe; the window is [w0_ns, w1_ns) in perf_counter_ns."""

    w0_ns: int = 1 << 62
    w1_ns: int = 1 << 62
    ack: Latency = field(default_factory=Latency)
    delivery: Latency = field(default_factory=Latency)
    sent_total: int = 0
    sent_in_window: int = 0
    acked_in_window: int = 0
    delivered_total: int = 0
    delivered_in_window: int = 0  # received inside the window (throughput, CPU per message)
    delivered_of_window_ops: int = 0  # of ops sent inside the window, whenever received (vs offered)
    errors: Counter[str] = field(default_factory=Counter)
    lag_events: int = 0  # a sender fell more than 1 s behind its schedule (generator starved or blocked)
    deliveries: Timeline = field(default_factory=Timeline)
    sends: Timeline = field(default_factory=Timeline)

    def in_window(self, t_ns: int) -> bool:
        return self.w0_ns <= t_ns < self.w1_ns

    def start_clock(self, t0_ns: int, warmup_s: float, duration_s: float) -> None:
        self.deliveries.t0_ns = self.sends.t0_ns = t0_ns
        # about 40 points over the run, between 0.1 s and 1 s each
        self.deliveries.bucket_s = self.sends.bucket_s = max(0.1, min(1.0, round((warmup_s + duration_s) / 40, 1)))
        self.w0_ns = t0_ns + int(warmup_s * 1e9)
        self.w1_ns = self.w0_ns + int(duration_s * 1e9)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    session: str
    device: str
    url: str | None = None  # this device's server (a pod of a cluster); None: the fleet's URL


class Device:
    """One connection: sends ops/pause/claim, and a receive loop that records acks and patches."""

    def __init__(self, spec: DeviceSpec, ws: WebSocketConnection, rec: Recorder, *, keep_log: bool = False) -> None:
        self.spec = spec
        self.ws = ws
        self.rec = rec
        self.next_id = 0
        self.seq = 0
        self.pending: dict[int, int] = {}  # op id -> send time
        self.waiters: dict[int, trio.Event] = {}
        self.replies: dict[int, dict[str, Any]] = {}
        self.handoff_seen = trio.Event()
        self.last_version = -1
        self.keep_log = keep_log
        self.patches: list[tuple[int, str, int]] = []  # (version, from device, n) when keep_log
        self.acked: list[tuple[int, int]] = []  # (version, n) of own acked ops when keep_log
        self._n_of: dict[int, int] = {}
        self.closed = False

    async def send_op(self) -> int:
        """Send one small `set` op stamped with its send time; returns its id."""
        self.next_id += 1
        self.seq += 1
        op_id, t = self.next_id, now_ns()
        value = {"t": t, "n": self.seq}
        frame = {"t": "op", "id": op_id, "ops": [{"op": "set", "path": f"/d/{self.spec.device}", "value": value}]}
        self.pending[op_id] = t
        if self.keep_log:
            self._n_of[op_id] = self.seq
        rec = self.rec
        rec.sent_total += 1
        rec.sends.add(t)
        if rec.in_window(t):
            rec.sent_in_window += 1
        await self.ws.send_message(orjson.dumps(frame).decode())
        return op_id

    async def request(self, kind: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """Send `pause`/`claim` (or wait for an op's ack with kind="op") and wait for its ack; None on timeout."""
        if kind == "op":
            op_id = await self.send_op()
        else:
            self.next_id += 1
            op_id = self.next_id
            self.pending[op_id] = now_ns()
        event = self.waiters[op_id] = trio.Event()
        if kind != "op":
            await self.ws.send_message(orjson.dumps({"t": kind, "id": op_id}).decode())
        with trio.move_on_after(timeout):
            await event.wait()
        self.waiters.pop(op_id, None)
        reply = self.replies.pop(op_id, None)
        if reply is None:
            self.rec.errors[f"{kind}_timeout"] += 1
        return reply

    async def receive_loop(self) -> None:
        """Dispatch every frame (single or batched as an array) until the connection closes."""
        try:
            while True:
                frames = orjson.loads(await self.ws.get_message())
                if isinstance(frames, list):
                    for frame in frames:
                        self._on_frame(frame)
                else:
                    self._on_frame(frames)
        except ConnectionClosed:
            pass
        finally:
            if not self.closed:
                self.rec.errors["disconnected"] += 1
            self.closed = True

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        rec = self.rec
        if kind == "patch":
            t = now_ns()
            rec.delivered_total += 1
            rec.deliveries.add(t)
            if rec.in_window(t):
                rec.delivered_in_window += 1
            version = frame.get("version", 0)
            if version <= self.last_version:
                rec.errors["patch_out_of_order"] += 1
            self.last_version = max(self.last_version, version)
            for op in frame.get("ops", ()):
                value = op.get("value")
                if isinstance(value, dict) and "t" in value:
                    sent = value["t"]
                    if rec.in_window(sent):
                        rec.delivered_of_window_ops += 1
                        rec.delivery.add(t - sent)
                    if self.keep_log:
                        self.patches.append((version, frame.get("device", ""), value.get("n", -1)))
        elif kind == "ack":
            op_id = frame.get("id", -1)
            sent = self.pending.pop(op_id, None)
            if sent is None:
                rec.errors["unexpected_ack"] += 1
                return
            if op_id in self._n_of:
                self.acked.append((frame.get("version", -1), self._n_of.pop(op_id)))
            if rec.in_window(sent):
                rec.acked_in_window += 1
                rec.ack.add(now_ns() - sent)
            self._wake(op_id, frame)
        elif kind == "error":
            rec.errors[str(frame.get("code", "error"))] += 1
            op_id = frame.get("id")
            if op_id is not None:
                self.pending.pop(op_id, None)
                self._wake(op_id, frame)
        elif kind == "handoff":
            self.handoff_seen.set()
        elif kind == "welcome":
            rec.errors["resync_welcome"] += 1  # a welcome after the first one: the server made us catch up
        elif kind == "ended":
            rec.errors["ended"] += 1

    def _wake(self, op_id: int, frame: dict[str, Any]) -> None:
        event = self.waiters.get(op_id)
        if event is not None:
            self.replies[op_id] = frame
            event.set()

    async def close(self) -> None:
        self.closed = True
        with trio.move_on_after(2):
            await self.ws.aclose()


async def connect_device(
    nursery: trio.Nursery, url: str, spec: DeviceSpec, token: str | None, rec: Recorder, *, keep_log: bool = False
) -> Device:
    """Open, say hello, wait for the welcome; the receive loop then runs in `nursery`."""
    ws = await connect_websocket_url(nursery, url, message_queue_size=64, max_message_size=16 << 20)
    hello: dict[str, Any] = {"t": "hello", "session": spec.session, "device": spec.device, "kind": "other"}
    if token:
        hello["token"] = token
    await ws.send_message(orjson.dumps(hello).decode())
    with trio.fail_after(15):
        while True:
            first = orjson.loads(await ws.get_message())
            frames = first if isinstance(first, list) else [first]
            kinds = [f.get("t") for f in frames]
            if "welcome" in kinds:
                break
            if "error" in kinds:
                raise ConnectionError(f"hello refused: {frames}")
    device = Device(spec, ws, rec, keep_log=keep_log)
    nursery.start_soon(device.receive_loop)
    return device


CONNECT_ERRORS = (OSError, HandshakeError, ConnectionClosed, ConnectionError, trio.TooSlowError)


async def run_device(url: str, spec: DeviceSpec, token: str | None, rec: Recorder, keep_log: bool,
                     *, task_status: trio.TaskStatus[Device | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Own nursery per connection, so an error inside trio-websocket's reader task (e.g. answering a ping
    while closing: wsproto LocalProtocolError) ends this device only, never the whole fleet."""
    device: Device | None = None
    started = False
    try:
        async with trio.open_nursery() as inner:
            try:
                device = await connect_device(inner, url, spec, token, rec, keep_log=keep_log)
            except CONNECT_ERRORS:
                rec.errors["connect_failed"] += 1
                inner.cancel_scope.cancel()
            started = True
            task_status.started(device)
    except* Exception:
        if device is None or not device.closed:
            rec.errors["client_internal"] += 1
        if device is not None:
            device.closed = True
        if not started:
            task_status.started(None)


@asynccontextmanager
async def open_fleet(
    url: str,
    specs: Sequence[DeviceSpec],
    token: str | None,
    rec: Recorder,
    *,
    concurrency: int = 200,
    keep_log: bool = False,
    on_connect: Callable[[int], None] | None = None,
) -> AsyncIterator[list[Device]]:
    """Connect every device (at most `concurrency` handshakes at once); failures are counted, not raised."""
    devices: list[Device] = []
    limiter = trio.Semaphore(concurrency)
    async with trio.open_nursery() as nursery:

        async def one(spec: DeviceSpec) -> None:
            async with limiter:
                device = await nursery.start(run_device, spec.url or url, spec, token, rec, keep_log)
                if device is not None:
                    devices.append(device)
                if on_connect:
                    on_connect(len(devices))

        async with trio.open_nursery() as connecting:
            for spec in specs:
                connecting.start_soon(one, spec)
        try:
            yield devices
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as closing:
                    for device in devices:
                        closing.start_soon(device.close)
            nursery.cancel_scope.cancel()


async def send_at_rate(device: Device, rate: float, until_ns: int) -> None:
    """Open-loop sender: `rate` ops/s from a random phase until `until_ns`; catches up at most 1 s of lag."""
    interval = 1.0 / rate
    deadline = trio.current_time() + random.random() * interval
    until = trio.current_time() + (until_ns - now_ns()) / 1e9
    while deadline < until and not device.closed:
        await trio.sleep_until(deadline)
        try:
            await device.send_op()
        except ConnectionClosed:
            return
        deadline += interval
        lag = trio.current_time() - deadline
        if lag > 1.0:
            device.rec.lag_events += 1
            deadline += lag


async def wait_drained(devices: Sequence[Device], rec: Recorder, expected: int, timeout: float) -> None:
    """Wait until no ack is pending and `expected` window deliveries arrived, or `timeout` passed."""
    with trio.move_on_after(timeout):
        while True:
            if rec.delivered_of_window_ops >= expected and not any(d.pending for d in devices if not d.closed):
                return
            await trio.sleep(0.05)


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic GC while measuring: a full collection over thousands of connections stalls the generator for
    tens of ms, which shows up as server latency. The workload makes almost no cycles; collect afterwards."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()
