"""WebSocket connections of the backend's HTTP server, as ASGI `websocket` scopes.

The HTTP server (`backends.http`) parses the upgrade request and hands the connection to a
`WebSocketCycle`; the frames are wsproto's (a sans-IO implementation of RFC 6455 with
permessage-deflate). The handshake answer (101) goes out on `websocket.accept`; a
`websocket.close` before it is a 403, and `websocket.http.response.*` sends any other
answer (the ASGI denial-response extension).
"""

from __future__ import annotations

import asyncio
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import LocalProtocolError, generate_accept_token

if TYPE_CHECKING:
    from .asgi import Message as AsgiMessage
    from .http import HttpProtocol

__all__ = ["WebSocketCycle", "handshake_error"]

log = structlog.get_logger("tandem.http")

_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_MAX_QUEUED = 64  # received messages the application has not taken yet (then reading pauses)
_CLOSE_WAIT_S = 5.0  # after our close frame, how long the client has to answer it
_READING = 16  # HttpProtocol.pause_reading reason (its own are 1-8): the application is behind
_MAX_EARLY_BYTES = 64 * 1024  # received before the accept (then reading pauses)


def handshake_error(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
    """(status, extra header lines) when a websocket upgrade request is not a valid one."""
    key = version = None
    for name, value in headers:
        if name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value.strip()
    if version != b"13":
        return 426, b"sec-websocket-version: 13\r\n"
    if key is None or len(key.strip()) != 24:
        return 400, b""
    return None


class WebSocketCycle:
    """One websocket from its upgrade request to its close: the ASGI receive and send."""

    def __init__(self, conn: HttpProtocol, scope: dict[str, Any]) -> None:
        self.conn = conn
        scope["subprotocols"] = []
        scope["extensions"] = {"websocket.http.response": {}}
        for name, value in scope["headers"]:
            if name == b"sec-websocket-protocol":
                scope["subprotocols"] += [p.strip() for p in value.decode("latin-1").split(",")
                                          if p.strip()]
        self.scope = scope
        self.task: asyncio.Task[None] | None = None
        self.ws: Connection | None = None  # after the accept
        self.early: list[bytes] = []  # bytes that came before the accept
        self.state = "connecting"  # connecting | open | closing | closed | rejected
        self.connect_sent = False
        self.events: deque[AsgiMessage] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.parts: list[Any] = []  # the fragments of the message being received
        self.part_bytes = 0
        self.denial_started = False
        self.close_timer: asyncio.TimerHandle | None = None

    # --- from the connection ------------------------------------------------------------

    def start(self) -> None:
        self.task = self.conn.loop.create_task(self.run())

    def feed(self, data: bytes) -> None:
        if self.ws is None:
            self.early.append(data)
            if sum(map(len, self.early)) > _MAX_EARLY_BYTES:
                self.conn.pause_reading(_READING)
            return
        self.ws.receive_data(data)
        self._events()

    def disconnected(self) -> None:
        if self.state != "closed":
            self.state = "closed"
            self.events.append({"type": "websocket.disconnect", "code": 1006})
        self._wake()

    def going_away(self) -> None:
        """The server is stopping."""
        if self.state == "open":
            self._close(1001, "server shutting down")
        elif self.state == "connecting" and self.task is None:
            self.conn.close()

    # --- ASGI ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.conn.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("app_error", path=self.scope["path"])
            if self.state == "connecting":
                self._reject(500)
            elif self.state == "open":
                self._close(1011, "")
        else:
            if self.state == "connecting" and not self.denial_started:
                self._reject(403)  # neither accepted nor refused: refused
            elif self.state == "connecting":
                self.conn.close()  # a denial response without its end
            elif self.state == "open":
                self._close(1000, "")
        finally:
            if self.state == "rejected":
                self.conn.close()

    async def receive(self) -> AsgiMessage:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        while not self.events:
            if self.state in ("closed", "rejected"):
                return {"type": "websocket.disconnect", "code": 1006}
            self.waiter = self.conn.loop.create_future()
            await self.waiter
        msg = self.events.popleft()
        if len(self.events) < _MAX_QUEUED // 2:
            self.conn.resume_reading(_READING)
        return msg

    async def send(self, message: AsgiMessage) -> None:
        mtype = message["type"]
        if mtype == "websocket.accept":
            if self.state != "connecting":
                raise RuntimeError(f"websocket.accept when the websocket is {self.state}")
            self._accept(message)
        elif mtype == "websocket.send":
            if self.state != "open" or self.ws is None:
                if self.state == "connecting":
                    raise RuntimeError("websocket.send before websocket.accept")
                raise ConnectionResetError("the websocket is closed")
            text = message.get("text")
            event: Message[Any] = TextMessage(data=text) if text is not None else BytesMessage(
                data=message.get("bytes") or b"")
            self.conn.write(self.ws.send(event))
            if self.conn.write_paused:
                await self.conn.drain()
        elif mtype == "websocket.close":
            if self.state == "connecting":
                self._reject(403)
            elif self.state == "open":
                self._close(int(message.get("code") or 1000), message.get("reason") or "")
        elif mtype == "websocket.http.response.start":
            if self.state != "connecting":
                raise RuntimeError("websocket.http.response.start after the handshake")
            self._deny_start(message)
        elif mtype == "websocket.http.response.body":
            if not self.denial_started:
                raise RuntimeError("websocket.http.response.body before its start")
            self.conn.write(message.get("body", b""))
            if not message.get("more_body", False):
                self.state = "rejected"
                self.conn.close()
        else:
            raise RuntimeError(f"unexpected ASGI message {mtype!r} for a websocket scope")

    # --- internals ----------------------------------------------------------------------

    def _accept(self, message: AsgiMessage) -> None:
        key = b""
        offers: list[str] = []
        for name, value in self.scope["headers"]:
            if name == b"sec-websocket-key":
                key = value.strip()
            elif name == b"sec-websocket-extensions":
                offers.append(value.decode("latin-1"))
        lines = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                 b"connection: Upgrade\r\nsec-websocket-accept: ", generate_accept_token(key),
                 b"\r\n"]
        sub = message.get("subprotocol")
        if sub:
            lines.append(b"sec-websocket-protocol: %s\r\n" % sub.encode("latin-1"))
        extensions: list[Any] = [PerMessageDeflate()]
        accepted = server_extensions_handshake(offers, extensions) if offers else None
        if accepted:
            lines.append(b"sec-websocket-extensions: %s\r\n" % accepted)
        else:
            extensions = []
        for name, value in message.get("headers", ()):
            if name.lower() not in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        self.conn.write(b"".join(lines))
        self.state = "open"
        self.ws = Connection(ConnectionType.SERVER, extensions)
        early, self.early = b"".join(self.early), []
        self.conn.resume_reading(_READING)
        if early:
            self.feed(early)

    def _reject(self, status: int) -> None:
        body = f"{HTTPStatus(status).phrase}\n".encode()
        self.conn.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                        b"connection: close\r\n\r\n%s" % (
                            status, HTTPStatus(status).phrase.encode(), len(body), body))
        self.state = "rejected"
        self.conn.close()

    def _deny_start(self, message: AsgiMessage) -> None:
        status = int(message["status"])
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status))]
        for name, value in message.get("headers", ()):
            if name.lower() not in (b"connection", b"transfer-encoding"):
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"connection: close\r\n\r\n")
        self.conn.write(b"".join(lines))
        self.denial_started = True

    def _close(self, code: int, reason: str) -> None:
        """Send our close frame; the connection closes when the client answers it."""
        if self.ws is None or self.state != "open":
            return
        self.state = "closing"
        try:
            self.conn.write(self.ws.send(CloseConnection(code=code, reason=reason)))
        except LocalProtocolError:
            self.conn.close()
            return
        self.close_timer = self.conn.loop.call_later(_CLOSE_WAIT_S, self.conn.close)

    def _events(self) -> None:
        assert self.ws is not None
        for event in self.ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self.state != "open":
                    continue
                self.parts.append(event.data)
                self.part_bytes += len(event.data)
                if self.part_bytes > _MAX_MESSAGE_BYTES:
                    self._close(1009, "message too big")
                    continue
                if not event.message_finished:
                    continue
                parts, self.parts, self.part_bytes = self.parts, [], 0
                if isinstance(event, TextMessage):
                    self.events.append({"type": "websocket.receive", "text": "".join(parts)})
                else:
                    self.events.append({"type": "websocket.receive", "bytes": b"".join(parts)})
                if len(self.events) >= _MAX_QUEUED:
                    self.conn.pause_reading(_READING)
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:
                    self.conn.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    # the client closed: answer with its code (a parse failure has its own)
                    self.conn.write(self.ws.send(event.response()))
                elif self.ws.state is ConnectionState.OPEN:  # a frame we could not parse
                    self.conn.write(self.ws.send(CloseConnection(code=event.code)))
                if self.close_timer is not None:
                    self.close_timer.cancel()
                if self.state != "closed":
                    self.events.append({"type": "websocket.disconnect", "code": event.code,
                                        "reason": event.reason or ""})
                self.state = "closed"
                self.conn.close()
                break
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
