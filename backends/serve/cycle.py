"""One HTTP request and its response on the backend's HTTP server (`backends.http`): the
ASGI `receive` and `send` of its scope.

The request body is handed to `receive()` as it arrives, with flow control (reading pauses
while more than the server's `body_buffer_bytes` wait). A response is framed from its
`http.response.start`: with the application's Content-Length, else chunked (HTTP/1.1) or
delimited by closing (HTTP/1.0); HEAD, 1xx, 204 and 304 responses carry no body. A head
sent as its own message leaves with the first body message, in one write.
"""

from __future__ import annotations

import asyncio
import socket
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from .asgi import Message
    from .http import HttpProtocol

__all__ = ["RequestCycle", "STATUS_LINE"]

log = structlog.get_logger("tandem.http")

# status code -> status line (backends.http's own answers use it too)
STATUS_LINE = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii"))
               for s in HTTPStatus}
# Framing is the server's: an application's own framing headers are not passed on.
_SPECIAL = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade",
                      b"content-length"})
_FIELD = b"%s: %s\r\n"
_NO_BODY = frozenset({204, 304})
_DISCONNECT: Message = {"type": "http.disconnect"}
# Linux: the connection's TCP state is the first byte of TCP_INFO (1: ESTABLISHED); the
# peer's FIN makes it CLOSE_WAIT and its RST CLOSE even while its data is still unread.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_ESTABLISHED = 1
_monotonic = time.monotonic


class _Date:
    """The Date header line, rendered once per second."""

    second = 0
    line = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return cls.line


