"""The TypeScript SDK (sdk-ts/): its vitest suite (unit tests on a fake WebSocket, integration tests against a real
sessiond it starts itself) and its type checks (sources without DOM or Node typings, tests, and the platform
examples against the DOM lib and React Native's WebSocket typing), run the way a developer runs them.

`npm ci` runs only when node_modules is missing or older than the lockfile (its `prepare` builds dist/ too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "sdk-ts"
LOCK = SDK / "package-lock.json"
INSTALLED = SDK / "node_modules" / ".package-lock.json"  # written by npm ci / npm install

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout_s: float) -> None:
    """Run an npm command in sdk-ts; fail the test with its whole output when it fails."""
    npm = shutil.which("npm")
    assert npm is not None, "npm is missing: scripts/tools.sh ensure installs it (Debian package npm)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env["CI"] = "true"  # no watch mode, no colours, no prompts
    env["NO_COLOR"] = "1"
    try:
        proc = subprocess.run(
            [npm, *args], cwd=SDK, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"npm {' '.join(args)} did not finish within {timeout_s:g} s:\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def installed() -> None:
    """node_modules as the lockfile says (npm ci), unless it is already at least as new as the lockfile."""
    assert LOCK.is_file(), "sdk-ts/package-lock.json must be committed"
    if not INSTALLED.is_file() or INSTALLED.stat().st_mtime < LOCK.stat().st_mtime:
        _run(["ci", "--no-audit", "--no-fund"], timeout_s=600)
    assert (ROOT / ".venv" / "bin" / "sessiond").is_file(), "the integration tests start .venv/bin/sessiond"


def test_typecheck(installed: None) -> None:
    _run(["run", "typecheck"], timeout_s=300)


def test_vitest(installed: None) -> None:
    _run(["test"], timeout_s=300)
