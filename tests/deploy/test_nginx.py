"""deploy/nginx: the gateway config, rendered by deploy/nginx/render.py, run by a real nginx in front of sessiond.

Each test renders the template for loopback (free ports, a throwaway CA from trustme, a tiny fake web build), checks
it with `nginx -t`, and runs nginx in the foreground (`daemon off`, `master_process off`: one process, its own
prefix, pid and logs in a tmp dir) in front of an in-process sessiond; the process is killed at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trustme
from prometheus_client import REGISTRY
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.integration.harness import Harness, RawDevice, start_server

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "deploy" / "nginx" / "render.py"
TEMPLATE = ROOT / "deploy" / "nginx" / "sessiond.conf"
HOST = "127.0.0.1"
APP_JS = "console.log('sessiond test build');\n"


def nginx_binary() -> str:
    """The real nginx (scripts/tools.sh installs nginx-light); missing is a failure, not a skip."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    assert exe, "nginx is missing: run scripts/tools.sh ensure (Debian package nginx-light)"
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def render(*assignments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, str(RENDER), *assignments], capture_output=True, text=True, timeout=30, env=clean
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Layout:
    """Where one nginx instance keeps its files (the prefix), and the ports it listens on."""

    prefix: Path
    http_port: int
    https_port: int

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"


def write_layout(prefix: Path, ca: trustme.CA, rest_port: int, ws_port: int, **gateway: str) -> Layout:
    """Certificates, a fake web build, the rendered sessiond.conf and a main nginx.conf that includes it."""
    prefix.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(prefix / "tls.pem")  # one file: key + chain, both work
    web = prefix / "web"
    (web / "assets").mkdir(parents=True, exist_ok=True)
    (web / "index.html").write_text("<!doctype html><title>sessiond test build</title>\n")
    (web / "assets" / "index-abc123.js").write_text(APP_JS)
    (web / "manifest.webmanifest").write_text('{"name": "sessiond"}\n')
    layout = Layout(prefix, free_port(), free_port())
    values = {
        "GATEWAY_HTTP_LISTEN": f"{HOST}:{layout.http_port}",
        "GATEWAY_HTTPS_LISTEN": f"{HOST}:{layout.https_port}",
        "GATEWAY_PUBLIC_HTTPS_PORT": str(layout.https_port),
        "GATEWAY_TLS_CERT": str(prefix / "tls.pem"),
        "GATEWAY_TLS_KEY": str(prefix / "tls.pem"),
        "GATEWAY_REST_UPSTREAM": f"{HOST}:{rest_port}",
        "GATEWAY_WS_UPSTREAM": f"{HOST}:{ws_port}",
        "GATEWAY_WEB_ROOT": str(web),
        **gateway,
    }
    done = render("-o", str(prefix / "sessiond.conf"), *(f"{k}={v}" for k, v in values.items()))
    assert done.returncode == 0, done.stderr
    (prefix / "tmp").mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    layout.conf.write_text(
        f"""daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {prefix}/access.log;
{temp_paths}
    include {prefix}/sessiond.conf;
}}
"""
    )
    return layout


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True, timeout=30
    )


async def _wait_listening(proc: subprocess.Popen[bytes], layout: Layout, deadline_s: float = 10.0) -> str | None:
    """None once nginx accepts on both ports; else why it did not start (it exited)."""
    with trio.fail_after(deadline_s):
        while True:
            if proc.poll() is not None:
                return (layout.prefix / "stderr.log").read_text() + (layout.prefix / "error.log").read_text()
            if not (layout.prefix / "nginx.pid").exists():  # written once nginx holds its listening sockets
                await trio.sleep(0.02)
                continue
            try:
                for port in (layout.http_port, layout.https_port):
                    stream = await trio.open_tcp_stream(HOST, port)
                    await stream.aclose()
                return None
            except OSError:
                await trio.sleep(0.02)


class PortTaken(Exception):
    """nginx could not bind a port chosen as free."""


def _spawn_nginx(layout: Layout) -> subprocess.Popen[bytes]:
    """nginx in the foreground (the config says `daemon off`), its output in the prefix."""
    with open(layout.prefix / "stderr.log", "wb") as stderr:
        return subprocess.Popen(
            [nginx_binary(), "-p", str(layout.prefix), "-c", str(layout.conf)], stdout=stderr, stderr=stderr
        )


