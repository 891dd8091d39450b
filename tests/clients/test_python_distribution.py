"""The Python SDK ships alone (issue 10): `clients/python` builds a `sessiond-client` wheel holding `client` and
`protocol` only; installed into a clean venv it pulls trio-websocket, orjson and msgpack, none of the server's
dependencies, and talks to a real sessiond."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import trio

from bench.server import running_target

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"redis", "asyncpg", "pika", "hypercorn", "quart", "quart-trio", "quart-schema", "structlog",
               "prometheus-client", "pyjwt"}


async def run(*argv: str | Path, cwd: Path | None = None) -> str:
    with trio.fail_after(300):
        done = await trio.run_process([str(a) for a in argv], capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=cwd)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{argv}: {output[-3000:]}"
    return output


async def test_the_wheel_installs_alone_and_syncs_with_a_real_server(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    await run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels,
              REPO / "clients" / "python")
    [wheel] = list(wheels.glob("sessiond_client-*.whl"))
    venv = tmp_path / "venv"
    await run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    await run(python, "-m", "pip", "install", "-q", wheel)
    installed = {line.split("==")[0].lower() for line in (await run(python, "-m", "pip", "freeze")).split()}
    assert "sessiond-client" in installed and {"trio-websocket", "orjson", "msgpack"} <= installed, installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    assert not installed & {"sessiond"}

    script = tmp_path / "use_it.py"
    script.write_text(textwrap.dedent('''
        import sys, trio
        import client, protocol.ops
        from client import open_session
        assert "/site-packages/" in client.__file__, client.__file__  # the wheel, not the source tree

        async def main(url, token, sid):
            async with open_session(url, token=token, session=sid, device="alone") as s:
                for _ in range(3):
                    await s.inc("/n")
                print("state", s.state["n"], "version", s.version)
            assert not {"redis", "asyncpg", "hypercorn", "quart"} & set(sys.modules)

        trio.run(main, *sys.argv[1:])
    '''))
    async with running_target("sessiond", tmp_path / "server") as target:
        [sid] = await target.create_sessions(1)
        token = target.token()
        assert token is not None
        out = await run(python, "-I", script, target.ws_url, token, sid, cwd=tmp_path)
    assert "state 3 version 3" in out, out
