"""TLS served by sessiond itself (SESSIOND_TLS_CERT_FILE / SESSIOND_TLS_KEY_FILE), over real loopback sockets.

Both ports speak TLS 1.3 only: a TLS 1.3 client gets HTTPS and a wss:// session, a client capped at TLS 1.2 is
refused by the server's handshake, and a plain-HTTP client on a TLS port gets no HTTP answer and harms nothing.
The certificates come from a throwaway CA (trustme) that only the test clients trust.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from api.auth import Authenticator
from api.server import serve
from api.settings import SettingsError, load_settings
from tests.integration.harness import Harness, RawDevice, start_server
from tests.integration.harness import test_settings as make_settings

HOST = "127.0.0.1"
# A client that fails the TLS handshake on the WebSocket port is disconnected by the handshake timeout (see
# test_plain_http_on_tls_ports_fails_cleanly); short here to keep the tests quick.
HELLO_TIMEOUT_S = 2.0


@dataclass
class TlsFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
        """A client that trusts the test CA; `maximum` caps the versions it offers."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.maximum_version = maximum
        return context


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(cert, append=True)
    leaf.private_key_pem.write_to_path(key)
    return TlsFiles(ca, cert, key)


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tmp_path: Path, tls_files: TlsFiles) -> AsyncIterator[Harness]:
    h = await start_server(
        nursery, tmp_path / "data", tls_cert_file=str(tls_files.cert), tls_key_file=str(tls_files.key),
        hello_timeout_s=HELLO_TIMEOUT_S,
    )
    yield h
    h.running.stop()