@asynccontextmanager
async def running_nginx(layout: Layout) -> AsyncIterator[Layout]:
    checked = nginx_test(layout.conf)
    assert checked.returncode == 0, checked.stderr
    proc = _spawn_nginx(layout)
    try:
        problem = await _wait_listening(proc, layout)
        if problem is not None and "Address already in use" in problem:
            raise PortTaken(problem)
        assert problem is None, f"nginx did not start: {problem}"
        yield layout
    finally:
        proc.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Gateway:
    """A sessiond behind a running nginx, and clients that trust the test CA."""

    server: Harness
    layout: Layout
    ca: trustme.CA

    def tls(self, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.maximum_version = maximum
        return context

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.layout.https_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://{HOST}:{self.layout.https_port}/v1/ws"

    def http(self, user: str | None = "alice") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.server.token(user)}"} if user else {}
        return httpx.AsyncClient(base_url=self.base_url, verify=self.tls(), headers=headers, timeout=10)

    async def create_session(self, state: dict[str, Any]) -> str:
        async with self.http() as http:
            r = await http.post("/v1/sessions", json={"name": "gw", "state": state})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    @asynccontextmanager
    async def device(self, session: str, device: str) -> AsyncIterator[RawDevice]:
        async with open_websocket_url(self.ws_url, ssl_context=self.tls()) as ws:
            dev = RawDevice(ws)
            await dev.send({"t": "hello", "token": self.server.token("alice"), "session": session, "device": device})
            dev.welcome = await dev.recv_type("welcome")
            yield dev


@asynccontextmanager
async def gateway(
    nursery: trio.Nursery, tmp: Path, ca: trustme.CA, server: dict[str, Any] | None = None, **values: str
) -> AsyncIterator[Gateway]:
    """sessiond (settings `server`) behind nginx (template values `values`)."""
    h = await start_server(nursery, tmp / "data", **(server or {}))
    try:
        for attempt in range(3):  # a free port can be taken by someone else before nginx binds it
            layout = write_layout(tmp / f"nginx{attempt}", ca, h.running.http_port, h.running.ws_port, **values)
            try:
                async with running_nginx(layout):
                    yield Gateway(h, layout, ca)
                return
            except PortTaken:
                continue
        raise AssertionError("nginx found no free ports in 3 attempts")
    finally:
        h.running.stop()


async def _handshake(port: int, context: ssl.SSLContext) -> str:
    with trio.fail_after(5):
        stream = await trio.open_ssl_over_tcp_stream(HOST, port, ssl_context=context, https_compatible=True)
        try:
            await stream.do_handshake()
            return str(stream.version())
        finally:
            await trio.aclose_forcefully(stream)


def _rest_2xx_at_sessiond() -> float:
    """REST calls sessiond itself answered with 2xx (process-wide counter: read before and after)."""
    return REGISTRY.get_sample_value("sessiond_rest_requests_total", {"status": "2xx"}) or 0.0


# ---- the template ---------------------------------------------------------------------------------------------


def test_render_fills_every_placeholder_and_refuses_bad_values() -> None:
    done = render()
    assert done.returncode == 0, done.stderr
    assert "${GATEWAY_" not in done.stdout and "ssl_protocols       TLSv1.3;" in done.stdout
    assert "$host" in done.stdout  # nginx's own variables are left alone
    env_done = render(env={"GATEWAY_WS_UPSTREAM": "sessiond:8443"})
    assert "server sessiond:8443 max_fails=0;" in env_done.stdout
    arg_done = render("GATEWAY_WS_UPSTREAM=ws.internal:9443", env={"GATEWAY_WS_UPSTREAM": "sessiond:8443"})
    assert "server ws.internal:9443 max_fails=0;" in arg_done.stdout  # arguments beat the environment
    for bad in (["GATEWAY_NOPE=1"], ["GATEWAY_WEB_ROOT=/x; include /etc/shadow"], ["GATEWAY_WS_TIMEOUT="]):
        refused = render(*bad)
        assert refused.returncode == 2 and refused.stderr.startswith("render.py: "), (bad, refused.stderr)
    assert render(env={"GATEWAY_TYPO": "1"}).returncode == 2
    # --defaults names exactly the template's placeholders.
    defaults = {line.split("=", 1)[0] for line in render("--defaults").stdout.splitlines()}
    assert defaults == set(re.findall(r"\$\{(GATEWAY_[A-Z0-9_]+)\}", TEMPLATE.read_text()))


def test_nginx_accepts_the_rendered_config_in_two_layouts(tmp_path: Path, ca: trustme.CA) -> None:
    # Loopback, as the other tests run it.
    loopback = write_layout(tmp_path / "loopback", ca, 8080, 8443)
    checked = nginx_test(loopback.conf)
    assert checked.returncode == 0, checked.stderr
    # The production shape: ports 80/443 on every address, upstreams by (resolvable) host name, IPv6 too.
    prod = write_layout(
        tmp_path / "prod", ca, 8080, 8443, GATEWAY_HTTP_LISTEN="80", GATEWAY_HTTPS_LISTEN="[::]:443",
        GATEWAY_PUBLIC_HTTPS_PORT="443", GATEWAY_SERVER_NAME="sessiond.example.com www.sessiond.example.com",
        GATEWAY_REST_UPSTREAM="localhost:8080", GATEWAY_WS_UPSTREAM="localhost:8443",
    )
    checked = nginx_test(prod.conf)
    assert checked.returncode == 0, checked.stderr
    # nginx -t really loads the files: a missing key is refused.
    (prod.prefix / "tls.pem").unlink()
    refused = nginx_test(prod.conf)
    assert refused.returncode != 0 and "tls.pem" in refused.stderr


