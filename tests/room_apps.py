"""Applications with application sessions (rooms) for the end-to-end tests, ASGI and WSGI.

GET /join?room=K            opens room K (joining it); its values and members
GET /post?room=K&msg=M[&keep=N]   room K: append M to "log" (keeping its last N), incr
                            "n"; the member's session counts its own posts in "posted"
GET /set?room=K&key=A&value=V   room K: room[A] = V (last writer wins per key)
GET /bad?room=K             room["bad"] = object(): the TypeError's message
GET /sync?room=K            (ASGI) the room read without `await`: the error's message
GET /stream?room=K&msg=M    (ASGI) append M + "<", send the response head, append M + ">"
                            (committed after the response), then the body
GET /save?room=K&msg=M      (ASGI) append M, `await room.save()`, then append M + "!"
                            (committed with the response), `await room.refresh()`

Every answer names the server that ran the request and the room's primary and secondary.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from backends.serve.lifespan import acknowledge_lifespan


def _handle(path: str, query: str, session: Any, room: Any, server: str) -> tuple[int, Any]:
    args = {k: v[0] for k, v in parse_qs(query).items()}
    info: dict[str, Any] = {"server": server}
    if path == "/post":
        room.append("log", args["msg"], keep=int(args["keep"]) if "keep" in args else None)
        info["n"] = room.incr("n")
        session["posted"] = session.get("posted", 0) + 1
    elif path == "/set":
        room[args["key"]] = args["value"]
    elif path == "/bad":
        try:
            room["bad"] = object()
        except TypeError as exc:
            info["error"] = str(exc)
    elif path != "/join":
        return 404, {"error": "not found"}
    info.update({"room": dict(room), "members": room.members, "member": room.member,
                 "primary": room.primary, "secondary": room.secondary,
                 "posted": session.get("posted", 0)})
    return 200, info


async def asgi_rooms(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    query = scope["query_string"].decode()
    key = parse_qs(query).get("room", ["lobby"])[0]
    session = scope["session"]
    if scope["path"] == "/sync":
        try:
            dict(session.app_session(key))
            status, info = 200, {"error": None}
        except Exception as exc:
            status, info = 200, {"error": f"{type(exc).__name__}: {exc}"}
    elif scope["path"] == "/stream":
        room = await session.app_session(key)
        msg = parse_qs(query)["msg"][0]
        room.append("log", msg + "<")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        room.append("log", msg + ">")
        await send({"type": "http.response.body", "body": b"{}"})
        return
    elif scope["path"] == "/save":
        room = session.app_session(key)
        msg = parse_qs(query)["msg"][0]
        room.append("log", msg)
        saved = dict(await room.save())
        room.append("log", msg + "!")
        status, info = 200, {"saved": saved, "refreshed": dict(await room.refresh())}
    else:
        room = await session.app_session(key)
        status, info = _handle(scope["path"], query, session, room, scope["tandem.server"])
    body = json.dumps(info).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi_rooms(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = environ["QUERY_STRING"]
    key = parse_qs(query).get("room", ["lobby"])[0]
    session = environ["tandem.session"]
    status, info = _handle(environ["PATH_INFO"], query, session, session.app_session(key),
                           environ["tandem.server"])
    body = json.dumps(info).encode()
    start_response(f"{status} {'OK' if status == 200 else 'Not Found'}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
