"""Reading a backend's responses: the response pipeline of an upstream connection.

The read that starts a response goes through these layers in order; the first that can
take it relays it, and one that cannot leaves the read to the next, unchanged:

1. repeat — byte for byte the last response relayed whole: relayed with no parse;
2. shape — a head shaped like the last one relayed whole (digits aside): relayed with no
   parse;
3. regex + parse — a head with nothing to rewrite (`headers.fast_response_head`): the
   whole response in this read is validated by a parser without callbacks and relayed as
   read; a head whose body comes later is parsed with no per-field callbacks and passed
   on verbatim;
4. the general path — llhttp with every callback, the head rewritten field by field
   (`headers.scan_response`, in the exchange).

What each layer relies on is stated at it, with the test that pins it;
docs/proxy-data-path.md has the whole path and what each layer was measured to save.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from .headers import fast_response_head

__all__ = ["ResponseReader"]

# Statuses never relayed as read: they need a decision (503: fail over; 101: a tunnel),
# have no body whatever their framing fields say (204, 304), or come before the response
# (1xx: interim).
_NOT_AS_READ = frozenset({b"101", b"204", b"304", b"503"} | {b"1%02d" % n for n in range(100)})
_DIGITS_AS_0 = bytes.maketrans(b"0123456789", b"0" * 10)
# (a response head's Content-Length field, from the CRLF before it to the CRLF after it)
_LENGTH_VALUE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)\r\n", re.I)
# Parser callbacks for a response relayed whole: none (llhttp validates it).
_NO_CALLBACKS = object()


class ResponseReader(asyncio.Protocol):
    """The reading side of an upstream connection: parses responses and hands them to the
    exchange being served (`exchange`), through the layers above."""

    __slots__ = (
        "transport", "full_parser", "lean_parser", "bare_parser", "parser",
        # per exchange
        "exchange", "head_only", "interim", "status", "reason", "headers", "keep_alive",
        "got_bytes", "fast_head", "until_close",
        # the layers' memories
        "whole_data", "whole_end", "shape", "shape_length",
        # lifetime
        "activity", "tunnel",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Three parsers, chosen per response (layer 3): none of them has a message under
        # way between responses, so any can take the next one. The full one (the general
        # path); the lean one, without per-field callbacks, for a head relayed verbatim;
        # the bare one, without callbacks, validates a whole response relayed as read.
        self.full_parser = HttpResponseParser(self)
        self.lean_parser: HttpResponseParser | None = None
        self.bare_parser: HttpResponseParser | None = None
        self.parser = self.full_parser  # the one parsing the current response

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

        # Layer 1: the last response relayed whole, and where its head ends.
        self.whole_data = b""  # (never a response: data_received gets no empty read)
        self.whole_end = 0
        # Layer 2: the shape of the head (blank line included) of the last response layer
        # 3 relayed whole — its bytes with every digit read as 0 — and where the value of
        # its Content-Length field lies in it; None: no shape to match.
        self.shape: bytes | None = None
        self.shape_length = (0, 0)

        self.activity = 0  # bumped on every read and body write (for the io timer)
        self.tunnel: Any = None

    def close(self) -> None:
        """Close without telling the exchange (it already knows)."""
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    # --- the pipeline -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        ex = self.exchange
        if ex is None:
            if self.tunnel is not None:
                self.tunnel.from_upstream(data)
            else:  # bytes nobody asked for: the connection cannot be trusted
                self.close()
            return
        if not self.got_bytes:  # the read that starts the response: the layers
            self.got_bytes = True

            # Layer 1, repeat. Relies on: llhttp's verdict on a whole response depends on
            # its bytes alone, from a message boundary, and ends at one — so the bytes it
            # accepted last time it accepts again; and what the relay decides from them
            # (status, HEAD aside) comes from the bytes too. Pinned by (as the layers below,
            # in tests/test_proxy_response_lanes.py)
            #   test_a_response_as_long_as_the_last_one_relayed_whole_is_still_looked_at
            #   test_an_invalid_response_as_long_as_the_last_one_relayed_whole_is_a_bad_gateway
            if data == self.whole_data and not self.head_only:
                ex.relay_whole(self, data, self.whole_end)
                return

            # Layer 2, shape. A backend's heads tend to differ only in digits (Date,
            # Content-Length, a counter), and a head of the shape of the last one relayed
            # whole has the same fields: nothing to drop, one Content-Length at the same
            # place. Relies on: llhttp reads no digit of a head but the version's and
            # Content-Length's, and allows any status code — so it would accept this head
            # as it accepted that one, but for what those digits say: the version must be
            # 1.1 (both digits of "HTTP/0.0" in the shape are ASCII 49 here), the status
            # must need no decision, and Content-Length must frame exactly this read.
            # Pinned by
            #   test_llhttp_reads_no_digit_of_a_response_head_but_the_version_and_the_length
            #   test_responses_shaped_like_the_last_whole_one_are_relayed_as_read_when_they_may_be
            #   test_a_response_shaped_like_the_last_whole_one_is_relayed_as_read_if_http11
            #   test_a_same_shaped_response_that_fails_over_or_is_invalid
            shape = self.shape
            if (shape is not None and data[:len(shape)].translate(_DIGITS_AS_0) == shape
                    and data[7] == data[5] == 49 and data[9:12] not in _NOT_AS_READ
                    and not self.head_only):
                start, stop = self.shape_length
                end = len(shape) - 4
                if end + 4 + int(data[start:stop]) == len(data):
                    # (no parse: the parser stays at a message boundary, as after one)
                    self.whole_data = data
                    self.whole_end = end
                    ex.relay_whole(self, data, end)
                    return

            # Layer 3, regex + parse. Relies on: the regex of fast_response_head finds
            # every field the proxy drops or rewrites (hop-by-hop, Proxy-*, X-Tandem-*) and
            # a second Content-Length, in any case of letters; llhttp validates what the
            # regex lets through. Pinned by
            #   test_whole_responses_are_relayed_byte_for_byte_and_others_rewritten
            #   test_responses_that_cannot_be_relayed_whole_take_the_general_path
            #   test_an_invalid_whole_response_is_a_bad_gateway
            fast = fast_response_head(data)  # (None for 1xx: interim)
            if fast is None:
                self.parser = self.full_parser
            else:
                end, length = fast
                if (end + 4 + length == len(data) and not self.head_only
                        and data[9:12] not in _NOT_AS_READ):
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
                    self._take_shape(data, end)
                    ex.relay_whole(self, data, end)
                    return
                self.fast_head = (data[:end + 2], length >= 0)
                if self.lean_parser is None:
                    self.lean_parser = HttpResponseParser(_LeanCallbacks(self))
                self.parser = self.lean_parser

        # Layer 4, the general path (the full parser), or layer 3's lean parser: the parser
        # chosen above takes this read, and the rest of the response after it.
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
        """Remember the shape of the head of `data`, a response layer 3 relayed whole
        (nothing to drop, one Content-Length), ending at `end` (see __init__)."""
        found = _LENGTH_VALUE.search(data, 0, end + 2)
        if found is None:  # (a value llhttp took but this does not: no shape)
            self.shape = None
            return
        self.shape = data[:end + 4].translate(_DIGITS_AS_0)
        self.shape_length = found.span(1)

    # --- httptools callbacks (layer 4; no on_message_begin: state is reset as each part
    # is consumed) ---------------------------------------------------------------------------

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


class _LeanCallbacks:
    """The reader's callbacks minus the per-field ones (for the lean parser)."""

    __slots__ = ("on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, reader: ResponseReader) -> None:
        self.on_headers_complete = reader.on_headers_complete
        self.on_body = reader.on_body
        self.on_message_complete = reader.on_message_complete
