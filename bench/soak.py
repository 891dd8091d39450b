"""The `soak` scenario (issue 8): a long run under churn, dropped connections and a slice of hostile clients,
watching the server's memory (RSS over time, its slope after warm-up) and counting every increment.

Everything runs at once against one `sessiond serve`, for `--duration` seconds (default 35 min, 10 of warm-up):

- **Steady sessions.** S sessions x 2 SDK devices (client/sdk.py) send `inc /n` at R ops/s each, through a
  loopback TCP proxy that cuts one random connection every second: the SDK reconnects, resumes with its epoch and
  retransmits unacked ops with their original ids. Each device also lives for a random 10-60 s, then settles its
  requests, closes and is replaced by a fresh SDK instance with the same device id (an app restart).
- **Session churn.** One session after another is created over REST, given a device that sends 20 `inc`s, read
  back (the counter must be exactly 20) and deleted.
- **Hostile clients.** Several times a second, one of: a forged or expired token, a first frame that is not a
  hello, a malformed frame, an oversized frame, another user's session, a frame flood past the rate limit, a REST
  body that is not UTF-8. Each must get its documented answer (DESIGN §3/§4); anything else counts as unexpected.
- **Sampler.** Every few seconds: the server's RSS, open file descriptors and CPU.

At the end every steady session's counter must equal the increments acked (uncertain ones, ended without an
answer, may or may not count): `lost` and `doubled` must be 0. The RSS slope is a least-squares fit over the
samples after the warm-up; the goal is < 5 MB/h.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from bench.cluster import Writer
from bench.pods import Balancer, http
from bench.proc import process_cpu_s, process_rss_bytes
from bench.scenarios import Options, Progress, no_progress
from client.sdk import open_session
from client.wire import SessionError

RSS_SLOPE_GOAL_MB_H = 5.0
CHURN_INCS = 20
DEVICE_LIFE_S = (10.0, 60.0)
CUT_INTERVAL_S = 1.0
HOSTILE_INTERVAL_S = 0.3
HOSTILE_TIMEOUT_S = 10.0


# ---- a proxy whose connections can be cut one at a time ------------------------------------------------------


class CuttingProxy(Balancer):
    """A one-backend loopback balancer in front of the WebSocket port; `cut_one()` drops one live connection."""

    def __init__(self, target_port: int) -> None:
        super().__init__([target_port])
        self.live: dict[int, trio.CancelScope] = {}
        self.cuts = 0
        self._ids = 0

    async def _relay(self, client: trio.SocketStream) -> None:
        self._ids += 1
        key = self._ids
        with trio.CancelScope() as scope:
            self.live[key] = scope
            try:
                await super()._relay(client)
            finally:
                del self.live[key]

    def cut_one(self) -> bool:
        if not self.live:
            return False
        random.choice(list(self.live.values())).cancel()
        self.cuts += 1
        return True


# ---- hostile clients -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Hostile:
    """One kind of abuse and the answers it may get: error codes seen, then the close code."""

    name: str
    frames: Callable[[Soak], list[bytes | str]]
    errors: frozenset[str]
    closes: frozenset[int | None]  # None: the connection stays open (checked by a ping-pong after the error)
    token: Callable[[Soak], str] = lambda soak: soak.token
    session: Callable[[Soak], str] = lambda soak: soak.victim


def _hello(soak: Soak, *, token: str | None = None, session: str | None = None) -> str:
    return orjson.dumps({"t": "hello", "token": token or soak.token, "session": session or soak.victim,
                         "device": f"hostile-{random.randrange(10**6)}"}).decode()


HOSTILES: tuple[Hostile, ...] = (
    Hostile("forged_token", lambda s: [_hello(s, token=s.forged_token)], frozenset({"unauthorized"}),
            frozenset({4001})),
    Hostile("expired_token", lambda s: [_hello(s, token=s.expired_token())], frozenset({"unauthorized"}),
            frozenset({4001})),
    Hostile("not_hello_first", lambda s: ['{"t":"op","id":1,"ops":[]}'], frozenset({"bad_frame"}),
            frozenset({1002})),
    Hostile("malformed_frame", lambda s: [_hello(s), "{not json", '{"t":"op","id":"x"}'],
            frozenset({"bad_frame"}), frozenset({None})),
    Hostile("oversized_frame", lambda s: [_hello(s), orjson.dumps(
        {"t": "op", "id": 1, "ops": [{"op": "set", "path": "/big", "value": "x" * 70_000}]}).decode()],
        frozenset({"too_large"}), frozenset({None})),
    Hostile("other_users_session", lambda s: [_hello(s, token=s.mallory_token)], frozenset({"forbidden"}),
            frozenset({4003})),
    Hostile("flood", lambda s: [_hello(s), *[
        f'{{"t":"op","id":{10**12 + i},"ops":[{{"op":"inc","path":"/flood"}}]}}' for i in range(400)]],
            frozenset({"rate_limited"}), frozenset({None, 1008})),
)


# ---- the scenario ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Slot:
    """One steady device id; its successive SDK instances (lives) are Writers."""

    session: str
    device: str
    lives: list[Writer] = field(default_factory=list)


@dataclass(slots=True)
class Soak:
    target: Any
    opts: Options
    token: str = ""
    mallory_token: str = ""
    forged_token: str = ""
    victim: str = ""
    slots: list[Slot] = field(default_factory=list)
    churn: Counter[str] = field(default_factory=Counter)
    churn_problems: list[str] = field(default_factory=list)
    hostile: Counter[str] = field(default_factory=Counter)
    hostile_unexpected: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)  # (t, rss bytes, fds, cpu s)
    rest_statuses: Counter[int] = field(default_factory=Counter)

    def expired_token(self) -> str:
        secret = self.target.jwt_secret
        return jwt.encode({"sub": self.target.user, "exp": time.time() - 1.5}, secret, algorithm="HS256")


async def soak(target: Any, opts: Options, progress: Progress = no_progress) -> dict[str, Any]:
    """Run the soak against a sessiond target (REST and a known JWT secret are required)."""
    if target.http_url is None or target.jwt_secret is None or target.pid is None:
        return {"target": target.name, "failed": "soak needs sessiond started by the bench (REST, secret, pid)"}
    s = Soak(target, opts)
    s.token = target.token(ttl_s=int(opts.duration) + 3600)
    s.mallory_token = jwt.encode({"sub": "mallory", "exp": time.time() + opts.duration + 3600},
                                 target.jwt_secret, algorithm="HS256")
    s.forged_token = jwt.encode({"sub": target.user, "exp": time.time() + 3600}, "not-the-secret-" + "x" * 32,
                                algorithm="HS256")
    ids = await target.create_sessions(opts.sessions + 1, label="soak")
    s.victim, steady = ids[0], ids[1:]
    s.slots = [Slot(sid, f"d{j}") for sid in steady for j in range(2)]
    proxy = CuttingProxy(int(target.ws_url.rsplit(":", 1)[1].split("/", 1)[0]))
    started = trio.current_time()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        nursery.start_soon(_sampler, s, started, stop)
        async with trio.open_nursery() as load:
            for slot in s.slots:
                load.start_soon(_device_lives, s, slot, proxy.ws_url, stop)
            load.start_soon(_cutter, proxy, stop)
            load.start_soon(_session_churn, s, stop)
            load.start_soon(_hostiles, s, stop)
            with trio.move_on_after(opts.duration):
                while True:
                    await trio.sleep(1)
                    progress(trio.current_time() - started, opts.duration, _progress_info(s))
            stop.set()
        _take_sample(s, started)
        nursery.cancel_scope.cancel()
    finals = await _final_states(target, s.token, steady)
    return _result(s, proxy, finals, trio.current_time() - started)


def _progress_info(s: Soak) -> dict[str, Any]:
    rss = s.samples[-1][1] / 2**20 if s.samples else 0
    acked = sum(len(w.acks) for slot in s.slots for w in slot.lives)
    return {"rss MB": f"{rss:.0f}", "acked": acked, "churned": s.churn["sessions"],
            "hostile": sum(s.hostile.values())}


async def _device_lives(s: Soak, slot: Slot, url: str, stop: trio.Event) -> None:
    """Successive SDK instances for one device id, each living 10-60 s (the first starts at a random offset)."""
    await _sleep_or_stop(random.random() * 2, stop)
    while not stop.is_set():
        life = Writer(slot.session, slot.device)
        slot.lives.append(life)
        ends = trio.Event()
        go = trio.Event()
        go.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(life.run, url, s.token, s.opts.rate, 30.0, lambda: None, go, ends)
            await _sleep_or_stop(random.uniform(*DEVICE_LIFE_S), stop)
            ends.set()


async def _cutter(proxy: CuttingProxy, stop: trio.Event) -> None:
    while not stop.is_set():
        await _sleep_or_stop(CUT_INTERVAL_S, stop)
        proxy.cut_one()


async def _session_churn(s: Soak, stop: trio.Event) -> None:
    """Create, use, check and delete sessions one after another."""
    t = s.target
    while not stop.is_set():
        status, body = await http("POST", f"{t.http_url}/v1/sessions", {"name": "churn", "state": {"n": 0}}, s.token)
        s.rest_statuses[status] += 1
        if status != 201 or not isinstance(body, dict):
            s.churn["create_failed"] += 1
            await _sleep_or_stop(1.0, stop)
            continue
        sid = str(body["id"])
        try:
            async with open_session(t.ws_url, token=s.token, session=sid, device="churner") as dev:
                for _ in range(CHURN_INCS):
                    await dev.inc("/n")
        except SessionError as exc:
            s.churn[f"device_{exc.code}"] += 1
        status, body = await http("GET", f"{t.http_url}/v1/sessions/{sid}", token=s.token)
        s.rest_statuses[status] += 1
        n = body.get("state", {}).get("n") if isinstance(body, dict) else None
        if n != CHURN_INCS:
            s.churn["mismatched"] += 1
            if len(s.churn_problems) < 20:
                s.churn_problems.append(f"{sid}: n={n} after {CHURN_INCS} acked incs (status {status})")
        status, _ = await http("DELETE", f"{t.http_url}/v1/sessions/{sid}", token=s.token)
        s.rest_statuses[status] += 1
        s.churn["sessions"] += 1
        await _sleep_or_stop(0.2, stop)


async def _hostiles(s: Soak, stop: trio.Event) -> None:
    i = 0
    while not stop.is_set():
        kind = HOSTILES[i % len(HOSTILES)]
        i += 1
        outcome = await _one_hostile(s, kind)
        s.hostile[kind.name] += 1
        if outcome and len(s.hostile_unexpected) < 50:
            s.hostile_unexpected.append(f"{kind.name}: {outcome}")
        elif outcome:
            s.hostile["unexpected_unrecorded"] += 1
        if i % len(HOSTILES) == 0:
            await _bad_utf8_rest(s)
        await _sleep_or_stop(HOSTILE_INTERVAL_S, stop)


async def _one_hostile(s: Soak, kind: Hostile) -> str | None:
    """None when the server answered as documented, else what happened instead."""
    seen: list[str] = []
    try:
        with trio.fail_after(HOSTILE_TIMEOUT_S):
            async with open_websocket_url(s.target.ws_url, subprotocols=["sessiond.v1.json"]) as ws:
                for frame in kind.frames(s):
                    try:
                        await ws.send_message(frame)
                    except ConnectionClosed:
                        break
                close: int | None = None
                try:
                    while not (set(seen) & kind.errors):
                        msg = await ws.get_message()
                        for f in _frames(msg):
                            if f.get("t") == "error":
                                seen.append(str(f.get("code")))
                    if None in kind.closes:
                        await _ping_while_draining(ws)  # still open and serving: the abuse cost it nothing else
                        return None
                    await ws.get_message()
                except ConnectionClosed as exc:
                    close = exc.reason.code
                if close not in kind.closes:
                    return f"errors {dict(Counter(seen))}, close {close} (expected {sorted(map(str, kind.closes))})"
                if set(seen) & kind.errors:
                    return None
                return f"errors {dict(Counter(seen))} (expected one of {sorted(kind.errors)})"
    except trio.TooSlowError:
        return f"no documented answer within {HOSTILE_TIMEOUT_S} s (errors {dict(Counter(seen))})"
    except (HandshakeError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def _ping_while_draining(ws: Any) -> None:
    """Ping and wait for the pong; the answers still queued must be read meanwhile (trio-websocket's reader stops
    at a full message queue, and the pong would wait behind them)."""
    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            while True:
                await ws.get_message()

        nursery.start_soon(drain)
        await ws.ping()
        nursery.cancel_scope.cancel()


def _frames(msg: str | bytes) -> list[dict[str, Any]]:
    data = orjson.loads(msg)
    return data if isinstance(data, list) else [data]


async def _bad_utf8_rest(s: Soak) -> None:
    """A PATCH whose JSON body is not UTF-8: 400 bad_frame, never a 5xx."""
    body = b'{"ops":[{"op":"set","path":"/x","value":"\xff\xfe"}]}'

    def send() -> int:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{s.target.http_url}/v1/sessions/{s.victim}", data=body, method="PATCH",
                                     headers={"Authorization": f"Bearer {s.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=HOSTILE_TIMEOUT_S) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    status = await trio.to_thread.run_sync(send)
    s.hostile["rest_bad_utf8"] += 1
    if status != 400:
        s.hostile_unexpected.append(f"rest_bad_utf8: status {status} (expected 400)")


async def _sampler(s: Soak, started: float, stop: trio.Event) -> None:
    interval = max(1.0, min(10.0, s.opts.duration / 200))
    while not stop.is_set():
        _take_sample(s, started)
        await _sleep_or_stop(interval, stop)


def _take_sample(s: Soak, started: float) -> None:
    pid = s.target.pid
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    s.samples.append((trio.current_time() - started, process_rss_bytes(pid), fds, process_cpu_s(pid)))


async def _sleep_or_stop(seconds: float, stop: trio.Event) -> None:
    with trio.move_on_after(seconds):
        await stop.wait()


async def _final_states(target: Any, token: str, sessions: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(8)

    async def one(sid: str) -> None:
        async with limiter:
            for _ in range(20):
                status, body = await http("GET", f"{target.http_url}/v1/sessions/{sid}", token=token)
                if status == 200 and isinstance(body, dict):
                    out[sid] = body
                    return
                await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        for sid in sessions:
            nursery.start_soon(one, sid)
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per hour (nan with fewer than 3 points)."""
    if len(points) < 3:
        return math.nan
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return math.nan
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


