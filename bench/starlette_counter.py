"""The session counter of bench/sessions.py as a Starlette app.

`app`: `request.session` is tandem's replicated session (`tandem backend --app
bench.starlette_counter:app`). `cookie_app()`: the same app with Starlette's own signed-cookie
`SessionMiddleware`, for uvicorn (`uvicorn --factory bench.starlette_counter:cookie_app`).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["app", "cookie_app"]


async def count(request: Request) -> Response:
    n = request.session.get("counter", 0) + 1
    request.session["counter"] = n
    return Response(b'{"counter": %d}' % n, media_type="application/json")


app = Starlette(routes=[Route("/count", count)])


def cookie_app() -> Starlette:
    sessions = Middleware(SessionMiddleware, secret_key="bench-secret",
                          session_cookie="STARLETTE_SESSION")
    return Starlette(routes=[Route("/count", count)], middleware=[sessions])
