"""schemathesis against the served OpenAPI spec (issue 8): no 5xx, every response matches the spec, and every
request is answered. The server runs as its own process (as in production) with an admin token, so the admin
route is reached too; the per-user REST rate limit is lifted (BENCH_SERVER_ENV) so that 429s do not hide paths."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import jwt
import pytest
import trio

from bench.server import running_target

pytestmark = pytest.mark.slow


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed in the venv (pip install -e '.[dev]')"
    return found


async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(tmp_path: Path) -> None:
    async with running_target("sessiond", tmp_path / "server") as target:
        assert target.jwt_secret and target.http_url
        token = jwt.encode({"sub": "schemathesis", "roles": ["admin"], "exp": time.time() + 3600},
                           target.jwt_secret, algorithm="HS256")
        argv = [_st(), "run", f"{target.http_url}/openapi.json", "--header", f"Authorization: Bearer {token}",
                "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "25",
                "--request-timeout", "10", "--workers", "2", "--no-color"]
        with trio.fail_after(240):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                          cwd=tmp_path)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and "Network Error" not in output, output[-6000:]
