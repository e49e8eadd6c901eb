"""Connections to backends: the upstream protocol (httptools response parser) and a
keep-alive pool per backend (bounded idle connections, idle timeout `proxy.keepalive_s`).

An upstream connection serves one exchange at a time; the exchange receives the parser's
events and decides what they mean (relay, fail over, retry).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from .errors import UpstreamConnectError, map_connect_errors
from .headers import DROP_PREFIXES, HOP_BY_HOP, fast_response_head

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .router import Backend

__all__ = ["UpstreamProtocol", "Pool"]


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a backend."""

    __slots__ = (
        "pool", "transport", "full_parser", "lean_parser", "bare_parser", "parser", "probe",
        # per exchange
        "exchange", "head_only", "interim", "status", "reason", "headers", "keep_alive",
        "got_bytes", "fast_head", "until_close", "reading_paused", "writing_paused",
        "whole_data", "whole_end", "shape", "shape_length",
        # lifetime
        "requests", "idle_since", "activity", "tunnel",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # Two parsers, chosen per response: the lean one (no per-field callbacks) when
        # the head can be relayed verbatim, the full one otherwise. Between responses
        # both are at a message boundary, so either can take the next one.
        self.full_parser = HttpResponseParser(self)
        self.lean_parser: HttpResponseParser | None = None
        # No callbacks at all: validates a whole response relayed as read (data_received).
        self.bare_parser: HttpResponseParser | None = None
        self.parser = self.full_parser  # the one parsing the current response
        # Validates a response that looks whole in one read and notes what the relay
        # needs to know of its fields, in one pass (see data_received); None after a
        # response it could not relay whole, until the next one relayed whole.
        self.probe: _Probe | None = _Probe()

        self.exchange: Any = None
        self.head_only = False  # response to HEAD: complete when its head is
        self.interim = False  # parsing a 1xx interim response
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []  # the head's, then the trailers
        self.keep_alive = False
        self.got_bytes = False  # any byte of a response seen for the current exchange
        # (head verbatim, has Content-Length) when the current response needs no rewriting
        self.fast_head: tuple[bytes, bool] | None = None
        self.until_close = False  # response body delimited by connection close
        # The last response relayed whole, and where its head ends: a backend may repeat
        # a response byte for byte, and one that llhttp already accepted is relayed with
        # no scan and no parse (see data_received).
        self.whole_data = b""  # (never a response: data_received gets no empty read)
        self.whole_end = 0
        # The shape of the head (blank line included) of the last response the one-pass
        # check relayed whole — its bytes with every digit read as 0 — and where the value
        # of its Content-Length field lies in it; None: no shape to match. A backend's
        # heads tend to differ only in digits (Date, Content-Length, a counter), and a
        # head of the same shape has the same fields: nothing to drop, one Content-Length
        # at the same place (see data_received).
        self.shape: bytes | None = None
        self.shape_length = (0, 0)
        self.reading_paused = False
        self.writing_paused = False

        self.requests = 0  # exchanges completed on this connection
        self.idle_since = 0.0
        self.activity = 0  # bumped on every read and body write (for the io timer)
        self.tunnel: Any = None

    # --- lifecycle ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def release(self, client: ClientProtocol | None = None) -> None:
        """The exchange is over and the connection can carry another one: kept by
        `client` (the client connection it served, if given) for its next request, when
        that connection is still open and keeps none yet; else back to the pool, most
        recently used last (see Pool.put)."""
        self.exchange = None
        self.requests += 1
        if self.reading_paused:
            self.resume_reading()
        pool = self.pool
        if (client is not None and client.own_upstream is None and not client.closed
                and not pool.closed and not client.ctx.closing):
            client.own_upstream = self
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if pool.closed or len(pool.idle) >= pool.max_idle:
            transport.close()
            return
        self.idle_since = pool.loop.time()
        pool.idle.append(self)

    def close(self) -> None:
        """Close without telling the exchange (it already knows)."""
        self.exchange = None
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            try:
                ex.on_upstream_lost(self, exc)
            except Exception as err:  # a bug: the exchange answers once and closes
                ex.on_internal_error(err)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

    # --- flow control -------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_client()
        elif self.exchange is not None:
            self.exchange.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_client()
        elif self.exchange is not None:
            self.exchange.upstream_resume_writing()

    # --- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        ex = self.exchange
        if ex is None:
            if self.tunnel is not None:
                self.tunnel.from_upstream(data)
            else:  # bytes nobody asked for: the connection cannot be trusted
                self.close()
            return
        if not self.got_bytes:
            self.got_bytes = True
            if data == self.whole_data and not self.head_only:
                # Byte for byte the last response relayed whole, which llhttp validated
                # then: it would accept it again. The parser stays at a message boundary,
                # as it would after parsing it.
                ex.relay_whole(self, data, self.whole_end)
                return
            shape = self.shape
            if (shape is not None and data[:len(shape)].translate(_DIGITS_AS_0) == shape
                    and data[7] == data[5] == 49 and data[9:12] not in _NOT_WHOLE_PROBE
                    and not self.head_only):
                # The head has the shape of the last one the one-pass check relayed whole
                # (see __init__), which llhttp accepted: nothing to drop, and llhttp would
                # accept this one too, but for what its digits say — it is HTTP/1.1 (the
                # digits of "HTTP/0.0" in the shape are both 1: ASCII 49), its status needs
                # no decision, and its Content-Length must frame exactly this read (llhttp
                # reads no other digit for their value, and allows any status code). So
                # it is relayed as read, with no parse (the parser stays at a message
                # boundary, as it would after parsing it).
                start, stop = self.shape_length
                end = len(shape) - 4
                if end + 4 + int(data[start:stop]) == len(data):
                    self.whole_data = data
                    self.whole_end = end
                    ex.relay_whole(self, data, end)
                    return
            probe = self.probe
            if (probe is not None and data.startswith(b"HTTP/1.1 ")
                    and data[9:12] not in _NOT_WHOLE_PROBE and not self.head_only):
                # Likely one whole response: one llhttp pass validates it and looks at
                # its field names (a regex over the head and then a parse cost more).
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    probe.clean = True
                    probe.length = -1
                    try:
                        probe.parser.feed_data(data)
                    except HttpParserError:
                        # (maybe in bytes after a valid response: the general path
                        # below tells, as it always did)
                        probe.clean = False
                    if probe.clean and end + 4 + probe.length == len(data):
                        # Content-Length framing, exactly this read: the parser took the
                        # whole response and stands at a message boundary again.
                        self.whole_data = data
                        self.whole_end = end
                        self._take_shape(data, end)
                        ex.relay_whole(self, data, end)
                        return
                    # A field to drop, or not whole: the probe stopped somewhere inside
                    # (it is dropped), and the general path below takes the response.
                    # Probing resumes after the next response relayed whole.
                    self.probe = None
            # First bytes of a response (not 1xx): can its head be relayed verbatim?
            fast = fast_response_head(data)
            if fast is None:
                self.parser = self.full_parser
            else:
                end, length = fast
                if (end + 4 + length == len(data) and not self.head_only
                        and data[9:12] not in _NOT_WHOLE):
                    # The whole response, exactly, in this read, and nothing in it to
                    # rewrite: validated by a parser without callbacks, relayed as read.
                    parser = self.bare_parser
                    if parser is None:
                        parser = self.bare_parser = HttpResponseParser(_NO_CALLBACKS)
                    try:
                        parser.feed_data(data)
                    except HttpParserError as exc:
                        self.bare_parser = None
                        ex.on_bad_response(self, exc)
                        return
                    self.whole_data = data
                    self.whole_end = end
                    if self.probe is None:
                        self.probe = _Probe()
                    ex.relay_whole(self, data, end)
                    return
                self.fast_head = (data[:end + 2], length >= 0)
                if self.lean_parser is None:
                    self.lean_parser = HttpResponseParser(_LeanCallbacks(self))
                self.parser = self.lean_parser
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.exchange is not None:
                self.exchange.on_upgrade(self, data[exc.args[0]:])
        except HttpParserCallbackError as exc:
            ex.on_internal_error(exc.__context__ or exc)
        except HttpParserError as exc:
            if self.exchange is not None:
                self.exchange.on_bad_response(self, exc)
            else:
                self.close()
        if ex.out:
            ex.flush()

    def _take_shape(self, data: bytes, end: int) -> None:
        """Remember the shape of the head of `data`, a response the one-pass check found
        whole with nothing to drop, ending at `end` (see __init__)."""
        found = _LENGTH_VALUE.search(data, 0, end + 2)
        if found is None:  # (a value llhttp took but this does not: no shape)
            self.shape = None
            return
        self.shape = data[:end + 4].translate(_DIGITS_AS_0)
        self.shape_length = found.span(1)

    # httptools callbacks (no on_message_begin: state is reset as each part is consumed)

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        raw, reason = self.headers, self.reason
        self.headers = []  # trailers, if any, go here
        self.reason = b""
        parser = self.parser
        status = self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        ex = self.exchange
        if ex is None:
            return
        fast, self.fast_head = self.fast_head, None
        if status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: not relayed
            return
        ex.on_response_head(self, status, reason, raw, fast)
        if self.head_only and self.exchange is ex and status != 101:
            # A response to HEAD has no body whatever its framing fields say; the parser
            # does not know the method, so this one is finished here and replaced.
            if parser is self.lean_parser:
                self.lean_parser = None
            else:
                self.full_parser = HttpResponseParser(self)
            self.parser = self.full_parser
            ex.on_response_complete(self, None)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        trailers = self.headers
        if trailers:
            self.headers = []
        ex = self.exchange
        if ex is not None and not self.head_only and self.status != 101:
            # (101: the parser pauses right after this and the tunnel takes over)
            ex.on_response_complete(self, trailers)


class _NoCallbacks:
    """Parser callbacks for a response relayed whole: none."""


_NO_CALLBACKS = _NoCallbacks()
# Statuses never relayed whole: they need a decision (503: fail over; 101: a tunnel) or
# have no body whatever their framing fields say (204, 304).
_NOT_WHOLE = frozenset({b"101", b"204", b"304", b"503"})


# (and 1xx: an interim response comes first)
_NOT_WHOLE_PROBE = _NOT_WHOLE | {b"1%02d" % n for n in range(100)}
_DIGITS_AS_0 = bytes.maketrans(b"0123456789", b"0" * 10)
# (a response head's Content-Length field, from the CRLF before it to the CRLF after it)
_LENGTH_VALUE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)\r\n", re.I)
_DROP_FIRST = frozenset(b"px")


