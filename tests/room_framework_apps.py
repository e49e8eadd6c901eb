"""A room each framework's way (`--app tests.room_framework_apps:…`), for
tests/test_app_sessions.py. Django's is tests/room_django_app.py (its settings are global).

    GET /post?room=K&msg=M    room K: append M to "log", incr "n"; the answer: the room, its
                              members and primary, the server
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request, session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backends.frameworks.flask import SessionInterface

__all__ = ["flask_rooms", "starlette_rooms"]


def _answer(room: Any, server: str | None) -> dict[str, Any]:
    return {"room": dict(room), "members": room.members, "primary": room.primary,
            "server": server}


flask_rooms = Flask("tandem_flask_rooms")
flask_rooms.session_interface = SessionInterface()


@flask_rooms.get("/post")
def flask_post() -> Any:
    room = session.app_session(request.args["room"])  # (a WSGI thread: read on first use)
    room.append("log", request.args["msg"])
    room.incr("n")
    return jsonify(_answer(room, request.environ.get("tandem.server")))


async def starlette_post(request: Request) -> JSONResponse:
    room = await request.session.app_session(request.query_params["room"])
    room.append("log", request.query_params["msg"])
    room.incr("n")
    return JSONResponse(_answer(room, request.scope["tandem.server"]))


starlette_rooms = Starlette(routes=[Route("/post", starlette_post)])
