"""Request ids: every client request gets one, sent upstream as `X-Tandem-Request-Id` — the
same value on every retry and failover of that request — so that a backend can tell a
retried request from a new one.

16 url-safe characters: 8 random ones (48 bits from os.urandom, drawn once per 2**32
requests) and a counter in hex, which costs far less per request than drawing random bytes
(or than %-formatting: hexlify of the counter's bytes is about twice as fast).
"""

from __future__ import annotations

import base64
import itertools
import os
from binascii import hexlify

__all__ = ["RequestIds", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = b"X-Tandem-Request-Id"
_COUNTER_MAX = 0xFFFFFFFF  # 8 hex digits


class RequestIds:
    """A source of unique request ids (one per proxy process)."""

    __slots__ = ("prefix", "_field_prefix", "_count")

    def __init__(self) -> None:
        self.prefix = self._field_prefix = b""
        self._count = itertools.count()
        self._roll()

    def _roll(self) -> None:
        self.prefix = base64.urlsafe_b64encode(os.urandom(6))  # 8 characters
        self._field_prefix = REQUEST_ID_HEADER + b": " + self.prefix
        self._count = itertools.count()

    def field(self) -> bytes:
        """A new id as a whole header line, `X-Tandem-Request-Id: <id>` and its CRLF (what
        a request head needs, in one concatenation)."""
        n = next(self._count)
        if n > _COUNTER_MAX:
            self._roll()
            n = next(self._count)
        return self._field_prefix + hexlify(n.to_bytes(4, "big")) + b"\r\n"

    def next(self) -> bytes:
        """A new id alone (as `field` makes them)."""
        return self.field()[len(REQUEST_ID_HEADER) + 2:-2]
