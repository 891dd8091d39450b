"""`POST /v1/dev/token {"user": U}`: sign in to the demo web app without an identity provider (development only).

Anyone who can reach the endpoint can be any user, so it exists only when `SESSIOND_DEV_LOGIN=1`, and settings
refuse to start with it unless the key is the generated dev secret and the server listens on loopback (or
`SESSIOND_DEV_LOGIN_FORCE=1`). When off, the route is not registered at all: 404 like any unknown path. The
tokens it mints carry no roles (never admin) and live DEV_TOKEN_TTL_S; the app asks for a fresh one when needed.
"""

from __future__ import annotations

import re

import orjson
from quart import Response, request
from quart_trio import QuartTrio

from api.auth import Authenticator
from api.logs import get_logger
from api.settings import Settings
from protocol import codes

DEV_TOKEN_TTL_S = 900.0
USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def register_dev_login(app: QuartTrio, settings: Settings, auth: Authenticator) -> None:
    if not settings.dev_login:
        return
    get_logger("sessiond.devlogin").warning(
        "dev login is on: POST /v1/dev/token gives anyone who reaches this server a token for any user",
        host=settings.host,
    )

    @app.post("/v1/dev/token")
    async def dev_token() -> Response:
        body = await request.get_json(force=True, silent=True)
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not USER_RE.fullmatch(user):
            error = {"error": {"code": codes.BAD_FRAME, "message": 'expected {"user": U}, U 1-64 of [A-Za-z0-9._@-]'}}
            return Response(orjson.dumps(error), status=400, content_type="application/json")
        token = auth.mint(user, ttl_s=DEV_TOKEN_TTL_S)  # no roles, whatever the body asks for
        answer = {"token": token, "user": user, "expires_in": DEV_TOKEN_TTL_S}
        response = Response(orjson.dumps(answer), content_type="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response
