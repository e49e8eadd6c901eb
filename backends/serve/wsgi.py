"""Running a WSGI application as ASGI, in a thread pool, with the session in the environ.

The app sees its session at `environ["tandem.session"]`. The response head goes out (and
the session is committed) once the app has produced its first body chunk; a long body is
pulled from the app's iterable in the pool, a batch at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .asgi import Receive, Scope, Send

__all__ = ["WsgiToAsgi"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_BATCH = 64 * 1024  # bytes pulled from the app's iterable per trip to the pool


class WsgiToAsgi:
    """An ASGI app that runs a WSGI app in worker threads."""

    def __init__(self, app: WSGIApp, *, threads: int = 16) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            msg = await receive()
            await send({"type": "lifespan.startup.complete"})
            msg = await receive()
            if msg["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})  # WSGI has no websockets
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        environ = _environ(scope, bytes(body))
        loop = asyncio.get_running_loop()
        # The app's threads see the request's context variables (its session, log context).
        run = contextvars.copy_context().run
        status, headers, chunks, rest, closer = await loop.run_in_executor(
            self.executor, run, _start, self.app, environ)
        code = int(status.split(" ", 1)[0])
        await send({"type": "http.response.start", "status": code, "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
        try:
            while True:
                data = b"".join(chunks)
                if rest is None:
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    return
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                chunks, rest = await loop.run_in_executor(self.executor, run, _pull, rest)
        finally:
            if closer is not None:
                await loop.run_in_executor(self.executor, run, closer)


def _start(app: WSGIApp, environ: dict[str, Any]) -> tuple[
        str, list[tuple[str, str]], list[bytes], Iterator[bytes] | None,
        Callable[[], None] | None]:
    state: dict[str, Any] = {}
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and state.get("sent"):
            raise exc_info[1].with_traceback(exc_info[2])
        state["status"], state["headers"] = status, headers
        return written.append

    result = app(environ, start_response)
    closer = getattr(result, "close", None)
    iterator = iter(result)
    chunks, rest = _pull(iterator)
    if "status" not in state:
        raise RuntimeError("WSGI application did not call start_response")
    state["sent"] = True
    return state["status"], state["headers"], written + chunks, rest, closer


def _pull(iterator: Iterator[bytes]) -> tuple[list[bytes], Iterator[bytes] | None]:
    chunks: list[bytes] = []
    size = 0
    for chunk in iterator:
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size >= _BATCH:
                return chunks, iterator
    return chunks, None


def _environ(scope: Scope, body: bytes) -> dict[str, Any]:
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    path = scope["path"]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": client[0] if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)),
        "tandem.session": scope.get("session"),
        "tandem.server": scope.get("tandem.server"),
    }
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        val = value.decode("latin-1")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = val
            continue
        if key == "CONTENT_LENGTH":
            continue
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + val if key in environ else val
    return environ
