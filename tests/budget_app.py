"""The app of the memory-budget and offload tests: sessions of a chosen size.

GET /fill?key=K&bytes=N&seed=S   session[K] = N characters derived from S (`value_of`);
                                 a SessionTooLarge is answered 200 {"error", "size", "limit"}
GET /read?key=K                  {"len", "sha256"} of session[K] (null when absent)
GET /count                       increments session["counter"]
GET /invalidate                  ends the session
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

from backends.errors import SessionTooLarge
from backends.serve.lifespan import acknowledge_lifespan


def value_of(seed: str, n: int) -> str:
    """N characters of the hex digests of the seed, repeated: the same on both sides."""
    block = "".join(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(32))
    return (block * (n // len(block) + 1))[:n]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    session = scope["session"]
    args = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    info: dict[str, Any] = {"server": scope["tandem.server"]}
    path = scope["path"]
    if path == "/fill":
        try:
            session[args["key"]] = value_of(args.get("seed", ""), int(args["bytes"]))
        except SessionTooLarge as exc:
            info.update(error=str(exc), key=exc.key, size=exc.size, limit=exc.limit)
    elif path == "/read":
        value = session.get(args["key"])
        info.update(len=None if value is None else len(value),
                    sha256=None if value is None else digest(value))
    elif path == "/invalidate":
        session.invalidate()
    elif path == "/count":
        session["counter"] = session.get("counter", 0) + 1
        info["counter"] = session["counter"]
    else:
        info["error"] = "not found"
    body = json.dumps(info).encode()
    await send({"type": "http.response.start", "status": 200 if "server" in info else 404,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
