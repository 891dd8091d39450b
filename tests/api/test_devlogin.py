"""Dev login (api/devlogin.py): off by default (404), on only with the generated dev key on loopback, and the tokens
it mints are ordinary user tokens (never admin)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from api.auth import Authenticator
from api.devlogin import DEV_TOKEN_TTL_S
from api.server import RunningServer, serve
from api.settings import SettingsError, load_settings
from tests.integration.harness import start_server


async def start_dev_server(nursery: trio.Nursery, data_dir: Path) -> str:
    """A server in dev mode (no configured key: the generated secret in data_dir) with dev login on; its URL."""
    settings = load_settings(
        {}, data_dir=data_dir, http_port=0, ws_port=0, dev_login=True, log_format="json", web_dir=""
    )
    auth = Authenticator.from_settings(settings)
    running: RunningServer = await nursery.start(
        functools.partial(serve, settings, auth, handle_signals=False, tune_gc=False)
    )
    return f"http://127.0.0.1:{running.http_port}"


async def test_off_by_default_is_404(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_server(nursery, tmp_path)
    assert h.settings.dev_login is False
    async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
        r = await http.post("/v1/dev/token", json={"user": "alice"})
    assert r.status_code == 404 and "token" not in r.json()


async def test_on_mints_a_working_user_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    url = await start_dev_server(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post("/v1/dev/token", json={"user": "alice", "roles": ["admin"]})
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        token = r.json()["token"]
        secret = (tmp_path / "jwt-secret").read_text().strip()
        claims = jwt.decode(token, secret, algorithms=["HS256"])
        assert claims["sub"] == "alice" and "roles" not in claims  # the body's roles are ignored
        assert claims["exp"] - claims["iat"] == pytest.approx(DEV_TOKEN_TTL_S, abs=1.5)
        auth = {"Authorization": f"Bearer {token}"}
        created = await http.post("/v1/sessions", json={"name": "x"}, headers=auth)
        assert created.status_code == 201, created.text
        assert (await http.get("/v1/admin/actors", headers=auth)).status_code == 403  # never admin
        assert (await http.get("/app/config.json")).json()["dev_login"] is True


@pytest.mark.parametrize("body", [{}, {"user": ""}, {"user": "a b"}, {"user": "x" * 65}, {"user": 7}, [1]])
async def test_bad_user_is_400(nursery: trio.Nursery, tmp_path: Path, body: object) -> None:
    url = await start_dev_server(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post("/v1/dev/token", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame"


def test_refused_with_a_configured_key_or_a_public_host() -> None:
    with pytest.raises(SettingsError, match="generated dev key"):
        load_settings({"SESSIOND_DEV_LOGIN": "1", "SESSIOND_JWT_SECRET": "s" * 40})
    with pytest.raises(SettingsError, match="non-loopback"):
        load_settings({"SESSIOND_DEV_LOGIN": "1", "SESSIOND_HOST": "0.0.0.0"})
    assert load_settings({"SESSIOND_DEV_LOGIN": "1", "SESSIOND_HOST": "::1"}).dev_login
    forced = {"SESSIOND_DEV_LOGIN": "1", "SESSIOND_DEV_LOGIN_FORCE": "1", "SESSIOND_HOST": "0.0.0.0"}
    assert load_settings({**forced, "SESSIOND_JWT_SECRET": "s" * 40}).dev_login


def test_serve_refuses_to_start_with_a_real_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(SESSIOND_DEV_LOGIN="1", SESSIOND_JWT_SECRET="s" * 40, SESSIOND_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "SESSIOND_DEV_LOGIN" in done.stderr, done.stderr
