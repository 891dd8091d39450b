"""`sessiond top`: a live terminal view of a running cluster's session actors, from `GET /v1/admin/actors`.

Three parts: `fetch` (one HTTP call, stdlib urllib: httpx is only a dev dependency), `render` (pure: the JSON in,
the screen's lines out, so tests check sorting and truncation without a terminal) and two drivers, `run_once`
(one frame on stdout, for scripts) and `run_live` (curses, refreshed every second; keys r/m/d/b sort, q quits).
"""

from __future__ import annotations

import contextlib
import curses
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ADMIN_PATH = "/v1/admin/actors"
DEFAULT_URL = "http://127.0.0.1:8080"
FETCH_TIMEOUT_S = 5.0
TOKEN_HINT = "mint one with: sessiond token --user ops --role admin"


@dataclass(frozen=True)
class SortKey:
    key: str  # the keyboard key
    label: str
    value: Callable[[dict[str, Any]], float]


def _devices(actor: dict[str, Any]) -> int:
    devices = actor.get("devices")
    return len(devices) if isinstance(devices, list) else int(devices or 0)


def _num(actor: dict[str, Any], name: str) -> float:
    value = actor.get(name)
    return float(value) if isinstance(value, int | float) else 0.0


SORTS: dict[str, SortKey] = {
    "r": SortKey("r", "changes/s", lambda a: _num(a, "changes_per_s")),
    "m": SortKey("m", "mailbox", lambda a: _num(a, "mailbox_depth")),
    "d": SortKey("d", "devices", lambda a: float(_devices(a))),
    "b": SortKey("b", "state bytes", lambda a: _num(a, "state_bytes")),
}
SORT_NAMES = {"rate": "r", "mailbox": "m", "devices": "d", "bytes": "b", "memory": "b"}


