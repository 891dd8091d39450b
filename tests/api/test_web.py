"""The web app's static serving at /app/ (api/web.py), against a real in-process server and a temp dir of fake files.

Traversal attempts go over a raw socket: HTTP clients normalise `..` away before sending, which would test
nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from api.settings import load_settings
from api.web import cache_control, safe_relative
from tests.integration.harness import Harness, start_server

SECRET_TEXT = "top-secret-do-not-serve"
INDEX = "<!doctype html><title>sessiond</title><div id=root></div>"


def make_site(root: Path) -> Path:
    """A fake build: web/dist next to a secret file that must never be served."""
    (root / "secret.txt").write_text(SECRET_TEXT)
    dist = root / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "icons").mkdir()
    (dist / "index.html").write_text(INDEX)
    (dist / "sw.js").write_text("self.addEventListener('fetch', () => {});")
    (dist / "manifest.webmanifest").write_text('{"name":"sessiond"}')
    (dist / "assets" / "index-Ab12Cd34.js").write_text("console.log('app');")
    (dist / "assets" / "index-Ef56Gh78.css").write_text("body{}")
    (dist / "icons" / "icon-192.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (dist / ".env").write_text(SECRET_TEXT)
    (dist / "escape.txt").symlink_to(root / "secret.txt")
    return dist


@pytest.fixture
async def site(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Harness]:
    dist = make_site(tmp_path)
    yield await start_server(nursery, tmp_path / "data", web_dir=str(dist))


async def raw_get(h: Harness, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no normalisation); (status, body). Reads Content-Length bytes: hypercorn
    keeps the socket open after `Connection: close` until its keep-alive timer."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.http_port)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(
                line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
            )
            while len(body) < int(headers.get("content-length", "0")):
                body += await stream.receive_some(65536)
    return int(head.split(b" ", 2)[1]), body


async def test_index_and_cache_headers(site: Harness) -> None:
    async with httpx.AsyncClient(base_url=site.http_url, timeout=10) as http:
        index = await http.get("/app/")
        assert index.status_code == 200 and index.text == INDEX
        assert index.headers["content-type"].startswith("text/html")
        assert index.headers["cache-control"] == "no-cache"
        assert "default-src 'self'" in index.headers["content-security-policy"]

        sw = await http.get("/app/sw.js")
        assert sw.headers["cache-control"] == "no-cache"
        assert sw.headers["content-type"].startswith("text/javascript")

        js = await http.get("/app/assets/index-Ab12Cd34.js")
        assert js.status_code == 200 and js.text == "console.log('app');"
        assert js.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert "expires" not in js.headers
        css = await http.get("/app/assets/index-Ef56Gh78.css")
        assert css.headers["content-type"].startswith("text/css") and css.headers["x-content-type-options"] == "nosniff"

        manifest = await http.get("/app/manifest.webmanifest")
        assert manifest.headers["content-type"] == "application/manifest+json"
        assert manifest.headers["cache-control"] == "public, max-age=300"

        icon = await http.get("/app/icons/icon-192.png")
        assert icon.headers["content-type"] == "image/png" and icon.content.startswith(b"\x89PNG")


async def test_conditional_get_answers_304(site: Harness) -> None:
    async with httpx.AsyncClient(base_url=site.http_url, timeout=10) as http:
        first = await http.get("/app/sw.js")
        again = await http.get("/app/sw.js", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


async def test_redirects(site: Harness) -> None:
    async with httpx.AsyncClient(base_url=site.http_url, timeout=10) as http:
        r = await http.get("/app?x=1")
        assert r.status_code == 301 and r.headers["location"] == "/app/?x=1"
        root = await http.get("/")
        assert root.status_code == 302 and root.headers["location"] == "/app/"


async def test_spa_fallback_but_not_for_assets(site: Harness) -> None:
    async with httpx.AsyncClient(base_url=site.http_url, timeout=10) as http:
        deep = await http.get("/app/sessions/abc")
        assert deep.status_code == 200 and deep.text == INDEX
        assert deep.headers["cache-control"] == "no-cache"
        missing = await http.get("/app/assets/index-gone.js")
        assert missing.status_code == 404 and "html" not in missing.headers["content-type"]


async def test_config_names_the_bound_websocket_port(site: Harness) -> None:
    async with httpx.AsyncClient(base_url=site.http_url, timeout=10) as http:
        config = (await http.get("/app/config.json")).json()
    assert config == {"ws_port": site.running.ws_port, "ws_path": "/v1/ws", "dev_login": False}
    assert site.running.ws_port != 0


@pytest.mark.parametrize(
    "target",
    [
        "/app/../secret.txt",
        "/app/%2e%2e/secret.txt",
        "/app/%2E%2E%2Fsecret.txt",
        "/app/assets/../../secret.txt",
        "/app/..%2f..%2fsecret.txt",
        "/app/..%5csecret.txt",
        "/app/%252e%252e/secret.txt",
        "/app/.env",
        "/app/escape.txt",
        "/app//etc/passwd",
        "/app/%00index.html",
    ],
)
async def test_no_directory_traversal(site: Harness, target: str) -> None:
    status, body = await raw_get(site, target)
    assert SECRET_TEXT.encode() not in body
    assert b"root:" not in body  # /etc/passwd
    # Decoded `..`, dot files, symlinks out, backslashes, NUL: refused. A double-encoded name is just a missing
    # file with an odd name: the app shell, which is harmless; `//` is merged by a redirect (308) to /app/etc/passwd.
    if "%25" in target or target == "/app//etc/passwd":
        assert status in (200, 308, 404)
    else:
        assert status == 404, (target, status, body[:200])


async def test_no_web_dir_gives_a_clear_404(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_server(nursery, tmp_path / "data", web_dir="")
    async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
        r = await http.get("/app/")
        assert r.status_code == 404 and "web app is not available" in r.text and "npm run build" in r.text
        assert (await http.get("/app/anything")).status_code == 404
        assert (await http.get("/")).status_code == 404  # no redirect to an app that is not there


async def test_web_dir_without_index_is_not_built(nursery: trio.Nursery, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    h = await start_server(nursery, tmp_path / "data", web_dir=str(empty))
    async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
        r = await http.get("/app/")
    assert r.status_code == 404 and "no index.html" in r.text


def test_web_dir_setting() -> None:
    assert load_settings({"SESSIOND_WEB_DIR": "/srv/web"}).web_dir == Path("/srv/web")
    assert load_settings({"SESSIOND_WEB_DIR": ""}).web_dir is None
    default = load_settings({}).web_dir
    repo_dist = Path(__file__).resolve().parents[2] / "web" / "dist"
    assert default == (repo_dist if (repo_dist / "index.html").is_file() else None)


def test_pure_helpers() -> None:
    assert safe_relative("a/b//c.js") == "a/b/c.js"
    assert safe_relative("a/../b") is None and safe_relative(".git/config") is None and safe_relative("a\\b") is None
    assert cache_control("assets/x-1234.js") == "public, max-age=31536000, immutable"
    assert cache_control("index.html") == cache_control("sw.js") == "no-cache"