class _Probe:
    """A parser with one callback, on_header, noting whether a response has a field the
    proxy drops (hop-by-hop, Proxy-*, X-Tandem-*) and its Content-Length."""

    __slots__ = ("parser", "clean", "length")

    def __init__(self) -> None:
        self.parser = HttpResponseParser(self)
        self.clean = True  # no field to drop so far
        self.length = -1  # Content-Length (llhttp rejects a second one), -1: none

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-length":
            self.length = int(value)  # digits: checked by llhttp before this call
        elif n in HOP_BY_HOP or (n[0] in _DROP_FIRST and n.startswith(DROP_PREFIXES)):
            self.clean = False  # (the first byte spares most names a method call)


class _LeanCallbacks:
    """The upstream protocol's callbacks minus the per-field ones (for the lean parser)."""

    __slots__ = ("on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, up: UpstreamProtocol) -> None:
        self.on_headers_complete = up.on_headers_complete
        self.on_body = up.on_body
        self.on_message_complete = up.on_message_complete


class Pool:
    """Idle keep-alive connections to one backend, most recently used first."""

    __slots__ = ("backend", "loop", "_connect_timeout_s", "_keepalive_s", "max_idle", "idle",
                 "closed")

    def __init__(self, backend: Backend, *, loop: asyncio.AbstractEventLoop,
                 connect_timeout_s: float, keepalive_s: float, max_idle: int) -> None:
        self.backend = backend
        self.loop = loop
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self.max_idle = max_idle
        self.idle: list[UpstreamProtocol] = []
        self.closed = False

    @property
    def idle_count(self) -> int:
        return len(self.idle)

    def take(self) -> UpstreamProtocol | None:
        """An idle connection that still looks alive, or None."""
        idle = self.idle
        while idle:
            up = idle.pop()
            transport = up.transport
            if transport is None or transport.is_closing():
                continue
            if self.loop.time() - up.idle_since > self._keepalive_s:
                transport.close()
                continue
            return up
        return None

    def put(self, up: UpstreamProtocol) -> None:
        transport = up.transport
        if transport is None or transport.is_closing():
            return
        if self.closed or len(self.idle) >= self.max_idle:
            transport.close()
            return
        up.idle_since = self.loop.time()
        self.idle.append(up)

    def discard(self, up: UpstreamProtocol) -> None:
        if up in self.idle:
            self.idle.remove(up)

    async def connect(self) -> UpstreamProtocol:
        """Open a new connection (raises UpstreamConnectError or UpstreamConnectTimeout)."""
        if self.closed:
            raise UpstreamConnectError("pool closed", backend_id=self.backend.id)
        address = self.backend.address
        with map_connect_errors(self.backend.id):
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self), address.host, address.port)
        return protocol

    def clear_idle(self) -> None:
        """Close every idle connection (one was found dead: the others may be too)."""
        idle, self.idle = self.idle, []
        for up in idle:
            if up.transport is not None:
                up.transport.close()

    def sweep(self) -> None:
        """Close connections idle for longer than keepalive_s (oldest are at the front)."""
        deadline = self.loop.time() - self._keepalive_s
        idle = self.idle
        n = 0
        while n < len(idle) and idle[n].idle_since < deadline:
            n += 1
        if n:
            expired = idle[:n]
            del idle[:n]
            for up in expired:
                if up.transport is not None:
                    up.transport.close()

    def close(self) -> None:
        self.closed = True
        self.clear_idle()
