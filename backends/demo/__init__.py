"""The bundled demo app of `tandem up`: a counter that shows where its session lives.

Plain ASGI (no framework). `/` shows the page, `/inc` increments and redirects back,
`/api` returns JSON, `/reset` invalidates the session. Its links and redirects are plain:
for a client whose token does not come by cookie, tandem's URL rewriting adds the token
(`session.encode_url` is for URLs that rewriting does not see, as in JSON).
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from ..serve.lifespan import acknowledge_lifespan

__all__ = ["app"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tandem demo</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 40em; margin: 3em auto; color: #222; }}
.count {{ font-size: 4em; font-weight: 700; }}
table {{ border-collapse: collapse; }} td {{ padding: .2em 1em .2em 0; }}
a.button {{ display: inline-block; padding: .4em 1em; border: 1px solid #888; border-radius: 4px;
           text-decoration: none; color: #222; margin-right: .5em; }}
code {{ background: #f3f3f3; padding: 0 .3em; }}
</style></head><body>
<h1>tandem demo</h1>
<div class="count" id="count">{count}</div>
<p><a class="button" id="inc" href="/inc">+1</a><a class="button" id="reset" href="/reset">new
session</a></p>
<table>
<tr><td>served by</td><td><b id="server">{server}</b> (pid <code id="pid">{pid}</code>)</td></tr>
<tr><td>session primary</td><td>{primary}</td></tr>
<tr><td>session secondary</td><td>{secondary}</td></tr>
<tr><td>session id</td><td><code>{sid}…</code></td></tr>
</table>
<p>Stop the server that served this page, the session's primary: <code>kill -9 {pid}</code>
crashes it, <code>kill -STOP {pid}</code> hangs it (<code>kill -CONT {pid}</code> lets it go on).
Then press +1: the count survives, served by the old secondary, which picks a new
secondary.</p>
</body></html>
"""


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    session = scope["session"]
    path = scope["path"]
    if path == "/inc":
        session["count"] = session.get("count", 0) + 1
        await _send(send, 303, b"", [(b"location", b"/")])
        return
    if path == "/reset":
        if "count" in session:
            session.invalidate()
        await _send(send, 303, b"", [(b"location", b"/")])
        return
    count = session.get("count", 0)
    if "count" not in session:
        session["count"] = 0
    route = session.route
    info = {"count": count, "server": scope.get("tandem.server"), "pid": os.getpid(),
            "primary": route.primary if route else None,
            "secondary": (route.secondary or "NONE") if route else None}
    if path == "/api":
        body = json.dumps(info).encode()
        await _send(send, 200, body, [(b"content-type", b"application/json")])
        return
    if path != "/":
        await _send(send, 404, b"not found\n", [(b"content-type", b"text/plain")])
        return
    page = _PAGE.format(
        count=count, server=html.escape(str(info["server"])), pid=info["pid"],
        primary=html.escape(str(info["primary"])), secondary=html.escape(str(info["secondary"])),
        sid=html.escape(session.id[:8]))
    await _send(send, 200, page.encode(), [(b"content-type", b"text/html; charset=utf-8"),
                                           (b"cache-control", b"no-store")])


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