def _result(s: Soak, proxy: CuttingProxy, finals: dict[str, dict[str, Any]], elapsed: float) -> dict[str, Any]:
    lives = [w for slot in s.slots for w in slot.lives]
    lost = doubled = unreadable = 0
    problems: list[str] = []
    for sid in sorted({slot.session for slot in s.slots}):
        mine = [w for slot in s.slots if slot.session == sid for w in slot.lives]
        acked = sum(len(w.acks) for w in mine)
        uncertain = sum(w.uncertain + w.unsettled for w in mine)
        body = finals.get(sid)
        if body is None:
            unreadable += 1
            problems.append(f"{sid}: final state unreadable")
            continue
        n = int(body.get("state", {}).get("n", 0))
        if n < acked:
            lost += acked - n
            problems.append(f"{sid}: n={n} < acked {acked}")
        if n > acked + uncertain:
            doubled += n - acked - uncertain
            problems.append(f"{sid}: n={n} > acked {acked} + uncertain {uncertain}")
    after = [(t, rss / 2**20) for t, rss, _, _ in s.samples if t >= s.opts.warmup]
    rss_mb = [rss / 2**20 for _, rss, _, _ in s.samples]
    cpu = [c for *_, c in s.samples]
    hostile_total = sum(v for k, v in s.hostile.items() if k != "unexpected_unrecorded")
    return {
        "target": s.target.name,
        "storage": s.target.info.get("storage", ""),
        "duration_s": elapsed,
        "rss_start_mb": rss_mb[0] if rss_mb else math.nan,
        "rss_after_warmup_mb": after[0][1] if after else math.nan,
        "rss_end_mb": rss_mb[-1] if rss_mb else math.nan,
        "rss_max_mb": max(rss_mb) if rss_mb else math.nan,
        "rss_slope_mb_per_h": slope_per_hour(after),
        "rss_slope_goal_mb_per_h": RSS_SLOPE_GOAL_MB_H,
        "fds_start": s.samples[0][2] if s.samples else -1,
        "fds_end": s.samples[-1][2] if s.samples else -1,
        "cpu_util": (cpu[-1] - cpu[0]) / elapsed if len(cpu) > 1 and elapsed else math.nan,
        "steady_sessions": len({slot.session for slot in s.slots}),
        "device_lives": len(lives),
        "acked": sum(len(w.acks) for w in lives),
        "refused": dict(sum((w.refused for w in lives), Counter())),
        "uncertain": sum(w.uncertain + w.unsettled for w in lives),
        "reconnects": sum(w.reconnects for w in lives),
        "connections_cut": proxy.cuts,
        "device_failures": [w.failed or w.crashed for w in lives if w.failed or w.crashed][:20],
        "lost": lost,
        "doubled": doubled,
        "unreadable": unreadable,
        "problems": problems[:20],
        "churned_sessions": s.churn["sessions"],
        "churn": dict(s.churn),
        "churn_problems": s.churn_problems,
        "hostile_clients": hostile_total,
        "hostile": dict(s.hostile),
        "hostile_unexpected": len(s.hostile_unexpected) + s.hostile.get("unexpected_unrecorded", 0),
        "hostile_unexpected_examples": s.hostile_unexpected[:20],
        "rest_statuses": {str(k): v for k, v in sorted(s.rest_statuses.items())},
        "series": {"rss": [[round(t, 1), round(rss / 2**20, 2), fds] for t, rss, fds, _ in s.samples],
                   "warmup_s": s.opts.warmup},
    }


