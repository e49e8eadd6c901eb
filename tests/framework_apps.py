"""Apps the framework tests run on real backend processes (`--app tests.framework_apps:…`).

`flask_login_app`: Flask with Flask-Login, as its users write it, plus tandem's one line.

    GET  /hello                an anonymous visit (the session begins)
    POST /login  (form: user)  login_user(), a new session id, a flashed welcome
    GET  /me                   @login_required: who, visits (+1)
    GET  /flashes              the flashed messages, and whether they came back as tuples
    GET  /logout               logout_user()
    GET  /fail                 writes the session, then fails (500)

`fastapi_app`: FastAPI returning the session itself as JSON (`JSONResponse`).

    GET  /session              {"session": request.session, "server": …}
    POST /session  (JSON)      session |= body
    POST /popitem              request.session.popitem(): the newest key
    POST /clear                request.session.clear(): the session ends
    GET  /fail                 writes the session, then raises (Starlette's error page)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from flask import Flask, abort, get_flashed_messages, jsonify, request, session
from flask import flash as flask_flash
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    login_required,
    login_user,
    logout_user,
)

from backends.frameworks.flask import SessionInterface

__all__ = ["flask_login_app", "fastapi_app"]


# --- Flask + Flask-Login ----------------------------------------------------------------------

flask_login_app = Flask("tandem_flask_login")
flask_login_app.session_interface = SessionInterface()  # (no SECRET_KEY: not needed)
login_manager = LoginManager(flask_login_app)
USERS = {"alice", "bob"}


class User(UserMixin):
    def __init__(self, name: str) -> None:
        self.id = name


@login_manager.user_loader
def _load_user(user_id: str) -> User | None:
    return User(user_id) if user_id in USERS else None


def _where() -> str | None:
    return request.environ.get("tandem.server")


@flask_login_app.get("/hello")
def _hello() -> Any:
    session["seen"] = True
    return jsonify(server=_where())


@flask_login_app.post("/login")
def _login() -> Any:
    name = request.form["user"]
    if name not in USERS:
        abort(403)
    session.regenerate_id()  # a new id at login (fixation defence)
    login_user(User(name))
    flask_flash(f"welcome {name}", "info")
    return jsonify(user=current_user.id, server=_where())


@flask_login_app.get("/me")
@login_required
def _me() -> Any:
    session["visits"] = session.get("visits", 0) + 1
    return jsonify(user=current_user.id, visits=session["visits"], server=_where())


@flask_login_app.get("/flashes")
def _flashes() -> Any:
    messages = get_flashed_messages(with_categories=True)
    return jsonify(flashes=messages, tuples=all(type(m) is tuple for m in messages),
                   server=_where())


@flask_login_app.get("/logout")
def _logout() -> Any:
    logout_user()
    return jsonify(user=None, server=_where())


@flask_login_app.get("/fail")
def _fail() -> Any:
    session["visits"] = 1000
    return jsonify(error="failed"), 500


# --- FastAPI ----------------------------------------------------------------------------------

fastapi_app = FastAPI()


def _state(request: Request) -> JSONResponse:
    return JSONResponse({"session": request.session, "server": request.scope.get(
        "tandem.server")})


@fastapi_app.get("/session")
async def _session(request: Request) -> JSONResponse:
    return _state(request)


@fastapi_app.post("/session")
async def _update(request: Request) -> JSONResponse:
    session = request.session  # (`request.session |= …` would assign the property)
    session |= await request.json()
    return _state(request)


@fastapi_app.post("/popitem")
async def _popitem(request: Request) -> JSONResponse:
    key, value = request.session.popitem()
    return JSONResponse({"popped": [key, value], "session": request.session})


@fastapi_app.post("/clear")
async def _clear(request: Request) -> JSONResponse:
    request.session.clear()
    return _state(request)


@fastapi_app.get("/fail")
async def _fastapi_fail(request: Request) -> JSONResponse:
    request.session["broken"] = True
    raise RuntimeError("the handler wrote the session, then failed")
