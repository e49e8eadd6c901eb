"""One connection of the backend's HTTP/1.1 server (`http_server.HttpServer`): an asyncio
Protocol parsing requests with httptools (llhttp), speaking ASGI.

One `HttpProtocol` per connection parses requests; each request becomes a
`backends.cycle.RequestCycle`, whose `receive`/`send` are the application's ASGI callables.
Keep-alive and pipelining: requests are answered one at a time, in order (reading pauses
while one waits its turn). Request bodies, chunked or with Content-Length, are parsed here
and streamed to the cycle (framing of responses: `backends.cycle`). WebSocket upgrades are
handed to `backends.websocket`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_to_bytes

import structlog
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from .cycle import STATUS_LINE, RequestCycle
from .websocket import WebSocketCycle, handshake_error

if TYPE_CHECKING:
    from .http_server import HttpServer

__all__ = ["HttpProtocol"]

log = structlog.get_logger("tandem.http")

_ASGI = {"version": "3.0", "spec_version": "2.3"}

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_PIPELINE = 1  # a request waits behind the one being answered
_BODY = 2  # a request body is buffered beyond the high-water mark
_HALTED = 4  # a request was refused: nothing more is read (websockets use 16)
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")}


class _Turn(Protocol):
    """What waits its turn on a connection: a request, a websocket, a refusal."""

    def start(self) -> None: ...

    def disconnected(self) -> None: ...


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests and runs them in order."""

    __slots__ = (
        "srv", "loop", "app",
        # per connection
        "transport", "parser", "client", "cycle", "queue", "incoming", "read_paused",
        "write_paused", "drained", "closed", "last_active", "ws",
        # per request being parsed
        "url", "headers", "head_bytes", "pending_head", "expect",
    )

    def __init__(self, srv: HttpServer) -> None:
        self.srv = srv
        self.loop = srv.loop or asyncio.get_running_loop()
        self.app = srv.app

        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.cycle: _Turn | None = None  # the request being answered
        self.queue: deque[_Turn] = deque()  # pipelined requests waiting their turn
        self.incoming: RequestCycle | None = None  # the request whose body is being parsed
        self.read_paused = 0  # bit set of the _PIPELINE... reasons above
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None  # set when writing may go on
        self.closed = False
        self.last_active = time.monotonic()
        self.ws: WebSocketCycle | None = None  # the websocket this connection became

        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # of the head being parsed
        self.pending_head = 0  # bytes of chunks that ended inside an unfinished head
        self.expect = False  # Expect: 100-continue

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        self.srv.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.connections.discard(self)
        for cycle in (self.cycle, self.incoming, *self.queue):
            if cycle is not None:
                cycle.disconnected()
        if self.ws is not None and self.ws is not self.cycle:
            self.ws.disconnected()
        self.queue.clear()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.write_paused and not self.closed:
            if self.drained is None:
                self.drained = self.loop.create_future()
            await self.drained

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close after what was written has been sent."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def shutdown(self) -> None:
        """The server is stopping: close when idle, or after the response in flight."""
        if self.ws is not None:
            self.ws.going_away()
        elif self.cycle is None and not self.pending_head and self.head_bytes == 0:
            self.close()

    def pause_reading(self, reason: int) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.read_paused & reason:
            self.read_paused &= ~reason
            if not self.read_paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # --- parsing ------------------------------------------------------------------------


    def pause_reading_body(self) -> None:
        """A request body is buffered beyond the high-water mark: read no more for now."""
        self.pause_reading(_BODY)

    def resume_reading_body(self) -> None:
        self.resume_reading(_BODY)
    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.feed(data)
            return
        if self.read_paused & _HALTED:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0]:])
            return
        except HttpParserError:
            too_large = self.head_bytes > self.srv.max_head_bytes or (
                len(self.headers) > self.srv.max_headers)
            self._refuse(431 if too_large else 400)
            return
        if self.head_bytes:  # the chunk ended inside a head: llhttp holds it back
            self.pending_head += len(data)
            if self.pending_head > self.srv.max_head_bytes:
                self._refuse(431)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_bytes = 1
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.srv.max_head_bytes:
            raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        headers = self.headers
        headers.append((name, value))
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.srv.max_head_bytes:
            raise ValueError("request head too large")
        if len(headers) > self.srv.max_headers:
            raise ValueError("too many header fields")

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.head_bytes = self.pending_head = 0
        url = self.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form, or '*'
            parsed = parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        if b"%" in raw_path:
            path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
        else:
            path = raw_path.decode("utf-8", "replace")
        method = parser.get_method()
        headers = self.headers
        scope: dict[str, Any] = {
            "type": "http", "asgi": _ASGI, "http_version": parser.get_http_version(),
            "method": _METHODS.get(method) or method.decode("ascii"), "scheme": "http",
            "path": path,
            "raw_path": raw_path, "query_string": query, "root_path": "", "headers": headers,
            "client": self.client, "server": self.srv.server_addr,
            "state": self.srv.state.copy() if self.srv.state else {},
        }
        cycle: _Turn
        if parser.should_upgrade() and _wants_websocket(scope):
            error = handshake_error(headers)
            if error is not None:
                self._refuse(*error)
                return
            scope["type"], scope["scheme"] = "websocket", "ws"
            cycle = self.ws = WebSocketCycle(self, scope)
        else:
            cycle = self.incoming = RequestCycle(
                self, scope, keep_alive=parser.should_keep_alive(), expect_continue=self.expect)
        if self.cycle is None:
            self.cycle = cycle
            cycle.start()
        else:
            self.queue.append(cycle)
            self.pause_reading(_PIPELINE)

    def on_body(self, body: bytes) -> None:
        if self.incoming is not None:
            self.incoming.body_received(body)

    def on_message_complete(self) -> None:
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.body_complete()

    def _upgraded(self, rest: bytes) -> None:
        if self.ws is not None:
            if rest:
                self.ws.feed(rest)
            return
        # An upgrade we do not speak (h2c, CONNECT...): answered as a plain request; what
        # follows its head is the next request.
        self.parser = HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _refuse(self, status: int, extra: bytes = b"") -> None:
        """Answer a request we cannot parse or accept, and close."""
        self.head_bytes = self.pending_head = 0
        self.pause_reading(_HALTED)
        broken, self.incoming = self.incoming, None  # a request whose body did not parse
        if broken is not None:
            broken.disconnected()  # its application sees http.disconnect; its answer is dropped
            if broken is self.cycle:
                self.cycle = None
                if broken.started and broken.head is None:  # part of its answer is out
                    self.close()
                    return
            elif broken in self.queue:
                self.queue.remove(broken)
        if self.ws is not None or self.closed:
            self.close()
            return
        body = f"{HTTPStatus(status).phrase}\n".encode()
        response = (STATUS_LINE[status] + b"content-type: text/plain\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n%s\r\n%s" % (len(body), extra, body))
        if self.cycle is None:
            self.write(response)
            self.close()
        else:  # after the responses to the requests before it
            self.queue.append(_Refusal(self, response))

    # --- the request being answered ------------------------------------------------------

    def cycle_done(self, cycle: _Turn, *, reusable: bool) -> None:
        """`cycle` has answered: go on with the next request, or close."""
        if cycle is not self.cycle:
            return
        self.cycle = None
        self.last_active = time.monotonic()
        if not reusable or self.srv.closing:
            self.queue.clear()
            self.close()
            return
        if self.queue:
            self.cycle = self.queue.popleft()
            self.cycle.start()
        if not self.queue:
            self.resume_reading(_PIPELINE)


class _Refusal:
    """An error response queued behind pipelined requests: written, then the connection
    closes."""

    __slots__ = ("conn", "response")

    def __init__(self, conn: HttpProtocol, response: bytes) -> None:
        self.conn = conn
        self.response = response

    def start(self) -> None:
        self.conn.write(self.response)
        self.conn.cycle_done(self, reusable=False)

    def disconnected(self) -> None:
        pass


def _wants_websocket(scope: dict[str, Any]) -> bool:
    if scope["method"] != "GET":
        return False
    for name, value in scope["headers"]:
        if name == b"upgrade":
            return b"websocket" in value.lower()
    return False