# ---- a real nginx in front of a real sessiond ----------------------------------------------------------------


async def test_tls13_only_and_security_headers(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    async with gateway(nursery, tmp_path, ca) as gw:
        with pytest.raises(trio.BrokenResourceError) as refused:
            await _handshake(gw.layout.https_port, gw.tls(maximum=ssl.TLSVersion.TLSv1_2))
        assert "PROTOCOL_VERSION" in str(refused.value.__cause__).upper(), refused.value.__cause__
        assert await _handshake(gw.layout.https_port, gw.tls()) == "TLSv1.3"
        async with gw.http(user=None) as http:
            r = await http.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "strict-origin-when-cross-origin"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert f"connect-src 'self' wss://{HOST}:{gw.layout.https_port};" in csp
        async with gw.http(user=None) as http:
            r = await http.get("/metrics")
        assert r.status_code == 404 and "sessiond_" not in r.text  # internal only
        async with gw.http(user=None) as http:
            r = await http.get("/v1/sessions")
        assert r.status_code == 401 and r.headers["x-frame-options"] == "DENY"  # error answers carry them too


async def test_plain_http_redirects_to_https(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    async with gateway(nursery, tmp_path, ca) as gw:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{gw.layout.http_port}", timeout=5) as plain:
            r = await plain.post("/v1/sessions?x=1", json={})
        assert r.status_code == 308, r.text
        assert r.headers["location"] == f"https://{HOST}:{gw.layout.https_port}/v1/sessions?x=1"
        before = _rest_2xx_at_sessiond()
        async with gw.http() as http:
            followed = await http.get(r.headers["location"].replace("/v1/sessions?x=1", "/v1/sessions"))
        assert followed.status_code == 200 and _rest_2xx_at_sessiond() == before + 1


async def test_web_app_is_served_as_static_files(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    async with gateway(nursery, tmp_path, ca) as gw, gw.http(user=None) as http:
        home = await http.get("/")
        assert home.status_code == 302 and home.headers["location"].endswith("/app/")
        index = await http.get("/app/")
        assert index.status_code == 200 and "sessiond test build" in index.text
        assert index.headers["cache-control"] == "no-cache"
        assert "connect-src 'self' wss://" in index.headers["content-security-policy"]
        deep = await http.get("/app/sessions/abc")  # a client-side route
        assert deep.status_code == 200 and deep.text == index.text
        asset = await http.get("/app/assets/index-abc123.js")
        assert asset.status_code == 200 and asset.text == APP_JS
        assert asset.headers["content-type"] == "application/javascript"
        assert "max-age=315360000" in asset.headers["cache-control"]
        assert (await http.get("/app/assets/missing.js")).status_code == 404
        manifest = await http.get("/app/manifest.webmanifest")
        assert manifest.headers["content-type"] == "application/manifest+json"
        config = await http.get("/app/config.json")
        assert config.json() == {"ws_port": gw.layout.https_port, "ws_path": "/v1/ws", "dev_login": False}
        escape = await http.get("/app/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd")
        assert "root:" not in escape.text


async def test_websocket_session_syncs_through_the_gateway(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    async with gateway(nursery, tmp_path, ca) as gw:
        sid = await gw.create_session({"count": 0})
        async with gw.device(sid, "phone") as phone, gw.device(sid, "laptop") as laptop:
            assert phone.welcome and phone.welcome["state"] == {"count": 0}
            await phone.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/count", "by": 2}]})
            assert await phone.recv_type("ack") == {"t": "ack", "id": 1, "version": 1}
            patch = await laptop.recv_type("patch")
            assert patch["device"] == "phone" and patch["ops"] == [{"op": "inc", "path": "/count", "by": 2}]
            async with gw.http() as http:  # a REST change through the gateway reaches the devices too
                r = await http.patch(f"/v1/sessions/{sid}", json={"ops": [{"op": "set", "path": "/t", "value": 1}]})
            assert r.status_code == 200, r.text
            assert (await phone.recv_type("patch"))["device"] == "@rest"


async def test_rest_burst_and_upgrade_burst_get_429_from_nginx(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    limits = {
        "GATEWAY_REST_RATE": "1r/s", "GATEWAY_REST_BURST": "4", "GATEWAY_WS_RATE": "1r/s", "GATEWAY_WS_BURST": "2",
    }
    async with gateway(nursery, tmp_path, ca, **limits) as gw, gw.http() as http:
        sid = await gw.create_session({})  # for the upgrades below
        before = _rest_2xx_at_sessiond()
        statuses: list[int] = []
        bodies: list[str] = []
        started = trio.current_time()
        for _ in range(20):
            r = await http.get("/v1/sessions")
            statuses.append(r.status_code)
            if r.status_code == 429:
                bodies.append(r.text)
        elapsed = trio.current_time() - started
        ok, limited = statuses.count(200), statuses.count(429)
        # At most the burst + 1, plus what the rate (1/s) refilled meanwhile.
        assert ok + limited == 20 and 1 <= ok <= 4 + 1 + int(elapsed) + 1 and limited >= 1, (statuses, elapsed)
        # nginx answered the 429s (its HTML page, not sessiond's JSON error), and they never reached sessiond.
        assert all("<center>nginx</center>" in body and "rate_limited" not in body for body in bodies)
        assert _rest_2xx_at_sessiond() - before == ok
        # The bucket refills at 1 request per second.
        with trio.fail_after(5):
            while (await http.get("/v1/sessions")).status_code != 200:
                await trio.sleep(0.2)

        rejected: list[int] = []
        started = trio.current_time()
        for i in range(8):
            try:
                async with gw.device(sid, f"d{i}"):
                    pass
            except ConnectionRejected as exc:
                rejected.append(exc.status_code)
        elapsed = trio.current_time() - started
        accepted = 8 - len(rejected)
        assert rejected and set(rejected) == {429}, rejected
        assert 1 <= accepted <= 2 + 1 + int(elapsed) + 1, (accepted, elapsed)


async def test_connections_per_client_are_limited(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    async with gateway(nursery, tmp_path, ca, GATEWAY_CONN_PER_CLIENT="3") as gw:
        sid = await gw.create_session({})
        async with gw.device(sid, "a"), gw.device(sid, "b"), gw.device(sid, "c"):
            with pytest.raises(ConnectionRejected) as refused:
                async with gw.device(sid, "d"):
                    pass
            assert refused.value.status_code == 429
        # Closing them frees the slots (nginx counts connections whose request is in progress).
        with trio.fail_after(5):
            while True:
                try:
                    async with gw.device(sid, "d") as d:
                        assert d.welcome is not None
                    break
                except ConnectionRejected:
                    await trio.sleep(0.1)


PROXY_TIMEOUT_S = 2.0


async def _idle(dev: RawDevice, seconds: float) -> float | None:
    """Read (answering pings) for `seconds` while the device sends nothing; when the link was cut, after how long."""
    started = trio.current_time()
    with trio.move_on_after(seconds):
        try:
            while True:
                dev.inbox.extend([orjson.loads(await dev.ws.get_message())])
        except ConnectionClosed:
            return trio.current_time() - started
    return None


async def test_idle_websocket_outlives_the_proxy_timeout_thanks_to_pings(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    server = {"ping_interval_s": PROXY_TIMEOUT_S / 4}
    async with gateway(nursery, tmp_path, ca, server, GATEWAY_WS_TIMEOUT=f"{PROXY_TIMEOUT_S:g}s") as gw:
        sid = await gw.create_session({"n": 0})
        async with gw.device(sid, "idle") as dev:
            # Watching for an absence: no cut during three proxy timeouts in which the device sends nothing.
            assert await _idle(dev, 3 * PROXY_TIMEOUT_S) is None
            await dev.send({"t": "op", "id": 1, "ops": [{"op": "inc", "path": "/n"}]})
            assert (await dev.recv_type("ack"))["version"] == 1


async def test_idle_websocket_without_pings_is_cut_by_the_proxy(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    """The negative control: the same idle device, with the server's pings pushed out of reach."""
    server = {"ping_interval_s": 86400.0, "idle_timeout_s": 2 * 86400.0}  # the first ping: at a random second of a day
    async with gateway(nursery, tmp_path, ca, server, GATEWAY_WS_TIMEOUT=f"{PROXY_TIMEOUT_S:g}s") as gw:
        sid = await gw.create_session({"n": 0})
        async with gw.device(sid, "idle") as dev:
            cut_after = await _idle(dev, 3 * PROXY_TIMEOUT_S)
            assert cut_after is not None, "nginx kept a silent WebSocket open past proxy_read_timeout"
            assert PROXY_TIMEOUT_S * 0.75 <= cut_after <= PROXY_TIMEOUT_S + 2, cut_after
