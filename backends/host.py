"""Serving an ASGI application with aiohttp's HTTP server (HTTP/1.1 and WebSocket).

A thin bridge: one scope per request, the request body streamed through `receive`, the
response streamed from `send`, WebSockets through aiohttp's WebSocketResponse, and the
ASGI lifespan protocol run at start and stop when the application speaks it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict

from .asgi import ASGIApp, Message

__all__ = ["AsgiHost", "Lifespan"]

log = structlog.get_logger("tandem.http")

# Framing is aiohttp's job: the application's own framing headers are not passed on.
_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade"})


class AsgiHost:
    """An aiohttp low-level handler that runs an ASGI application."""

    def __init__(self, app: ASGIApp, *, server: tuple[str, int]) -> None:
        self.app = app
        self.server = server

    def _scope(self, request: web.BaseRequest, kind: str) -> dict[str, Any]:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        raw_path, _, query = request.raw_path.partition("?")
        scope: dict[str, Any] = {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": ("wss" if request.secure else "ws") if kind == "websocket" else (
                "https" if request.secure else "http"),
            "path": request.path,
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": tuple(peer[:2]) if peer else None,
            "server": self.server,
            "state": {},
        }
        if kind == "websocket":
            scope["subprotocols"] = [p.strip() for p in request.headers.get(
                "Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        return scope

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await self._websocket(request)
        return await self._http(request)

    async def _http(self, request: web.BaseRequest) -> web.StreamResponse:
        scope = self._scope(request, "http")
        done = asyncio.Event()
        body_done = False
        response: web.StreamResponse | None = None

        async def receive() -> Message:
            nonlocal body_done
            if not body_done:
                chunk = await request.content.readany()
                body_done = request.content.at_eof()
                return {"type": "http.request", "body": chunk, "more_body": not body_done}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal response
            mtype = message["type"]
            if mtype == "http.response.start":
                if response is not None:
                    raise RuntimeError("http.response.start sent twice")
                headers: CIMultiDict[str] = CIMultiDict()
                for k, v in message.get("headers", ()):
                    name = k.decode("latin-1")
                    if name.lower() not in _DROP:
                        headers.add(name, v.decode("latin-1"))
                response = web.StreamResponse(status=message["status"], headers=headers)
                await response.prepare(request)
            elif mtype == "http.response.body":
                if response is None:
                    raise RuntimeError("http.response.body before http.response.start")
                body = message.get("body", b"")
                if body:
                    await response.write(body)
                if not message.get("more_body", False):
                    await response.write_eof()
                    done.set()

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("app_error", path=request.path)
            if response is None:
                return web.Response(status=500, text="internal server error\n")
            raise  # head already sent: aiohttp drops the connection
        finally:
            done.set()
        if response is None:
            log.error("app_no_response", path=request.path)
            return web.Response(status=500, text="application sent no response\n")
        return response

    async def _websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        scope = self._scope(request, "websocket")
        ws: web.WebSocketResponse | None = None
        connected = False
        rejected: web.StreamResponse | None = None

        async def receive() -> Message:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            if ws is None:
                return {"type": "websocket.disconnect", "code": 1006}
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                return {"type": "websocket.receive", "text": msg.data}
            if msg.type == WSMsgType.BINARY:
                return {"type": "websocket.receive", "bytes": msg.data}
            return {"type": "websocket.disconnect", "code": ws.close_code or 1000}

        async def send(message: Message) -> None:
            nonlocal ws, rejected
            mtype = message["type"]
            if mtype == "websocket.accept":
                sub = message.get("subprotocol")
                ws = web.WebSocketResponse(protocols=(sub,) if sub else ())
                for k, v in message.get("headers", ()):
                    ws.headers.add(k.decode("latin-1"), v.decode("latin-1"))
                await ws.prepare(request)
            elif mtype == "websocket.send":
                if ws is None:
                    raise RuntimeError("websocket.send before websocket.accept")
                if message.get("text") is not None:
                    await ws.send_str(message["text"])
                else:
                    await ws.send_bytes(message.get("bytes") or b"")
            elif mtype == "websocket.close":
                if ws is None:
                    rejected = web.Response(status=403, text="websocket rejected\n")
                else:
                    await ws.close(code=message.get("code", 1000),
                                   message=(message.get("reason") or "").encode())
            elif mtype == "websocket.http.response.start":
                rejected = web.StreamResponse(status=message["status"])

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("app_error", path=request.path)
            if ws is None:
                return web.Response(status=500, text="internal server error\n")
        if ws is not None:
            if not ws.closed:
                await ws.close()
            return ws
        return rejected or web.Response(status=403, text="websocket rejected\n")


class Lifespan:
    """Runs the ASGI lifespan protocol, if the application supports it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.supported = True

    async def startup(self) -> None:
        async def receive() -> Message:
            return await self._queue.get()

        async def send(message: Message) -> None:
            await self._events.put(message)

        async def run() -> None:
            try:
                await self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                               receive, send)
            except Exception:
                self.supported = False  # apps without lifespan raise on the scope: fine
            await self._events.put({"type": "lifespan.gone"})

        self._task = asyncio.create_task(run(), name="asgi-lifespan")
        await self._queue.put({"type": "lifespan.startup"})
        event = await self._events.get()
        if event["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"application start-up failed: {event.get('message', '')}")
        if event["type"] == "lifespan.gone":
            self.supported = False

    async def shutdown(self) -> None:
        if self._task is None:
            return
        if self.supported and not self._task.done():
            await self._queue.put({"type": "lifespan.shutdown"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events.get(), 10)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
