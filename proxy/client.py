"""The client side: one protocol instance per client connection, parsing requests with
httptools (llhttp) and handing each to an `Exchange`.

Pipelined requests are answered strictly one at a time, in order: requests that arrive
while one is in flight wait in a queue (their bodies buffered) and reading pauses until
the queue is empty. A request llhttp rejects (smuggling vectors included) is answered
with 400 and the connection closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import structlog
from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from .errors import (
    BodyTooLarge,
    ClientError,
    ClientProtocolError,
    HeadTooLarge,
    MethodNotAllowed,
    UnsupportedVersion,
)
from .exchange import Exchange
from .headers import (
    fast_fields,
    forwarded_for,
    forwarding_fields,
    request_head,
    scan_request,
    simple_response,
    trailer_block,
)
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .context import ProxyContext
    from .upstream import UpstreamProtocol

__all__ = ["ClientProtocol"]

log = structlog.get_logger("tandem.proxy")

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_PIPELINE = 1  # a request is queued behind the one in flight
_PENDING = 2  # body held while no backend connection is ready
_UPSTREAM = 4  # the backend's write buffer is full
_HALTED = 8  # the connection is being refused or closed: read nothing more
_UPGRADE = 16  # bytes after an upgrade request wait for the backend's answer

_MAX_TRAILERS = 256  # trailer fields of one request


# What ClientProtocol._lane finds in a head it could forward verbatim: (end of the head,
# Cookie, Content-Length or 0, forwarding fields).
_Fast = tuple[int, bytes | None, int, bytes]


class _NoCallbacks:
    """Parser callbacks of the fast lane: none (the lane knows the request is whole)."""


_NO_CALLBACKS = _NoCallbacks()


class ClientProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "ctx",
        # per connection
        "transport", "write", "writelines", "parser", "lean_parser", "client_ip", "for_node",
        "fields_key", "fields_scan", "fwd_host", "fwd_fields", "active", "queue", "incoming",
        "starting", "read_paused",
        "write_paused", "closed", "served", "idle_mark", "idle_since", "pending_error",
        "tunnel", "upgrade_buf", "own_upstream",
        # per request being parsed
        "url", "headers", "begun", "in_head", "head_pending", "chunk", "fast", "chunk_len",
        "completed", "body_size",
        # the last request the fast lane took
        "lane_data", "lane_last",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        # Validates requests that the fast lane forwards verbatim: no callbacks at all (see
        # _lane). Between messages both parsers are at a message boundary, so either can
        # take the next one.
        self.lean_parser = HttpRequestParser(_NO_CALLBACKS)
        self.client_ip = b"unknown"
        self.for_node = b"for=unknown"
        # The fields of the last head that started a chunk (after the CRLF ending its
        # request line, to the blank line), and what was found in them (Cookie,
        # Content-Length, the forwarding fields for its Host), or None when they need the
        # general path: a keep-alive client tends to repeat its fields.
        self.fields_key: bytes | None = None
        self.fields_scan: tuple[bytes | None, int, bytes] | None = None
        # The forwarding fields for the last Host seen (other fields change more often).
        self.fwd_host: bytes | None = None
        self.fwd_fields = b""
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.incoming: Exchange | None = None  # the request whose body is being parsed
        self.starting: Exchange | None = None  # to start once the current chunk is parsed
        self.read_paused = 0  # bit set of the _PIPELINE... reasons above
        self.write_paused = False
        self.closed = False
        # Idle watch (close_if_idle): exchanges completed, that count when last looked at,
        # and since when it has not moved.
        self.served = 0
        self.idle_mark = -1
        self.idle_since = 0.0
        self.pending_error: ClientError | None = None  # to answer once the queue is empty
        self.tunnel: Tunnel | None = None
        self.upgrade_buf: list[bytes] | None = None
        # An idle backend connection this connection keeps between its requests: a client
        # tends to stay with one backend (its session's), and the next request to that
        # backend goes out on it with no trip through the pool (see Exchange._try). Given
        # back to the pool when the next request goes elsewhere, when the housekeeping
        # finds this connection idle (so that the pool's keep-alive limit applies), and
        # when this connection closes.
        self.own_upstream: UpstreamProtocol | None = None

        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # the head's, then the trailers
        self.begun = False  # the parser holds part of a message (from its first byte on)
        self.in_head = True  # between requests, or inside a request head
        self.head_pending = 0  # bytes of chunks that held only an unfinished head
        self.chunk: bytes | None = None  # the chunk being parsed, if it began a message
        self.fast: _Fast | None = None  # what _lane found in it
        self.chunk_len = 0  # size of the chunk being parsed
        self.completed = 0  # messages completed in the chunk being parsed
        self.body_size = 0

        # The last request the fast lane validated and forwarded, and what the lane found
        # in it: (self.fast for it, method, Cookie, end of the request line, head to
        # forward without the request id, Content-Length or 0). A keep-alive client tends
        # to repeat its requests byte for byte (see data_received).
        self.lane_data = b""  # (never a request: data_received gets no empty read)
        self.lane_last: tuple[_Fast, bytes, bytes | None, int, bytes, int] | None = None

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.write = transport.write  # type: ignore[attr-defined]
        self.writelines = transport.writelines  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            ip = str(peer[0])
            self.client_ip = ip.encode("ascii")
            self.for_node = forwarded_for(ip)
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        self.give_back_upstream()
        if self.tunnel is not None:
            self.tunnel.client_lost()
            return
        if self.active is not None:
            self.active.abort()
        for ex in self.queue:
            ex.abort()
        self.queue.clear()
        self.active = self.incoming = None

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it asked for, then close."""
        self.read_paused |= _HALTED
        if self.tunnel is not None or self.incoming is not None or self.active is None:
            return None  # nothing complete to answer: close now
        return True  # keep the transport open for the response; exchange_done closes it

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.give_back_upstream()
            self.read_paused |= _HALTED
            if self.transport is not None:
                self.transport.close()

    def give_back_upstream(self) -> None:
        """Return the backend connection this connection keeps (if any) to its pool."""
        up = self.own_upstream
        if up is not None:
            self.own_upstream = None
            up.pool.put(up)

    def is_idle(self) -> bool:
        return self.active is None and self.tunnel is None and self.upgrade_buf is None

    def close_if_idle(self, now: float, idle_s: float) -> None:
        """Close a keep-alive connection with no request in flight for idle_s (slow heads
        included). Called about once a second: the idle time is counted from the first
        call that finds the connection idle (no clock read per request)."""
        if not self.is_idle():
            self.idle_mark = -1
        elif self.idle_mark != self.served:
            self.idle_mark = self.served
            self.idle_since = now
            # From here on its backend connection idles in the pool, whose keep-alive
            # limit and sweep apply (counted from now, within a sweep of its last use).
            self.give_back_upstream()
        elif now - self.idle_since > idle_s:
            self.close()

    # --- flow control -------------------------------------------------------------------------

    def _pause(self, bit: int) -> None:
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        self.read_paused |= bit

    def _resume(self, bit: int) -> None:
        if self.read_paused & bit:
            self.read_paused &= ~bit
            if not self.read_paused and self.transport is not None:
                self.transport.resume_reading()

    def pause_reading_pending(self) -> None:
        self._pause(_PENDING)

    def resume_reading_pending(self) -> None:
        self._resume(_PENDING)

    def pause_reading_upstream(self) -> None:
        self._pause(_UPSTREAM)

    def resume_reading_upstream(self) -> None:
        self._resume(_UPSTREAM)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_upstream()
        elif self.active is not None and self.active.upstream is not None:
            self.active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_upstream()
        elif self.active is not None and self.active.upstream is not None:
            self.active.upstream.resume_reading()

    # --- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrade_buf is not None:
            self.upgrade_buf.append(data)
            self._pause(_UPGRADE)
            return
        if self.read_paused & _HALTED:
            return
        if not self.begun:
            if data == self.lane_data:
                # Byte for byte the last request the lane took, which llhttp accepted: it
                # would accept it again, so no scan and no parse. The lean parser stays
                # at a message boundary, as it would after it.
                last = self.lane_last
                assert last is not None
                fast, method, cookie, first, prefix, length = last
                if self.active is None and not self.read_paused:
                    self._forward(data, method, cookie, first, prefix, length)
                    return
                self.fast = fast  # for the general path, as _lane would find it
            elif self._lane(data):  # the chunk starts a message
                return
        self.completed = 0
        self.chunk_len = len(data)
        self.chunk = None if self.begun else data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgrade_buf = [data[exc.args[0]:]]
            self._pause(_UPGRADE)
        except HttpParserCallbackError as exc:
            err = exc.__context__
            if isinstance(err, ClientError):
                self._reject(err)
            else:
                self._internal_error(err if err is not None else exc)
        except HttpParserError as exc:
            self._reject(ClientProtocolError(f"malformed request: {exc}"))
        else:
            if self.in_head:
                if not self.completed:
                    # A chunk that held nothing but an unfinished head: llhttp buffers a
                    # header line until it is complete, so bound what can pile up.
                    self.head_pending += len(data)
                    if self.head_pending > self.ctx.max_head:
                        self._reject(HeadTooLarge("request head too large"))
            elif len(self.headers) > _MAX_TRAILERS:
                self._reject(HeadTooLarge("too many trailer fields"))
        self.chunk = self.fast = None
        ex = self.starting
        if ex is not None:
            # Started after the whole chunk is parsed: a small body that came with the
            # head leaves in the same write as the head.
            self.starting = None
            self._start(ex)

    def _lane(self, data: bytes) -> bool:
        """The fast lane: when `data` is exactly one whole HTTP/1.1 request whose head can be
        forwarded verbatim (plus the forwarding fields and the request id) and nothing else
        is under way on the connection — what a keep-alive client sends, one request at a
        time — it is validated by the lean parser and sent on, with no per-field work.
        False: the general path takes `data`; `self.fast` holds what was found (its head's
        end, Cookie, Content-Length, forwarding fields) when the head could go verbatim."""
        self.fast = None
        line, crlf, rest = data.partition(b"\r\n")
        if not crlf:
            return False
        first = len(line)
        key = self.fields_key
        if rest == key or (key is not None and rest.startswith(key)):
            # The fields of the last head again, with no body or with one (a keep-alive
            # client tends to repeat its fields; its request line changes more often).
            end = first + len(key) - 2
            scan = self.fields_scan
        else:
            end = data.find(b"\r\n\r\n", first)
            if end < 0:
                return False
            self.fields_key = data[first + 2:end + 4]
            found = fast_fields(data[first:end + 2])
            if found is None:
                scan = self.fields_scan = None
            else:
                host = found[0]
                if host != self.fwd_host:
                    self.fwd_host = host
                    self.fwd_fields = forwarding_fields(host, client_ip=self.client_ip,
                                                        for_node=self.for_node)
                scan = self.fields_scan = (found[1], found[2], self.fwd_fields)
        if scan is None:
            return False
        cookie, length, fwd = scan
        self.fast = (end, cookie, length, fwd)
        ctx = self.ctx
        if (self.active is not None or self.read_paused or end + 4 + length != len(data)
                or end >= ctx.max_head or length > ctx.lane_max_body):
            return False
        parser = self.lean_parser
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:  # CONNECT (a tunnel, to llhttp): the general path refuses it
            self.lean_parser = HttpRequestParser(_NO_CALLBACKS)
            return False
        except HttpParserError as exc:
            self._reject(ClientProtocolError(f"malformed request: {exc}"))
            return True
        if not parser.should_keep_alive():
            # Not HTTP/1.1 (with no Connection field, only HTTP/1.1 is kept alive): the
            # general path takes it, from a parser that has not seen it (the lean one
            # expects nothing more after a message that closes its connection).
            self.lean_parser = HttpRequestParser(_NO_CALLBACKS)
            self.fast = None
            return False
        method = parser.get_method()
        prefix = data[:end + 2] + fwd
        self.lane_data = data
        self.lane_last = (self.fast, method, cookie, first, prefix, length)
        self._forward(data, method, cookie, first, prefix, length)
        return True

    def _forward(self, data: bytes, method: bytes, cookie: bytes | None, first: int,
                 prefix: bytes, length: int) -> None:
        """Send on a request the fast lane took: `data` is the whole request (its request
        line ends at `first`), `prefix` its head with the forwarding fields (the request id
        goes next), `length` the size of its body (at the end of `data`)."""
        ctx = self.ctx
        tokens = ctx.tokens
        route = None if cookie is None else tokens.by_cookie.get(cookie)
        if route is None:  # (the target, for a token in the URL)
            route = tokens.route(cookie, data[data.find(b" ") + 1:first - 9])
        ex = self.active = Exchange(self, ctx, method, prefix + ctx.request_ids.field(),
                                    route)
        if length:
            ex.feed_body(data[-length:])
        ex.body_done = True
        try:
            ex.start()
        except Exception as exc:
            self._internal_error(exc)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.begun = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ctx = self.ctx
        url, raw = self.url, self.headers
        self.url = b""
        self.headers = []  # trailers, if any, go here
        self.in_head = False
        if self.head_pending + self.chunk_len > ctx.max_head:  # maybe too big: measure
            size = len(url) + sum(len(n) + len(v) + 4 for n, v in raw)
            if size > ctx.max_head:
                raise HeadTooLarge("request head too large")
        self.head_pending = 0
        self.body_size = 0
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise MethodNotAllowed("CONNECT is not supported by a reverse proxy")
        keep_alive = parser.should_keep_alive()
        chunk = self.chunk
        fast = self.fast if chunk is not None and not self.completed else None
        if chunk is not None and fast is not None and keep_alive:
            # HTTP/1.1 (kept alive with no Connection field), no Upgrade, no
            # Transfer-Encoding, no Expect: forwarded verbatim
            end, cookie, length, fwd = fast
            head = chunk[:end + 2] + fwd
            content_length: int | None = length
            http10 = upgrade = chunked = expect_continue = False
        else:
            version = parser.get_http_version()
            http10 = version == "1.0"
            if not http10 and version != "1.1":
                raise UnsupportedVersion(f"HTTP/{version} is not supported")
            upgrade = parser.should_upgrade()
            rh = scan_request(raw, http10=http10)
            if rh.host is None and not http10:
                raise ClientProtocolError("HTTP/1.1 request without Host")
            head = request_head(method, url, rh, client_ip=self.client_ip,
                                for_node=self.for_node, default_host=ctx.default_host,
                                upgrade=upgrade)
            cookie, content_length, chunked = rh.cookie, rh.content_length, rh.chunked
            expect_continue = rh.expect_continue and (chunked or bool(content_length))
        if ctx.max_body and content_length is not None and content_length > ctx.max_body:
            raise BodyTooLarge(f"request body larger than {ctx.max_body} bytes")
        ex = Exchange(self, ctx, method, head + ctx.request_ids.field(),
                      ctx.tokens.route(cookie, url))
        if upgrade or not keep_alive:
            ex.keep_alive = False
        if http10:
            ex.http10 = True
        if upgrade:
            ex.upgrade = True
        if expect_continue:
            ex.expect_continue = True
        if chunked:
            ex.chunked_in = True
        self.incoming = ex
        if self.active is None:
            self.active = self.starting = ex
        else:
            self.queue.append(ex)
            self._pause(_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.incoming
        if ex is None:
            return
        max_body = self.ctx.max_body
        if max_body:
            self.body_size += len(body)
            if self.body_size > max_body:
                raise BodyTooLarge(f"request body larger than {max_body} bytes")
        if ex.chunked_in:
            ex.feed_body(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            ex.feed_body(body)

    def on_message_complete(self) -> None:
        self.completed += 1
        self.begun = False
        self.in_head = True
        self.head_pending = 0
        trailers = self.headers
        if trailers:
            self.headers = []
        ex = self.incoming
        if ex is not None:
            self.incoming = None
            if ex.chunked_in:
                ex.feed_body(trailer_block(trailers))
            ex.body_done = True

    # --- answering ----------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange, keep: bool) -> None:
        """The active exchange has written its whole response (`keep`: the connection may
        carry another request)."""
        if ex is not self.active:
            return
        self.active = None
        self.served += 1
        if self.read_paused:
            self._resume(_PENDING | _UPSTREAM)
        if self.closed:
            return
        if self.incoming is ex:  # answered before its body was read: cannot continue
            keep = False
        if not keep or (self.ctx.closing and not self.queue):
            self.close()
            return
        if self.queue:
            nxt = self.active = self.queue.popleft()
            if not self.queue:
                self._resume(_PIPELINE)
            self.ctx.loop.call_soon(self._start, nxt)
            return
        if self.pending_error is not None:
            self._answer_error(self.pending_error)
            return
        if self.read_paused & _HALTED:  # half-closed by the client: nothing more will come
            self.close()

    def _start(self, ex: Exchange) -> None:
        if ex is not self.active or ex.finished or self.closed:
            return
        try:
            ex.start()
        except Exception as exc:
            self._internal_error(exc)

    def start_tunnel(self, ex: Exchange, up: UpstreamProtocol, rest: bytes) -> None:
        """The backend answered 101: pass bytes through both ways from now on."""
        self.active = None
        self.queue.clear()
        tunnel = self.tunnel = up.tunnel = Tunnel(self, up)
        buffered, self.upgrade_buf = self.upgrade_buf, None
        if rest:
            self.write(rest)
        if buffered:
            tunnel.from_client(b"".join(buffered))
        if self.write_paused:
            up.pause_reading()
        self._resume(_UPGRADE | _PIPELINE | _PENDING)

    def _reject(self, err: ClientError) -> None:
        """The request being parsed is refused: answer it in turn, then close."""
        self._pause(_HALTED)
        self.ctx.metrics.client_errors += 1
        log.info("client_error", status=err.status, error=str(err),
                 client=self.client_ip.decode("ascii", "replace"))
        ex, self.incoming = self.incoming, None
        if ex is not None:
            if ex is self.active:
                ex.fail_client(err)
                return
            if ex in self.queue:
                self.queue.remove(ex)
            ex.abort()
        self.pending_error = err
        if self.active is None:
            self._answer_error(err)

    def _answer_error(self, err: ClientError) -> None:
        self.pending_error = None
        text = str(err) or err.reason.decode("ascii")
        self.write(simple_response(err.status, err.reason, text, close=True))
        self.ctx.metrics.responses[err.status // 100] += 1
        self.close()

    def _internal_error(self, exc: BaseException) -> None:
        self.ctx.metrics.internal_errors += 1
        log.error("internal_error", client=self.client_ip.decode("ascii", "replace"),
                  exc_info=exc)
        self._pause(_HALTED)
        active = self.active
        if active is not None and not active.finished:
            active.on_internal_error(exc)  # answers 500 unless already responding
            return
        self.write(simple_response(500, b"Internal Server Error", "internal proxy error",
                                   close=True))
        self.ctx.metrics.responses[5] += 1
        self.close()
