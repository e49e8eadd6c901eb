"""A chat room on application sessions: the users of one room share its messages, whichever
server each of them is served by, and the room survives the loss of its server.

    tandem up --config config/default.toml --app examples.chat_app:app

Each user's own session keeps their name and the room they are in; the room itself is an
application session (`await request.session.app_session("room:" + name)`): one copy on its
primary, one on its secondary, read and written there by every member's requests. Open the
page in two browsers (or one and a private window), join the same room, and talk; `kill -9`
the server the page names as the room's primary: the messages are all there after it.

GET  /                 the page: pick a name and a room, or the room's messages and a form
POST /join  (form: name, room)     joins the room (the session remembers it)
POST /say   (form: text)           adds a message to the room
GET  /leave                        leaves the room (the session forgets it)
GET  /api/room                     the room as JSON: messages, members, where it lives
POST /api/say  (JSON: {"text"})    adds a message, answers as /api/room
WS   /ws       each text message is said (an empty one says nothing), each is answered
               with the room as /api/room has it: saved and read again at once, not when
               the socket closes
"""

from __future__ import annotations

import time
from html import escape
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from backends.sessions.app_session import AppSession

KEPT = 200  # messages a room keeps (the oldest go when there are more)


async def _room(request: HTTPConnection) -> AppSession | None:
    """The room of this user's session, read from its primary (None: in no room)."""
    name = request.session.get("room")
    if name is None:
        return None
    return await request.session.app_session("room:" + name)


def _say(request: HTTPConnection, room: AppSession, text: str) -> None:
    # append: applied at the room's primary on its current list, so two users talking at
    # once both land (a plain room["messages"] = [...] would keep only the last writer's)
    # (keep: the room holds its last KEPT messages, trimmed there as they come)
    room.append("messages", {"from": request.session.get("name", "?"), "text": text[:500],
                             "at": round(time.time(), 3)}, keep=KEPT)
    room.incr("said")


def _state(request: HTTPConnection, room: AppSession | None) -> dict[str, Any]:
    if room is None:
        return {"room": None, "server": request.scope.get("tandem.server")}
    messages = room.get("messages", [])
    return {"room": request.session["room"], "name": request.session.get("name"),
            "messages": messages, "said": room.get("said", 0),
            "members": len(room.members), "primary": room.primary,
            "secondary": room.secondary, "server": request.scope.get("tandem.server")}


async def home(request: Request) -> Response:
    state = _state(request, await _room(request))
    where = f"Served by {escape(str(state['server']))}"
    if state["room"] is None:
        return HTMLResponse(f"""<!doctype html>
<html><head><title>tandem chat</title></head><body>
<h1>Join a room</h1>
<form action="/join" method="post">
<input name="name" placeholder="your name" required>
<input name="room" placeholder="room" value="lobby" required>
<button type="submit">join</button></form>
<p>{where}.</p></body></html>""")
    lines = "\n".join(f"<li><b>{escape(str(m['from']))}</b>: {escape(str(m['text']))}</li>"
                      for m in state["messages"])
    return HTMLResponse(f"""<!doctype html>
<html><head><title>tandem chat: {escape(state['room'])}</title></head><body>
<h1>Room {escape(state['room'])} <small>({state['members']} members)</small></h1>
<ul id="messages">{lines}</ul>
<form action="/say" method="post"><input name="text" autofocus required>
<button type="submit">say</button></form>
<p>{where}; the room lives on <span id="primary">{escape(str(state['primary']))}</span>
(copy on {escape(str(state['secondary']))}). <a href="/">refresh</a> ·
<a href="/leave">leave</a></p></body></html>""")


async def _form(request: Request) -> dict[str, str]:
    """The posted form (urlencoded: no multipart parser needed for two fields)."""
    fields = parse_qs((await request.body()).decode("utf-8", "replace"))
    return {k: v[0] for k, v in fields.items()}


async def join(request: Request) -> Response:
    form = await _form(request)
    request.session["name"] = str(form.get("name") or "anonymous")[:40]
    request.session["room"] = str(form.get("room") or "lobby")[:40]
    await _room(request)  # joined: the room lists this session among its members
    return RedirectResponse("/", status_code=303)


async def say(request: Request) -> Response:
    form = await _form(request)
    room = await _room(request)
    if room is not None and form.get("text"):
        _say(request, room, str(form["text"]))
    return RedirectResponse("/", status_code=303)


async def leave(request: Request) -> Response:
    request.session.pop("room", None)
    return RedirectResponse("/", status_code=303)


async def api_room(request: Request) -> Response:
    return JSONResponse(_state(request, await _room(request)))


async def api_say(request: Request) -> Response:
    room = await _room(request)
    if room is None:
        return JSONResponse({"error": "join a room first (POST /join)"}, status_code=409)
    body = await request.json()
    _say(request, room, str(body.get("text", "")))
    return JSONResponse(_state(request, room))


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    room = await _room(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            if room is not None:
                if text:
                    _say(websocket, room, text)
                    await room.save()  # now: the others see it before the socket closes
                else:
                    await room.refresh()  # what the others said since
            await websocket.send_json(_state(websocket, room))
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[
    Route("/", home), Route("/join", join, methods=["POST"]),
    Route("/say", say, methods=["POST"]), Route("/leave", leave),
    Route("/api/room", api_room), Route("/api/say", api_say, methods=["POST"]),
    WebSocketRoute("/ws", ws),
])
