"""Reading a client's requests: the request pipeline of a client connection.

The read that starts a request goes through these layers in order; the first that can
take it sends it on, and one that cannot leaves the read to the next, unchanged:

1. repeat — byte for byte the last request layer 3 took: sent on with no scan and no parse;
2. the last head's fields — the same fields (all but the request line) as the last head:
   what layer 3's regex found in them is reused;
3. regex + parse (the lane) — one whole HTTP/1.1 request, nothing else under way, and no
   field the proxy must act on (`headers.fast_fields`): validated by a parser without
   callbacks and sent on verbatim, plus the forwarding fields and the request id;
4. the general path — llhttp with every callback; the head rewritten field by field
   (`headers.scan_request`), or verbatim when layer 3 found it could be.

A request llhttp rejects (smuggling vectors included) is answered with 400 and the
connection closed. What each layer relies on is stated at it, with the test that pins it;
docs/proxy-data-path.md has the whole path and what each layer was measured to save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from .client_conn import (
    PAUSE_HALTED,
    PAUSE_PENDING,
    PAUSE_PIPELINE,
    PAUSE_UPGRADE,
    ClientConnection,
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
from .headers import fast_fields, forwarding_fields, request_head, scan_request, trailer_block
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .context import ProxyContext
    from .upstream import UpstreamProtocol

__all__ = ["ClientProtocol"]

_MAX_TRAILERS = 256  # trailer fields of one request

# What layer 3 finds in a head it could forward verbatim: (end of the head, Cookie,
# Content-Length or 0, forwarding fields).
_Fast = tuple[int, bytes | None, int, bytes]
# Parser callbacks of layer 3: none (it knows the request is whole; llhttp validates it).
_NO_CALLBACKS = object()


class ClientProtocol(ClientConnection):
    """One client connection (its life and answering: ClientConnection)."""

    __slots__ = (
        "parser", "lean_parser",
        # per request being parsed
        "url", "headers", "begun", "in_head", "head_pending", "chunk", "fast", "chunk_len",
        "completed", "body_size", "starting",
        # the layers' memories
        "lane_data", "lane_last", "fields_key", "fields_scan", "fwd_host", "fwd_fields",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        self.parser = HttpRequestParser(self)
        # Validates requests that layer 3 forwards verbatim: no callbacks at all. Between
        # messages both parsers are at a message boundary, so either can take the next.
        self.lean_parser = HttpRequestParser(_NO_CALLBACKS)

        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # the head's, then the trailers
        self.begun = False  # the parser holds part of a message (from its first byte on)
        self.in_head = True  # between requests, or inside a request head
        self.head_pending = 0  # bytes of chunks that held only an unfinished head
        self.chunk: bytes | None = None  # the chunk being parsed, if it began a message
        self.fast: _Fast | None = None  # what layer 3 found in it
        self.chunk_len = 0  # size of the chunk being parsed
        self.completed = 0  # messages completed in the chunk being parsed
        self.body_size = 0
        self.starting: Exchange | None = None  # to start once the current chunk is parsed

        # Layer 1: the last request layer 3 forwarded, and what it found in it: (self.fast
        # for it, method, Cookie, end of the request line, head to forward, Content-Length).
        self.lane_data = b""  # (never a request: data_received gets no empty read)
        self.lane_last: tuple[_Fast, bytes, bytes | None, int, bytes, int] | None = None
        # Layer 2: the fields of the last head that started a chunk (after the CRLF ending
        # its request line, to the blank line) and what layer 3 found in them (Cookie,
        # Content-Length, forwarding fields), None: the general path; and the forwarding
        # fields for the last Host seen (other fields change more often).
        self.fields_key: bytes | None = None
        self.fields_scan: tuple[bytes | None, int, bytes] | None = None
        self.fwd_host: bytes | None = None
        self.fwd_fields = b""

    # --- the pipeline -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrade_buf is not None:
            self.upgrade_buf.append(data)
            self._pause(PAUSE_UPGRADE)
            return
        if self.read_paused & PAUSE_HALTED:
            return
        if not self.begun:  # the read starts a message: the layers

            # Layer 1, repeat. Relies on: llhttp's verdict on a whole request depends on
            # its bytes alone, from a message boundary, and ends at one — so the bytes it
            # accepted last time it accepts again (the lean parser stays at a boundary, as
            # after parsing them); and all that layer 3 found in them comes from the bytes
            # and the connection's client address (the route and the request id are made
            # afresh in _forward). Pinned by (as the layers below, in tests/test_proxy_lanes.py)
            #   test_a_request_as_long_as_the_last_one_is_still_validated
            #   test_a_repeated_request_gets_its_own_request_id_and_one_sent_early_waits_its_turn
            if data == self.lane_data:
                last = self.lane_last
                assert last is not None
                fast, method, cookie, first, prefix, length = last
                if self.active is None and not self.read_paused:
                    self._forward(data, method, cookie, first, prefix, length)
                    return
                self.fast = fast  # for the general path, as _lane would find it
            elif self._lane(data):  # layers 2 and 3
                return

        # Layer 4, the general path (and the rest of a request begun). Relies on:
        # `self.fast`, when set, describes the head at the start of this chunk (see
        # on_headers_complete). Pinned by
        #   test_a_read_ending_inside_the_next_request_head
        #   test_a_body_in_the_same_read_as_the_head_and_a_body_that_comes_later
        #   test_an_http10_request_whose_body_comes_later_is_answered_as_http10
        self.completed = 0
        self.chunk_len = len(data)
        self.chunk = None if self.begun else data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgrade_buf = [data[exc.args[0]:]]
            self._pause(PAUSE_UPGRADE)
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
        """Layers 2 and 3: when `data` is exactly one whole HTTP/1.1 request whose head can
        be forwarded verbatim (plus the forwarding fields and the request id) and nothing
        else is under way on the connection — what a keep-alive client sends, one request
        at a time — it is validated by the lean parser and sent on, with no per-field work.
        False: the general path takes `data`; `self.fast` holds what was found (its head's
        end, Cookie, Content-Length, forwarding fields) when the head could go verbatim."""
        self.fast = None
        line, crlf, rest = data.partition(b"\r\n")
        if not crlf:
            return False
        first = len(line)

        # Layer 2, the last head's fields. A keep-alive client tends to repeat its fields
        # (its request line changes more often). Relies on: what fast_fields finds depends
        # on the fields' bytes alone, and the forwarding fields on the Host and the
        # connection's client address alone; the key ends with the blank line, so a read
        # that starts with it after the request line has exactly those fields (and maybe
        # a body). Pinned by
        #   test_changed_fields_on_a_keep_alive_connection_are_seen
        #   test_a_body_in_the_same_read_as_the_head_and_a_body_that_comes_later
        key = self.fields_key
        if rest == key or (key is not None and rest.startswith(key)):
            end = first + len(key) - 2
            scan = self.fields_scan

        # Layer 3, regex + parse. Relies on: the regex of fast_fields finds every field the
        # proxy must act on (framing, hop-by-hop, Expect, Upgrade, forwarding, X-Tandem-*),
        # in any case of letters, so a head without one goes verbatim; llhttp validates
        # what the regex lets through; asked after a whole request, should_keep_alive() is
        # true for HTTP/1.1 alone (the version check; what a Connection field said is gone
        # by then, and the regex keeps those out), and CONNECT is an upgrade. Pinned by
        #   test_llhttp_after_a_whole_request_keeps_alive_http11_alone
        #   test_an_invalid_request_in_the_fast_lane_is_400
        #   test_an_http10_request_and_a_connect_in_the_fast_lanes_shape_take_the_general_path
        #   test_http10_keep_alive_client_gets_a_whole_response_with_the_connection_field
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
                                                        for_node=self.for_node,
                                                        proto=self.ctx.proto)
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
        """Send on a request layer 1 or 3 took: `data` is the whole request (its request
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

    # --- httptools callbacks (layer 4) ---------------------------------------------------------

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
                                upgrade=upgrade, proto=ctx.proto)
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
            self._pause(PAUSE_PIPELINE)

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
        self._resume(PAUSE_UPGRADE | PAUSE_PIPELINE | PAUSE_PENDING)