def correctness_failures(result: dict[str, Any]) -> list[str]:
    """What makes a soak run fail: lost or doubled changes, churn mismatches, unexpected answers, a leak."""
    out = []
    if result.get("lost"):
        out.append(f"{result['lost']} acked increment(s) lost: {result.get('problems')}")
    if result.get("doubled"):
        out.append(f"{result['doubled']} increment(s) applied twice: {result.get('problems')}")
    if result.get("unreadable"):
        out.append(f"{result['unreadable']} session(s) unreadable at the end")
    if result.get("churn", {}).get("mismatched"):
        out.append(f"churned sessions with a wrong count: {result.get('churn_problems')}")
    if result.get("hostile_unexpected"):
        out.append(f"hostile clients answered otherwise than documented: {result.get('hostile_unexpected_examples')}")
    if result.get("device_failures"):
        out.append(f"devices that could not run: {result['device_failures']}")
    slope = result.get("rss_slope_mb_per_h")
    if isinstance(slope, float) and not math.isnan(slope) and slope >= RSS_SLOPE_GOAL_MB_H \
            and result.get("duration_s", 0) >= 600:
        out.append(f"RSS grows {slope:.1f} MB/h after warm-up (goal < {RSS_SLOPE_GOAL_MB_H})")
    return out


Scenario = Callable[[Any, Options, Progress], Awaitable[dict[str, Any]]]
