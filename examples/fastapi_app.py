"""A FastAPI app whose `request.session` is tandem's replicated session.

    tandem up --config config/default.toml --app examples.fastapi_app:app

No SessionMiddleware: tandem puts the session at `scope["session"]`, where FastAPI's
(Starlette's) `request.session` and `websocket.session` look for it. Same routes as
examples/starlette_app.py.
"""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, RedirectResponse

app = FastAPI(title="tandem + FastAPI")


def _state(request: Request) -> dict[str, Any]:
    return {"counter": request.session.get("counter", 0), "server": request.scope.get(
        "tandem.server"), "framework": "fastapi"}


@app.get("/", response_class=HTMLResponse)
async def home(request: Request) -> str:
    state = _state(request)
    return f"""<!doctype html>
<html><head><title>tandem + FastAPI</title></head><body>
<h1>Count: <span id="count">{state["counter"]}</span></h1>
<p>Served by <span id="server">{escape(str(state["server"]))}</span>.</p>
<p><a id="inc" href="/inc">+1</a></p>
<form action="/inc" method="post"><button id="inc-post" type="submit">+1 (form)</button></form>
<p><a href="/logout">log out</a></p>
</body></html>"""


@app.api_route("/inc", methods=["GET", "POST"])
async def inc(request: Request) -> RedirectResponse:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return RedirectResponse("/", status_code=303)


@app.get("/api/count")
async def api_count(request: Request) -> dict[str, Any]:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return _state(request)


@app.get("/api/peek")
async def api_peek(request: Request) -> dict[str, Any]:
    return _state(request)


@app.get("/logout")
async def logout(request: Request) -> RedirectResponse:
    request.session.clear()
    return RedirectResponse("/", status_code=303)


@app.websocket("/ws")
async def counter_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.receive_text()
            websocket.session["counter"] = websocket.session.get("counter", 0) + 1
            await websocket.send_json({"counter": websocket.session["counter"]})
    except WebSocketDisconnect:
        pass
