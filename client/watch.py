"""A tiny demo device: `python -m client.watch --token T --session S --device D [--inc /path --times N]`.

It joins the session, prints every frame it receives as one JSON line, optionally increments a counter
`--times` times (one op per second), and exits after `--seconds` (default: forever with no --inc).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import orjson
import trio

from client.sdk import open_session


async def _main(args: argparse.Namespace) -> None:
    def show(frame: dict[str, object]) -> None:
        sys.stdout.write(f"[{args.device}] {orjson.dumps(frame).decode()}\n")
        sys.stdout.flush()

    async with open_session(
        args.url, token=args.token, session=args.session, device=args.device, on_event=show
    ) as session:
        show({"t": "joined", "version": session.version, "state": session.state})
        for _ in range(args.times if args.inc else 0):
            version = await session.inc(args.inc)
            show({"t": "acked", "version": version, "state": session.state})
            await trio.sleep(1)
        await trio.sleep(args.seconds if args.seconds is not None else (1 if args.inc else math.inf))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.watch", description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8443/v1/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--inc", help="a JSON Pointer to increment, e.g. /count")
    parser.add_argument("--times", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None, help="stay this long, then exit")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)


if __name__ == "__main__":
    main()
