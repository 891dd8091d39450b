"""Make docs/sessiond-top.txt and docs/sessiond-top.png: `sessiond top --once` on two real pods with traffic.

Needs the local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, user postgres); uses a key prefix and a
database of its own (`sessiond_docs`) and removes both afterwards. Run: `.venv/bin/python scripts/top_screenshot.py`
(matplotlib, from the `bench` extra, for the PNG).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import orjson
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
SESSIOND = str(Path(sys.executable).with_name("sessiond"))
SECRET = secrets.token_urlsafe(32)
PREFIX = f"sessiond-docs-{secrets.token_hex(4)}:"
DATABASE = "sessiond_docs"
# (owner, devices, ops/s of the first device, initial state padding): sessions of different activity
PLAN = [("alice", 3, 20.0, 0), ("alice", 2, 6.0, 300), ("bob", 4, 2.0, 600), ("carol", 1, 1.0, 900),
        ("bob", 2, 0.0, 1200), ("dave", 1, 0.0, 1500), ("erin", 6, 0.5, 1800)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user: str, roles: tuple[str, ...] = ()) -> str:
    return jwt.encode({"sub": user, "roles": list(roles), "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def device(ws_url: str, sid: str, name: str, user: str, rate: float, stop: trio.Event) -> None:
    async with open_websocket_url(ws_url) as ws:
        hello = {"t": "hello", "token": token(user), "session": sid, "device": name}
        await ws.send_message(orjson.dumps(hello).decode())

        async def drain() -> None:
            while True:
                await ws.get_message()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            n = 0
            while not stop.is_set():
                if not rate:
                    await stop.wait()
                    break
                n += 1
                op = {"t": "op", "id": n, "ops": [{"op": "set", "path": f"/k{n % 50}", "value": "x" * 100}]}
                await ws.send_message(orjson.dumps(op).decode())
                await trio.sleep(1 / rate)
            nursery.cancel_scope.cancel()


def start_pods(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[tuple[str, str]]]:
    procs, urls = [], []
    for i in (1, 2):
        http_port, ws_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
        env.update({
            "SESSIOND_HTTP_PORT": str(http_port), "SESSIOND_WS_PORT": str(ws_port), "SESSIOND_JWT_SECRET": SECRET,
            "SESSIOND_REDIS_URL": "redis://127.0.0.1:6379/0", "SESSIOND_REDIS_PREFIX": PREFIX,
            "SESSIOND_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{DATABASE}",
            "SESSIOND_DURABILITY": "redis", "SESSIOND_POD_ID": f"pod-{i}",
            "SESSIOND_DATA_DIR": str(workdir / f"pod-{i}"),
            "SESSIOND_LOG_LEVEL": "warning", "SESSIOND_LOG_FORMAT": "json", "SESSIOND_ALLOW_DURABILITY_SWITCH": "1",
        })
        log = open(workdir / f"pod-{i}.log", "wb")  # noqa: SIM115 (lives as long as the pod)
        procs.append(subprocess.Popen([SESSIOND, "serve"], env=env, stdout=log, stderr=log))
        urls.append((f"http://127.0.0.1:{http_port}", f"ws://127.0.0.1:{ws_port}/v1/ws"))
    return procs, urls


async def screenshot(urls: list[tuple[str, str]]) -> bytes:
    async with httpx.AsyncClient(timeout=10) as http:
        for url, _ in urls:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await http.get(url + "/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.1)
        await trio.sleep(2)  # both pods see each other
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for j, (user, devices, rate, pad) in enumerate(PLAN):
                body = {"name": f"s{j}", "state": {"pad": "y" * pad}}
                r = await http.post(urls[0][0] + "/v1/sessions", json=body,
                                    headers={"Authorization": f"Bearer {token(user)}"})
                sid = r.json()["id"]
                for d in range(devices):
                    nursery.start_soon(device, urls[d % 2][1], sid, f"dev{d}", user, rate if d == 0 else 0.0, stop)
            await trio.sleep(6)  # the change rates settle (a 5 s average)
            done = await trio.run_process(
                [SESSIOND, "top", "--once", "--width", "132", "--url", urls[0][0], "--token", token("ops", ("admin",))],
                capture_stdout=True,
            )
            stop.set()
            nursery.cancel_scope.cancel()
    return bytes(done.stdout)


def render_png(text: str, path: Path) -> None:
    """The frame on a terminal-like background (monospace; the column header reversed like in curses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lines = text.rstrip("\n").splitlines()
    cols = max(len(line) for line in lines)
    char_w, line_h, margin = 0.0925, 0.2, 0.2  # inches, DejaVu Sans Mono 11 pt
    width, height = cols * char_w + 2 * margin, len(lines) * line_h + 2 * margin
    fig = plt.figure(figsize=(width, height), dpi=110)
    fig.patch.set_facecolor("#1e1e1e")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for i, line in enumerate(lines):
        y = 1 - (margin + (i + 0.8) * line_h) / height
        style: dict[str, str] = {"color": "#d4d4d4"}
        if line.startswith("SESSION"):
            ax.add_patch(Rectangle((margin / width, y - 0.25 * line_h / height), cols * char_w / width,
                                   line_h / height, color="#d4d4d4", transform=ax.transAxes))
            style = {"color": "#1e1e1e"}
        elif i == 0:
            style = {"color": "#ffffff", "fontweight": "bold"}
        ax.text(margin / width, y, line, family="DejaVu Sans Mono", fontsize=11, transform=ax.transAxes,
                va="baseline", **style)  # type: ignore[arg-type]
    fig.savefig(path, facecolor=fig.get_facecolor())


def main() -> None:
    import tempfile

    import redis

    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {DATABASE}"],
                   capture_output=True, check=False)
    with tempfile.TemporaryDirectory() as tmp:
        procs, urls = start_pods(Path(tmp))
        try:
            frame = trio.run(screenshot, urls)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(20)
            client = redis.Redis()
            keys = list(client.scan_iter(PREFIX + "*"))
            if keys:
                client.delete(*keys)
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE {DATABASE} WITH (FORCE)"], capture_output=True, check=False)
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "sessiond-top.txt").write_bytes(frame)
    render_png(frame.decode(), docs / "sessiond-top.png")
    print(frame.decode())


if __name__ == "__main__":
    main()