class TopError(Exception):
    """Why the admin view could not be read, worded for the operator. `fatal`: retrying will not help."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.message = message
        self.fatal = fatal


# ---- fetching ---------------------------------------------------------------------------------------------------


def fetch(url: str, token: str, timeout_s: float = FETCH_TIMEOUT_S) -> dict[str, Any]:
    """The admin view of the cluster as the pod at `url` sees it."""
    request = urllib.request.Request(
        url.rstrip("/") + ADMIN_PATH, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        detail = _error_message(exc)
        if exc.code == 401:
            raise TopError(
                f"401 unauthorized ({detail}): the token was refused. sessiond top needs a valid token with the "
                f"admin role; {TOKEN_HINT}",
                fatal=True,
            ) from None
        if exc.code == 403:
            raise TopError(
                f"403 forbidden ({detail}): the token has no admin role. sessiond top needs a token with the admin "
                f"role; {TOKEN_HINT}",
                fatal=True,
            ) from None
        if exc.code == 404:
            raise TopError(f"404 at {url}{ADMIN_PATH}: is this a sessiond REST port?", fatal=True) from None
        raise TopError(f"{exc.code} from {url}{ADMIN_PATH}: {detail}", fatal=False) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise TopError(f"cannot connect to {url}: connection refused (is sessiond running? see --url)",
                           fatal=False) from None
        raise TopError(f"cannot reach {url}: {reason}", fatal=False) from None
    except TimeoutError:
        raise TopError(f"{url} did not answer within {timeout_s:g} s", fatal=False) from None
    except (OSError, ValueError) as exc:  # a reset connection, a body that is not JSON, a malformed URL
        raise TopError(f"cannot read {url}{ADMIN_PATH}: {exc}", fatal=False) from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason if isinstance(exc.reason, str) else "error"


# ---- rendering (pure) -------------------------------------------------------------------------------------------


def render(
    data: dict[str, Any],
    *,
    sort: str = "r",
    width: int | None = None,
    height: int | None = None,
    now: float | None = None,
    status: str | None = None,
) -> list[str]:
    """The screen for one admin view: title, totals, unreachable pods, column header, one row per actor (sorted
    by `sort`, one of SORTS), each cut to `width`; with `height`, rows beyond it collapse into a '... N more' line."""
    now = time.time() if now is None else now
    order = SORTS[sort]
    actors: list[dict[str, Any]] = [a for a in data.get("actors", ()) if isinstance(a, dict)]
    actors.sort(key=lambda a: (-order.value(a), str(a.get("session", ""))))
    members = data.get("members") or []
    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    names = f" ({', '.join(map(str, members))})" if 1 < len(members) <= 5 else ""
    lines = [
        f"sessiond top  pod {data.get('pod', '?')}  members {len(members)}{names}  {clock}  sort: {order.label}"
        "  [r]ate [m]ailbox [d]evices [b]ytes [q]uit",
    ]
    count = int(data.get("count", len(actors)))
    shown = f" ({len(actors)} listed)" if count > len(actors) else ""
    lines.append(
        f"actors {count}{shown}  devices {sum(_devices(a) for a in actors)}"
        f"  mailbox {int(sum(_num(a, 'mailbox_depth') for a in actors))}"
        f"  changes/s {sum(_num(a, 'changes_per_s') for a in actors):.1f}"
        f"  state {_size(sum(_num(a, 'state_bytes') for a in actors))}"
    )
    for pod, figures in sorted((data.get("pods") or {}).items()):
        if isinstance(figures, dict) and figures.get("error"):
            lines.append(f"! pod {pod}: {figures['error']}")
    if status:
        lines.append(f"! {status}")
    session_w = max([len("SESSION"), *(len(str(a.get("session", ""))) for a in actors)])
    columns = f"{'SESSION':<{session_w}}  {'OWNER':<12}  {'DEV':>4}  {'MBOX':>5}  {'CHG/S':>8}  {'STATE':>9}" \
              f"  {'CKPT':>5}  POD"
    lines.append(columns)
    rows = [_row(a, session_w, now) for a in actors]
    if height is not None:
        room = max(0, height - len(lines))
        if len(rows) > room:
            rows = [*rows[: max(0, room - 1)], f"... {len(rows) - max(0, room - 1)} more"][:room]
    lines.extend(rows)
    if width is not None:
        lines = [_fit(line, width) for line in lines]
    return lines


def _row(actor: dict[str, Any], session_w: int, now: float) -> str:
    owner = _fit(str(actor.get("owner") or "-"), 12)
    checkpoint = actor.get("last_checkpoint_at")
    age = _age(now - checkpoint) if isinstance(checkpoint, int | float) else "-"
    flag = " FAILED" if actor.get("failed") else ""
    return (
        f"{actor.get('session', '?')!s:<{session_w}}  {owner:<12}  {_devices(actor):>4}"
        f"  {int(_num(actor, 'mailbox_depth')):>5}  {_num(actor, 'changes_per_s'):>8.1f}"
        f"  {_size(_num(actor, 'state_bytes')):>9}  {age:>5}  {actor.get('pod', '?')}{flag}"
    )


def _fit(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "~"  # ASCII: curses in a C locale too


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---- drivers ----------------------------------------------------------------------------------------------------


def run_once(url: str, token: str, sort: str, width: int | None) -> int:
    """One frame on stdout (every listed actor, no height limit); errors on stderr, exit 1."""
    try:
        data = fetch(url, token)
    except TopError as exc:
        print(f"sessiond top: {exc.message}", file=sys.stderr)
        return 1
    print("\n".join(render(data, sort=sort, width=width)))
    return 0


def run_live(url: str, token: str, sort: str, interval_s: float = 1.0) -> int:
    """The curses view until q (or Ctrl-C). A first failure exits with the reason; later ones (a pod restarting)
    are shown on screen and retried, except a refused token."""
    try:
        data = fetch(url, token)
    except TopError as exc:
        print(f"sessiond top: {exc.message}", file=sys.stderr)
        return 1
    outcome: list[str] = []
    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(_live, url, token, sort, interval_s, data, outcome)
    if outcome:
        print(f"sessiond top: {outcome[0]}", file=sys.stderr)
        return 1
    return 0


def _live(
    screen: Any, url: str, token: str, sort: str, interval_s: float, data: dict[str, Any], outcome: list[str]
) -> None:
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    screen.timeout(100)  # getch waits at most 0.1 s: keys feel immediate, refreshes stay on time
    status: str | None = None
    next_fetch = time.monotonic() + interval_s
    while True:
        _draw(screen, render(data, sort=sort, width=screen.getmaxyx()[1] - 1, height=screen.getmaxyx()[0],
                             status=status))
        while time.monotonic() < next_fetch:
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if 0 <= key < 256 and chr(key).lower() in SORTS:
                sort = chr(key).lower()
                break
            if key == curses.KEY_RESIZE:
                break
        if time.monotonic() < next_fetch:
            continue  # a key: redraw now with what we have
        next_fetch = time.monotonic() + interval_s
        try:
            data = fetch(url, token)
            status = None
        except TopError as exc:
            if exc.fatal:
                outcome.append(exc.message)
                return
            status = f"{exc.message}; retrying"


def _draw(screen: Any, lines: Sequence[str]) -> None:
    screen.erase()
    rows, cols = screen.getmaxyx()
    for y, line in enumerate(lines[:rows]):
        attr = curses.A_REVERSE if line.startswith("SESSION") else (curses.A_BOLD if y == 0 else curses.A_NORMAL)
        with contextlib.suppress(curses.error):  # the bottom-right cell cannot be written
            screen.addnstr(y, 0, line, max(0, cols - 1), attr)
    screen.refresh()


# ---- the command line -------------------------------------------------------------------------------------------


def add_command(commands: Any) -> None:
    """`sessiond top` in the CLI's subcommands (api/cli.py)."""
    top = commands.add_parser("top", help="live view of a running pod's session actors (needs an admin token)")
    top.add_argument("--url", default=DEFAULT_URL, help=f"a pod's REST base URL (default {DEFAULT_URL})")
    top.add_argument("--token", default=None, help="a token with the admin role (default: SESSIOND_ADMIN_TOKEN)")
    top.add_argument("--sort", default="rate", choices=sorted(SORT_NAMES), help="initial sort (default rate)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame to stdout and exit (for scripts)")
    top.add_argument("--width", type=int, default=None, help="--once: cut lines to this width (default: none)")


def main(args: Any) -> int:
    from api.settings import admin_token_from_env

    token = args.token or admin_token_from_env()
    if not token:
        print(f"sessiond top: a token with the admin role is needed: --token or SESSIOND_ADMIN_TOKEN; {TOKEN_HINT}",
              file=sys.stderr)
        return 2
    sort = SORT_NAMES[args.sort]
    if args.once:
        return run_once(args.url, token, sort, args.width)
    if not sys.stdout.isatty():
        print("sessiond top: the live view needs a terminal; use --once in scripts", file=sys.stderr)
        return 2
    return run_live(args.url, token, sort, max(0.2, args.interval))