async def _handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version a bare handshake with `context` agrees on (raises trio.BrokenResourceError if refused)."""
    with trio.fail_after(5):
        stream = await trio.open_ssl_over_tcp_stream(HOST, port, ssl_context=context, https_compatible=True)
        try:
            await stream.do_handshake()
            version = stream.version()
            assert isinstance(version, str)
            return version
        finally:
            await trio.aclose_forcefully(stream)


async def _https_healthz(h: Harness, context: ssl.SSLContext) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"https://{HOST}:{h.running.http_port}", verify=context, timeout=5) as c:
        return await c.get("/healthz")


async def _wss_welcome(h: Harness, context: ssl.SSLContext, session: str, device: str) -> dict[str, object]:
    url = f"wss://{HOST}:{h.running.ws_port}/v1/ws"
    with trio.fail_after(10):
        async with open_websocket_url(url, ssl_context=context, subprotocols=["sessiond.v1.json"]) as ws:
            dev = RawDevice(ws)
            await dev.send({"t": "hello", "token": h.token("alice"), "session": session, "device": device})
            return await dev.recv_type("welcome")


async def _create_session_https(h: Harness, context: ssl.SSLContext) -> str:
    headers = {"Authorization": f"Bearer {h.token('alice')}"}
    base = f"https://{HOST}:{h.running.http_port}"
    async with httpx.AsyncClient(base_url=base, verify=context, headers=headers, timeout=5) as c:
        r = await c.post("/v1/sessions", json={"name": "tls", "state": {"n": 1}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("only", ["SESSIOND_TLS_CERT_FILE", "SESSIOND_TLS_KEY_FILE"])
def test_tls_files_go_together(only: str) -> None:
    with pytest.raises(SettingsError, match="SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE go together"):
        load_settings({only: "/etc/ssl/x.pem"})
    both = load_settings({"SESSIOND_TLS_CERT_FILE": "/a.crt", "SESSIOND_TLS_KEY_FILE": "/a.key"})
    assert (both.tls_cert_file, both.tls_key_file) == ("/a.crt", "/a.key")


async def test_unreadable_or_mismatched_files_stop_the_start(tmp_path: Path, tls_files: TlsFiles) -> None:
    missing = tmp_path / "missing.key"
    settings = make_settings(tmp_path / "data", tls_cert_file=str(tls_files.cert), tls_key_file=str(missing))
    with pytest.raises(SettingsError, match=f"SESSIOND_TLS_KEY_FILE={missing}.*No such file"):
        await serve(settings, Authenticator.from_settings(settings), handle_signals=False, tune_gc=False)
    other_key = tmp_path / "other.key"  # a valid key, but not the certificate's
    tls_files.ca.issue_cert("elsewhere.test").private_key_pem.write_to_path(other_key)
    settings = make_settings(tmp_path / "data", tls_cert_file=str(tls_files.cert), tls_key_file=str(other_key))
    with pytest.raises(SettingsError, match="cannot load the certificate and key"):
        await serve(settings, Authenticator.from_settings(settings), handle_signals=False, tune_gc=False)


def test_cli_serve_with_a_missing_certificate_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(
        SESSIOND_DATA_DIR=str(tmp_path), SESSIOND_HTTP_PORT="0", SESSIOND_WS_PORT="0", SESSIOND_JWT_SECRET="k" * 40,
        SESSIOND_TLS_CERT_FILE=str(tmp_path / "nope.crt"), SESSIOND_TLS_KEY_FILE=str(tmp_path / "nope.key"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"sessiond: SESSIOND_TLS_CERT_FILE={tmp_path / 'nope.crt'}")


# ---- the live server ------------------------------------------------------------------------------


async def test_tls13_client_gets_https_and_a_wss_session(tls_server: Harness, tls_files: TlsFiles) -> None:
    client = tls_files.client_context()
    assert await _handshake(tls_server.running.http_port, client) == "TLSv1.3"
    assert await _handshake(tls_server.running.ws_port, client) == "TLSv1.3"
    r = await _https_healthz(tls_server, client)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    session = await _create_session_https(tls_server, client)
    welcome = await _wss_welcome(tls_server, client, session, "laptop")
    assert welcome["state"] == {"n": 1}


async def test_tls12_client_is_refused_on_both_ports(tls_server: Harness, tls_files: TlsFiles) -> None:
    capped = tls_files.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    for port in (tls_server.running.http_port, tls_server.running.ws_port):
        with pytest.raises(trio.BrokenResourceError) as refused:
            await _handshake(port, capped)
        # The server drops a TLS 1.2 ClientHello (trio's SSLStream does not flush the protocol_version alert, so
        # the client sees an EOF inside the handshake: at once on the REST port, within the handshake timeout
        # on the WebSocket port).
        assert isinstance(refused.value.__cause__, ssl.SSLError), refused.value.__cause__
    # The same client, allowed TLS 1.3, is accepted: the refusal was about the version and nothing else.
    assert await _handshake(tls_server.running.ws_port, tls_files.client_context()) == "TLSv1.3"


async def _plain_http_answer(port: int) -> bytes:
    """What a plain-HTTP client reads from a TLS port until the server closes (bounded)."""
    received = b""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            try:
                while chunk := await stream.receive_some(4096):
                    received += chunk
            except trio.BrokenResourceError:  # a reset is a clean refusal too
                pass
    return received


async def test_plain_http_on_tls_ports_fails_cleanly(tls_server: Harness, tls_files: TlsFiles) -> None:
    # REST (hypercorn): the failed handshake closes the socket at once.
    started = trio.current_time()
    answer = await _plain_http_answer(tls_server.running.http_port)
    assert b"HTTP/1." not in answer and trio.current_time() - started < 1.0, answer[:200]
    # WebSocket (trio-websocket): closed by the handshake timeout (SESSIOND_HELLO_TIMEOUT_S, 10 s by default):
    # trio-websocket waits for an upgrade request that a broken TLS stream never brings.
    started = trio.current_time()
    answer = await _plain_http_answer(tls_server.running.ws_port)
    assert b"HTTP/1." not in answer and trio.current_time() - started < HELLO_TIMEOUT_S + 2, answer[:200]
    # Both servers still serve TLS clients (one bad connection must not tear down serve_websocket: TRAPS).
    client = tls_files.client_context()
    assert (await _https_healthz(tls_server, client)).status_code == 200
    session = await _create_session_https(tls_server, client)
    assert (await _wss_welcome(tls_server, client, session, "phone"))["t"] == "welcome"