class RequestCycle:
    """One HTTP request and its response: the ASGI `receive` and `send` of its scope."""

    __slots__ = (
        "conn", "scope", "keep_alive", "expect_continue", "head_request", "task",
        # request body
        "chunks", "buffered", "complete", "delivered", "waiter", "gone", "read_at",
        # response
        "started", "finished", "head", "chunked", "no_body", "expected", "sent_bytes",
    )

    def __init__(self, conn: HttpProtocol, scope: dict[str, Any], *, keep_alive: bool,
                 expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.head_request = scope["method"] == "HEAD"
        self.task: asyncio.Task[None] | None = None

        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False  # the whole body has been parsed
        self.delivered = False  # ... and handed to the application
        self.waiter: asyncio.Future[None] | None = None
        self.gone = False  # the client disconnected
        # monotonic time of the read that brought this request's latest bytes: made while
        # its head is parsed, so the time the head was read (docs/consistency.md, I7);
        # the session middleware finds us in the scope until the response is complete
        self.read_at = _monotonic()
        scope["tandem.arrival"] = self

        self.started = False
        self.finished = False
        self.head: bytes | None = None  # the response head, until the first body message
        self.chunked = False
        self.no_body = False
        self.expected: int | None = None  # Content-Length of the response
        self.sent_bytes = 0

    def start(self) -> None:
        self.task = self.conn.loop.create_task(self.run())

    async def run(self) -> None:
        scope = self.scope
        try:
            await self.conn.app(scope, self.receive, self.send)
        except Exception:
            log.exception("app_error", path=scope["path"])
            if not self.started or self.head is not None:  # nothing sent yet: ours instead
                self._error(500, b"internal server error\n")
        except BaseException:
            self._finish(reusable=False)
            raise
        else:
            if not self.started:
                log.error("app_no_response", path=scope["path"])
                self._error(500, b"application sent no response\n")
        if not self.finished:  # the client cannot tell where the body ends
            if self.started and not self.gone:  # (gone: its body went nowhere, not short)
                log.error("app_incomplete_response", path=scope["path"])
            self._finish(reusable=False)

    def _error(self, status: int, body: bytes) -> None:
        """Our own answer when the application failed before its response head."""
        self.started = True
        self.head = None
        self.keep_alive = self.keep_alive and self.complete  # body still coming: close
        self.conn.write(STATUS_LINE[status] + b"content-type: text/plain\r\ncontent-length: %d\r\n"
                        b"%s\r\n%s" % (len(body), b"" if self.keep_alive else
                                       b"connection: close\r\n", body))
        self._finish(reusable=self.keep_alive)

    def _finish(self, *, reusable: bool) -> None:
        """The response is complete (or given up): the connection goes on or closes."""
        if self.head is not None:
            self.flush_head()
        self.finished = True
        # (the scope stays with the app: no reference back to us, a cycle only the garbage
        # collector would free)
        self.scope.pop("tandem.arrival", None)
        self._wake()
        if self.chunks:  # unread body: what is left of it is read and dropped
            self.chunks = []
            self.buffered = 0
        self.conn.resume_reading_body()
        self.conn.cycle_done(self, reusable=reusable and self.keep_alive and not self.gone)

    # --- events from the connection -------------------------------------------------------

    def body_received(self, body: bytes) -> None:
        if self.finished:
            return  # answered without reading it: the rest is read and dropped
        self.read_at = _monotonic()
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.conn.srv.body_buffer_bytes:
            self.conn.pause_reading_body()
        self._wake()

    def body_complete(self) -> None:
        self.complete = True
        self.read_at = _monotonic()
        self._wake()

    def disconnected(self) -> None:
        self.gone = True
        self._wake()

    def peer_closed(self) -> bool:
        """Whether the client has closed or reset the connection: its FIN or RST has
        arrived, whether or not we have read everything it sent before."""
        conn = self.conn
        if self.gone or conn.closed:
            return True
        transport = conn.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or _TCP_INFO is None:
            return False
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
        except OSError:  # not TCP (a Unix socket): nothing to tell
            return False
        return bool(info) and info[0] != _TCP_ESTABLISHED

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- ASGI ---------------------------------------------------------------------------

    async def receive(self) -> Message:
        while True:
            # What arrived before the client went away is delivered first: a request whose
            # body and FIN came together is whole, and its app sees its body, not nothing.
            if self.delivered:
                if self.finished or self.gone:
                    return _DISCONNECT
            elif self.chunks or self.complete:
                if len(self.chunks) == 1:
                    body = self.chunks[0]
                else:
                    body = b"".join(self.chunks)
                self.chunks = []
                self.buffered = 0
                self.conn.resume_reading_body()
                self.delivered = self.complete
                return {"type": "http.request", "body": body, "more_body": not self.complete}
            elif self.gone:
                return _DISCONNECT
            elif self.expect_continue:
                self.expect_continue = False
                if not self.started:
                    self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            waiter = self.waiter = self.conn.loop.create_future()
            await waiter

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if mtype == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self._start(message["status"], message.get("headers", ()))
            self.started = True
        elif mtype == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.finished:
                raise RuntimeError("http.response.body after the response was complete")
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            if self.gone:
                return  # nobody to send it to; the application learns from receive()
            self._body(body, more)
            if not more:
                self._finish(reusable=True)
            elif self.conn.write_paused:
                await self.conn.drain()
        else:
            raise RuntimeError(f"unexpected ASGI message {mtype!r} for an http scope")

    def _start(self, status: int, headers: Any) -> None:
        fields: list[bytes] = []  # name, value, name, value...
        length: int | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in _SPECIAL:
                if lname == b"content-length":
                    length = int(value)
                else:  # framing is ours
                    if lname == b"connection" and b"close" in value.lower():
                        self.keep_alive = False
                    continue
            fields += (name, value)
        n = len(fields) // 2
        given = _FIELD * n % tuple(fields)
        # one line per field: a CR or LF inside a name or value would smuggle in another
        if given.count(b"\n") != n or given.count(b"\r") != n:
            raise RuntimeError("response header names and values must not contain CR or LF")
        lines = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status, given]
        self.no_body = no_body = self.head_request or status in _NO_BODY or status < 200
        http11 = self.scope["http_version"] == "1.1"
        if length is not None:
            self.expected = length
        elif not no_body:
            if http11:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the end of the body is the end of the connection
        if self.conn.srv.closing:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        elif not http11:
            lines.append(b"connection: keep-alive\r\n")
        lines += (_Date.get(), b"\r\n")
        self.head = b"".join(lines)
        self.conn.srv.hold_head(self)

    def flush_head(self) -> None:
        head, self.head = self.head, None
        if head is not None:
            self.conn.write(head)

    def _body(self, body: bytes, more: bool) -> None:
        if self.no_body:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            self.sent_bytes += len(body)
            if self.expected is not None:
                if self.sent_bytes > self.expected:
                    raise RuntimeError("response body longer than its Content-Length")
                if not more and self.sent_bytes < self.expected:
                    self.keep_alive = False  # short: the client sees the connection close
            data = body
        head = self.head
        if head is not None:
            self.head = None
            if len(data) < 16384:
                self.conn.write(head + data)
                return
            self.conn.write(head)
        if data:
            self.conn.write(data)
