"""A Starlette app whose `request.session` is tandem's replicated session.

    tandem up --config config/default.toml --app examples.starlette_app:app

No SessionMiddleware: tandem puts the session at `scope["session"]`, where Starlette's
`request.session` and `websocket.session` look for it.

GET /              a page with the counter, a +1 link and a +1 form (URL rewriting at work)
GET|POST /inc      adds 1, redirects to /
GET /api/count     adds 1, returns JSON
GET /api/peek      returns JSON, changes nothing
GET /logout        ends the session
WS  /ws            each message adds 1 and is answered with the counter
"""

from __future__ import annotations

from html import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket


def _state(request: Request) -> dict[str, object]:
    return {"counter": request.session.get("counter", 0), "server": request.scope.get(
        "tandem.server"), "framework": "starlette"}


async def home(request: Request) -> Response:
    state = _state(request)
    return HTMLResponse(f"""<!doctype html>
<html><head><title>tandem + Starlette</title></head><body>
<h1>Count: <span id="count">{state["counter"]}</span></h1>
<p>Served by <span id="server">{escape(str(state["server"]))}</span>.</p>
<p><a id="inc" href="/inc">+1</a></p>
<form action="/inc" method="post"><button id="inc-post" type="submit">+1 (form)</button></form>
<p><a href="/logout">log out</a></p>
</body></html>""")


async def inc(request: Request) -> Response:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return RedirectResponse("/", status_code=303)


async def api_count(request: Request) -> Response:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return JSONResponse(_state(request))


async def api_peek(request: Request) -> Response:
    return JSONResponse(_state(request))


async def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/", status_code=303)


async def counter_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    async for _ in websocket.iter_text():
        websocket.session["counter"] = websocket.session.get("counter", 0) + 1
        await websocket.send_json({"counter": websocket.session["counter"]})


app = Starlette(routes=[
    Route("/", home),
    Route("/inc", inc, methods=["GET", "POST"]),
    Route("/api/count", api_count),
    Route("/api/peek", api_peek),
    Route("/logout", logout),
    WebSocketRoute("/ws", counter_socket),
])
