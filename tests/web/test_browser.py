"""The web app end to end in headless Chromium: builds sdk-ts and web/, then runs web/e2e (node --test) against a
real sessiond process that the e2e suite starts and kills.

Needs node 20+ with npm and Debian's /usr/bin/chromium (scripts/tools.sh); a missing tool fails, it never skips.
`npm ci` runs only when node_modules is missing or older than package-lock.json (the npm registry is the only
download). The Redis of the run makes the server kill a real SIGKILL: acked changes are in the Redis journal.
Screenshots of each step land in web/e2e/artifacts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdk-ts"
WEB = REPO / "web"
CHROMIUM = "/usr/bin/chromium"
NPM_CI_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 180
E2E_TIMEOUT_S = 150
SCREENSHOTS = ["02-converged-laptop", "03-handoff-phone-active", "04-server-down-pending", "05-offline-shell",
               "06-resumed-laptop", "07-phone-offline-reopened", "07-phone-offline-queued", "08-phone-caught-up"]

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run `cmd`; its output, or a test failure showing the end of it."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(cmd)} (in {cwd}) took more than {timeout:.0f} s:\n{(out + err)[-8000:]}", pytrace=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} (in {cwd}) failed with exit {done.returncode}:\n{output[-8000:]}", pytrace=False)
    return output


def needs_install(package: Path) -> bool:
    """npm ci only when node_modules is missing or older than the lockfile (npm writes .package-lock.json)."""
    marker = package / "node_modules" / ".package-lock.json"
    return not marker.is_file() or marker.stat().st_mtime < (package / "package-lock.json").stat().st_mtime


@pytest.fixture(scope="session")
def web_dist() -> Path:
    """sdk-ts and web built from the current sources (the build is a few seconds; no stale dist is trusted)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the web tests need Node 20+ and npm (scripts/tools.sh ensure)")
    for package in (SDK, WEB):
        if needs_install(package):
            run(["npm", "ci", "--no-audit", "--no-fund"], package, NPM_CI_TIMEOUT_S)
        run(["npm", "run", "build"], package, BUILD_TIMEOUT_S)
    dist = WEB / "dist"
    assert (dist / "index.html").is_file() and (dist / "sw.js").is_file()
    return dist


def test_browser_end_to_end(web_dist: Path, redis_url: str, redis_prefix: str) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/tools.sh ensure)")
    artifacts = WEB / "e2e" / "artifacts"
    for old in artifacts.glob("*.png"):
        old.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(
        E2E_PYTHON=sys.executable,
        E2E_CHROMIUM=CHROMIUM,
        E2E_REDIS_URL=redis_url,
        E2E_REDIS_PREFIX=f"{redis_prefix}e2e:",
    )
    output = run(["node", "--test", "--test-reporter=spec", "e2e/"], WEB, E2E_TIMEOUT_S, env)
    assert "# server stopped with SIGKILL" in output, output[-4000:]
    assert " fail 0\n" in output and " pass 5\n" in output, output[-4000:]  # every step ran (node exits 1 on a failure)
    missing = [name for name in SCREENSHOTS if not (artifacts / f"{name}.png").is_file()]
    assert not missing, f"screenshots not saved: {missing}"
