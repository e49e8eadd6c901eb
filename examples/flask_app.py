"""A Flask app whose `flask.session` is tandem's replicated session.

    tandem up --config config/default.toml --app examples.flask_app:app

One line makes the difference: `app.session_interface = SessionInterface()`. No secret key
is needed for the session: tandem signs its token with the cluster secret.

GET /              a page with the counter, a +1 link and a +1 form (URL rewriting at work)
GET|POST /inc      adds 1, redirects to /
GET /api/count     adds 1, returns JSON
GET /api/peek      returns JSON, changes nothing
GET /login?user=U  new session id (fixation defence), remembers U, permanent session
GET /logout        session.clear(): the session ends
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, redirect, render_template_string, request, session

from backends.frameworks.flask import SessionInterface

app = Flask(__name__)
app.session_interface = SessionInterface()

PAGE = """<!doctype html>
<html><head><title>tandem + Flask</title></head><body>
<h1>Count: <span id="count">{{ state.counter }}</span></h1>
<p>Served by <span id="server">{{ state.server }}</span>{% if state.user %},
   logged in as <span id="user">{{ state.user }}</span>{% endif %}.</p>
<p><a id="inc" href="/inc">+1</a></p>
<form action="/inc" method="post"><button id="inc-post" type="submit">+1 (form)</button></form>
<p><a href="/login?user=alice">log in as alice</a> · <a href="/logout">log out</a></p>
</body></html>"""


def _state() -> dict[str, Any]:
    return {"counter": session.get("counter", 0), "user": session.get("user"),
            "permanent": session.permanent, "server": request.environ.get("tandem.server"),
            "framework": "flask"}


@app.get("/")
def home() -> str:
    return render_template_string(PAGE, state=_state())


@app.route("/inc", methods=["GET", "POST"])
def inc() -> Any:
    session["counter"] = session.get("counter", 0) + 1
    return redirect("/", code=303)


@app.get("/api/count")
def api_count() -> Any:
    session["counter"] = session.get("counter", 0) + 1
    return jsonify(_state())


@app.get("/api/peek")
def api_peek() -> Any:
    return jsonify(_state())


@app.get("/login")
def login() -> Any:
    session.regenerate_id()  # type: ignore[attr-defined]  # tandem's, on the Flask session
    session["user"] = request.args.get("user", "alice")
    session.permanent = True
    return jsonify(_state())


@app.get("/logout")
def logout() -> Any:
    session.clear()
    return redirect("/", code=303)
