#!/usr/bin/env python3
"""Render the nginx gateway template (deploy/nginx/sessiond.conf): fill its ${GATEWAY_*} placeholders.

    python3 deploy/nginx/render.py [NAME=VALUE ...] [-o /etc/nginx/conf.d/sessiond.conf]
    python3 deploy/nginx/render.py --defaults        # every variable with its default, as NAME=VALUE lines

Values come from the defaults below, then GATEWAY_* environment variables, then NAME=VALUE arguments. Only
${GATEWAY_*} is replaced (nginx's own $variables are left alone); an unknown name, a placeholder without a value,
or a value that could smuggle nginx syntax (; { } quotes $ or a line break) is an error. Standard library only:
runs with any python3, e.g. in an init container.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

TEMPLATE = Path(__file__).with_name("sessiond.conf")
PREFIX = "GATEWAY_"

DEFAULTS: dict[str, str] = {
    "GATEWAY_SERVER_NAME": "_",  # nginx's catch-all; set the public host name(s), space separated
    "GATEWAY_HTTP_LISTEN": "80",  # plain HTTP: redirects only ("[::]:80" for IPv6, "127.0.0.1:8080", ...)
    "GATEWAY_HTTPS_LISTEN": "443",
    "GATEWAY_PUBLIC_HTTPS_PORT": "443",  # the HTTPS port browsers use (redirects, CSP, the app's config.json)
    "GATEWAY_TLS_CERT": "/etc/nginx/tls/tls.crt",  # PEM chain (e.g. a cert-manager Secret mounted here)
    "GATEWAY_TLS_KEY": "/etc/nginx/tls/tls.key",
    "GATEWAY_REST_UPSTREAM": "127.0.0.1:8080",  # sessiond REST (SESSIOND_HTTP_PORT); "sessiond:8080" in k8s
    "GATEWAY_WS_UPSTREAM": "127.0.0.1:8443",  # sessiond WebSocket (SESSIOND_WS_PORT); "sessiond:8443" in k8s
    "GATEWAY_WEB_ROOT": "/usr/share/sessiond/web",  # the built web app (the contents of web/dist)
    "GATEWAY_WS_TIMEOUT": "75s",  # above sessiond's 20 s ping interval and its 60 s silent-connection close
    "GATEWAY_REST_RATE": "50r/s",  # REST requests per client address ...
    "GATEWAY_REST_BURST": "100",  # ... and the burst served at once before 429
    "GATEWAY_WS_RATE": "10r/s",  # WebSocket upgrades per client address ...
    "GATEWAY_WS_BURST": "40",  # ... and their burst (a reconnect wave behind one NAT)
    "GATEWAY_CONN_PER_CLIENT": "300",  # open connections per client address (sessiond allows 200 WS per user)
}

PLACEHOLDER = re.compile(r"\$\{(" + PREFIX + r"[A-Z0-9_]+)\}")
SAFE_VALUE = re.compile(r"[^;{}'\"$\\\r\n]+")


class RenderError(ValueError):
    """The template cannot be rendered with these values; the message says which."""


def values_from(environ: Mapping[str, str], assignments: list[str]) -> dict[str, str]:
    """Defaults, then GATEWAY_* from `environ`, then NAME=VALUE assignments; unknown names are errors."""
    values = dict(DEFAULTS)
    for name, value in environ.items():
        if name.startswith(PREFIX):
            if name not in DEFAULTS:
                raise RenderError(f"unknown variable {name} (known: {', '.join(DEFAULTS)})")
            values[name] = value
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in DEFAULTS:
            raise RenderError(f"expected NAME=VALUE with NAME one of {', '.join(DEFAULTS)}; got {assignment!r}")
        values[name] = value
    for name, value in values.items():
        if not SAFE_VALUE.fullmatch(value):
            raise RenderError(f"{name}={value!r}: empty, or holds one of ; {{ }} ' \" $ \\ or a line break")
    return values


def render(template: str, values: Mapping[str, str]) -> str:
    """The template with every ${GATEWAY_*} replaced; a placeholder without a value is an error."""
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--defaults", action="store_true", help="print every variable with its default and exit")
    args = parser.parse_args(argv)
    if args.defaults:
        print("\n".join(f"{name}={value}" for name, value in DEFAULTS.items()))
        return 0
    try:
        text = render(args.template.read_text(), values_from(os.environ, args.assignments))
    except (RenderError, OSError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
