"""The web app (web/, an installable PWA) served at /app/ from `SESSIOND_WEB_DIR`, next to the REST API.

Same origin as REST, so the app calls /v1 without CORS; the WebSocket port comes from /app/config.json (it can
differ from the page's port). Caching follows the build: Vite puts content-hashed names under assets/ (cached for
a year, immutable); index.html and sw.js must be revalidated on every load, or a new build would never reach the
browser. Paths are checked segment by segment before touching the disk (no `..`, no dot files, no backslashes),
and the resolved file must stay inside the web dir (symlinks included). Unknown paths that are not files get
index.html (the app routes on the client); unknown assets get 404, never HTML where a script was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

import orjson
import trio
from quart import Response, redirect, request, send_file
from quart_trio import QuartTrio

from api.settings import Settings

CACHE_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_REVALIDATE = "no-cache"
CACHE_SHORT = "public, max-age=300"
CACHE_ICONS = "public, max-age=86400"
WS_PATH = "/v1/ws"
# The types a Vite build produces. Python's mimetypes depends on the host's /etc/mime.types and does not know
# .webmanifest, so the table is ours.
MIME_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".webp": "image/webp",
    ".woff2": "font/woff2",
    ".txt": "text/plain",
    ".wasm": "application/wasm",
}
# Loaded from the same origin only; the WebSocket is on another port of the same host, hence ws:/wss:.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; manifest-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'self'; "
    "frame-ancestors 'none'"
)
NOT_BUILT = (
    "sessiond: the web app is not available here.\n"
    "It is served from SESSIOND_WEB_DIR ({where}).\n"
    "Build it with Node 20+: (cd sdk-ts && npm ci && npm run build) && (cd web && npm ci && npm run build),\n"
    "or run `make run`, which builds it when node is installed.\n"
)


def mime_type(name: str) -> str:
    return MIME_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


def cache_control(rel: str) -> str:
    """The Cache-Control for a file of the build, by its path relative to the web dir."""
    name = PurePosixPath(rel).name
    if rel.startswith("assets/"):
        return CACHE_IMMUTABLE
    if name.endswith(".webmanifest") or name == "manifest.json":
        return CACHE_SHORT
    if rel.startswith("icons/"):
        return CACHE_ICONS
    return CACHE_REVALIDATE  # index.html, sw.js and anything else without a content hash


def safe_relative(sub: str) -> str | None:
    """`sub` (already percent-decoded by the server) as a clean relative path, or None when it could escape."""
    if "\\" in sub or "\x00" in sub:
        return None
    parts = [part for part in sub.split("/") if part]
    if any(part.startswith(".") for part in parts):  # `..`, `.`, and dot files (.env, .git)
        return None
    return "/".join(parts)


def locate(root: Path | None, rel: str) -> tuple[Path, str] | Literal["not built", "not found"]:
    """The file to serve for `rel` (already `safe_relative`) and the path its cache rule goes by, or why there is
    none ("not built": no index.html in `root`). Unknown paths that are not files get index.html (the app routes on the
    client), except under assets/ (never HTML where a script was expected) or outside the dir (symlinks)."""
    if root is None or not (root / "index.html").is_file():
        return "not built"
    if rel:
        path = root / rel
        inside = path.resolve().is_relative_to(root.resolve())
        if inside and path.is_file():
            return path, rel
        if not inside or rel.startswith("assets/"):
            return "not found"
    return root / "index.html", "index.html"


def register_web(app: QuartTrio, settings: Settings, ws_port: Callable[[], int]) -> None:
    """GET /app/... (the PWA), /app/config.json (where the WebSocket is), and / -> /app/ when there is an app.

    `ws_port` gives the bound WebSocket port (known only once it listens: a port of 0 picks a free one).
    """
    root = settings.web_dir

    def plain(text: str, status: int) -> Response:
        response = Response(text, status=status, content_type="text/plain; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        return response

    async def send(path: Path, rel: str) -> Response:
        response = await send_file(path, mimetype=mime_type(path.name), conditional=True)
        response.headers["Cache-Control"] = cache_control(rel)
        response.headers.pop("Expires", None)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if path.suffix == ".html":
            response.headers["Content-Security-Policy"] = CSP
        return response

    @app.route("/app", methods=["GET", "HEAD"])
    async def app_no_slash() -> Response:
        query = request.query_string.decode("latin-1")
        return redirect("/app/" + (f"?{query}" if query else ""), 301)  # type: ignore[return-value]

    @app.route("/app/config.json", methods=["GET", "HEAD"])
    async def app_config() -> Response:
        body = {"ws_port": ws_port(), "ws_path": WS_PATH, "dev_login": settings.dev_login}
        response = Response(orjson.dumps(body), content_type="application/json")
        response.headers["Cache-Control"] = "no-cache"  # the service worker falls back to its copy offline
        return response

    @app.route("/app/", defaults={"sub": ""}, methods=["GET", "HEAD"])
    @app.route("/app/<path:sub>", methods=["GET", "HEAD"])
    async def app_files(sub: str) -> Response:
        rel = safe_relative(sub)
        if rel is None:
            return plain("not found\n", 404)
        # The disk is looked at in a worker thread (stat and realpath block), once per request.
        found = await trio.to_thread.run_sync(locate, root, rel)
        if found == "not built":
            where = f"{root}: no index.html there" if root is not None else "unset, and web/dist was not built"
            return plain(NOT_BUILT.format(where=where), 404)
        if found == "not found":
            return plain("not found\n", 404)
        path, served_as = found
        return await send(path, served_as)

    if root is not None:

        @app.route("/", methods=["GET", "HEAD"])
        async def home() -> Response:
            return redirect("/app/", 302)  # type: ignore[return-value]
