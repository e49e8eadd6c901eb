"""The chaos harness's application for write-tracking load: a counter that also logs writes.

`POST /count?c=C&w=N` (C: the client, N: its write number; a small JSON body comes with it
and is read, not used) adds one to `session["counter"]` and appends `[N, when]` to
`session["log"]`, where `when` is this
server's `time.monotonic()` at the write — CLOCK_MONOTONIC is one clock for every process of
the machine, so the harness compares it with the moment its client was told the request had
failed (a write applied after that is a *late apply*). The log keeps the last `LOG_LIMIT`
writes; every response carries it with the counter, so a write that reaches the session
late, or twice, shows up in the client's next answers. `GET /count` only counts, as
`tests.apps:asgi_counter` does.

Every write is also logged by the server that applied it (event `chaos_write`: client,
write, when, counter, the session id's prefix), so the harness sees writes applied to a
copy of the session the client never reads again (a stale primary's, for instance).

The write number is in the URL, not the body, so that a request whose head reaches the
server without its body (the connection closed under it) is still told apart: such a
request is applied as an app that does not need its body would apply it.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs

import structlog

from backends.serve.lifespan import acknowledge_lifespan

__all__ = ["LOG_LIMIT", "app"]

# writes kept in the session: enough for the writes a client makes between two answers it
# sees, even when it waited through a long cut (one request at a time per client)
LOG_LIMIT = 64

log = structlog.get_logger("tandem.chaos_app")


async def _body(receive: Any) -> None:
    while (await receive()).get("more_body"):
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    session = scope["session"]
    status, info = 200, dict[str, Any]()
    if scope["path"] != "/count":
        status, info = 404, {"error": "not found"}
    else:
        await _body(receive)
        session["counter"] = session.get("counter", 0) + 1
        if scope["method"] == "POST":
            query = parse_qs(scope["query_string"].decode())
            write, at = int(query["w"][0]), round(time.monotonic(), 4)
            session["log"] = [*session.get("log", []), [write, at]][-LOG_LIMIT:]
            log.info("chaos_write", client=int(query["c"][0]), write=write, at=at,
                     counter=session["counter"], sid=session.id[:8])
        route = session.route
        info = {"counter": session["counter"], "log": session.get("log", []),
                "server": scope["tandem.server"],
                "primary": route.primary if route else None,
                "secondary": route.secondary if route else None}
    payload = json.dumps(info).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
