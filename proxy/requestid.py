"""Request ids: every client request gets one, sent upstream as `X-Tandem-Request-Id` — the
same value on every retry and failover of that request — so that a backend can tell a
retried request from a new one.

16 url-safe characters: 8 random ones (48 bits from os.urandom, drawn once per 2**32
requests) and a counter in hex, which costs far less per request than drawing random bytes
(its last 3 hex digits come from a table made once, the others change once per 4096 ids).
"""

from __future__ import annotations

import base64
import os
from binascii import hexlify

__all__ = ["RequestIds", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = b"X-Tandem-Request-Id"
_COUNTER_MAX = 0xFFFFFFFF  # 8 hex digits
# The counter's last 3 hex digits with the line's CRLF, made once: the low part of a new
# id is one lookup, and its line one concatenation.
_LOW_BITS = 12
_LOW_COUNT = 1 << _LOW_BITS
_LOW = [b"%03x\r\n" % n for n in range(_LOW_COUNT)]


class RequestIds:
    """A source of unique request ids (one per proxy process)."""

    __slots__ = ("prefix", "_field_prefix", "_high", "_high_line", "_low")

    def __init__(self) -> None:
        self.prefix = self._field_prefix = self._high_line = b""
        self._high = self._low = 0  # the next id's counter value, in two parts
        self._roll()

    def _roll(self) -> None:
        self.prefix = base64.urlsafe_b64encode(os.urandom(6))  # 8 characters
        self._field_prefix = REQUEST_ID_HEADER + b": " + self.prefix
        self.count_from(0)

    def count_from(self, count: int) -> None:
        """Make the next id's counter value `count` (0 to 2**32 - 1)."""
        self._high = count >> _LOW_BITS  # 5 hex digits
        self._low = count & (_LOW_COUNT - 1)
        self._high_line = self._field_prefix + hexlify(self._high.to_bytes(3, "big"))[1:]

    def field(self) -> bytes:
        """A new id as a whole header line, `X-Tandem-Request-Id: <id>` and its CRLF (what
        a request head needs, in one concatenation)."""
        low = self._low
        if low == _LOW_COUNT:  # the high part moves on
            count = (self._high + 1) << _LOW_BITS
            if count > _COUNTER_MAX:
                self._roll()
            else:
                self.count_from(count)
            low = 0
        self._low = low + 1
        return self._high_line + _LOW[low]

    def next(self) -> bytes:
        """A new id alone (as `field` makes them)."""
        return self.field()[len(REQUEST_ID_HEADER) + 2:-2]
