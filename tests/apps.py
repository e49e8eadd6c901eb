"""Applications the end-to-end tests run behind tandem: the same counter as ASGI and WSGI.

GET /count        increments session["counter"], returns JSON with where it was served
GET /peek         returns the same JSON without changing anything
GET /bad          tries to store a non-serializable value; returns the TypeError message
GET /mutate       appends to a list in place (no __setitem__)
GET /invalidate   invalidates the session
GET /regenerate   regenerates the session id
GET /incr/KEY     increments session[KEY]
GET /set?key=K&value=V&sleep=S   sets session[K] = V, then sleeps S seconds (WSGI: in the thread)
POST /echo        (ASGI only) the request body back, streamed; session["echoed"] = its size;
                  X-Served-By and X-Client (the server, the client address the app sees)
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs

from backends.serve.lifespan import acknowledge_lifespan


def _handle(path: str, session: Any, server: str, query: str = "") -> tuple[int, dict[str, Any]]:
    info: dict[str, Any] = {}
    if path.startswith("/incr/"):
        key = path[len("/incr/"):]
        session[key] = session.get(key, 0) + 1
        info[key] = session[key]
    elif path == "/set":
        args = {k: v[0] for k, v in parse_qs(query).items()}
        session[args["key"]] = args["value"]
        if "sleep" in args:  # (time.sleep(0) would still give the CPU away)
            time.sleep(float(args["sleep"]))
    elif path == "/count":
        session["counter"] = session.get("counter", 0) + 1
    elif path == "/bad":
        try:
            session["bad"] = object()
        except TypeError as exc:
            info["error"] = str(exc)
    elif path == "/mutate":
        items = session.setdefault("items", [])
        items.append(len(items))
    elif path == "/invalidate":
        session.invalidate()
        return 200, {"invalidated": True, "server": server}
    elif path == "/regenerate":
        session.regenerate_id()
    elif path != "/peek":
        return 404, {"error": "not found"}
    route = session.route
    info.update({
        "counter": session.get("counter", 0),
        "items": session.get("items"),
        "keys": sorted(session),
        "values": {k: session[k] for k in session if k not in ("counter", "items")},
        "server": server,
        "primary": route.primary if route else None,
        "secondary": route.secondary if route else None,
        "next": session.encode_url("/count"),
    })
    return 200, info


async def asgi_counter(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    if scope["path"] == "/echo":
        await _echo(scope, receive, send)
        return
    status, info = _handle(scope["path"], scope["session"], scope["tandem.server"],
                           scope["query_string"].decode())
    body = json.dumps(info).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """POST /echo: the request body back, in several body messages (a streamed response,
    no Content-Length), and its size kept in the session."""
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    scope["session"]["echoed"] = len(body)
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"x-served-by", scope["tandem.server"].encode()),
        (b"x-client", "{}:{}".format(*scope["client"]).encode())]})
    step = max(1, len(body) // 4)
    for i in range(0, len(body), step):
        await send({"type": "http.response.body", "body": body[i:i + step], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def wsgi_counter(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    status, info = _handle(environ["PATH_INFO"], environ["tandem.session"],
                           environ["tandem.server"], environ["QUERY_STRING"])
    body = json.dumps(info).encode()
    start_response(f"{status} {'OK' if status == 200 else 'Not Found'}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
