"""The mark of a request one server forwarded to another (`X-Tandem-Hop`), authenticated.

A server that forwards a request to its session's primary (backends.serve.forward) marks
it, so that the primary serves it there and never forwards it again: no loop is possible.
A plain load balancer passes a client's `X-Tandem-*` fields through, so the mark must be
one no client can make: an HMAC under the cluster secret (the first signs, all verify, as
for tokens and the replication handshake) over the request's id, method and target, the
time it was made, and the client's address (which the primary gives its app).

Value: `<unix time>;<client host:port or ->;<hex HMAC-SHA256>`. The time only bounds the
replay of a captured mark (`HOP_WINDOW_S`); nothing of correctness depends on it. A mark
that does not verify is dropped and the request handled as any client's.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["HOP_HEADER", "HOP_WINDOW_S", "HopAuth"]

HOP_HEADER = b"x-tandem-hop"  # (as the HTTP server hands names: lowercased)
# How old (or how far ahead, the servers' clocks differing) a mark may be, seconds. A
# forwarded request is read by the primary within its deadline, far less than this.
HOP_WINDOW_S = 300.0
_SALT = b"tandem.forward"


class HopAuth:
    """Makes and checks hop marks with the cluster secrets."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: tuple[str, ...]) -> None:
        # one key per secret, derived so that a mark is no token or handshake MAC
        self._keys = [hmac.new(s.encode(), _SALT, hashlib.sha256).digest() for s in secrets]

    def sign(self, *, rid: str, method: str, target: bytes, client: str) -> bytes:
        """The mark of a request forwarded now, for the client at `client` ("-": unknown)."""
        ts = str(int(time.time()))
        mac = _mac(self._keys[0], ts, client, rid, method, target)
        return f"{ts};{client};{mac}".encode("latin-1")

    def verify(self, value: bytes, *, rid: str | None, method: str,
               target: bytes) -> str | None:
        """The client's address the mark carries ("-": unknown), or None: not a mark of
        ours (forged, altered, of another request, or too old)."""
        if rid is None:
            return None  # a forwarded request always carries its id
        try:
            ts, client, mac = value.decode("latin-1").split(";")
            made = int(ts)
        except ValueError:
            return None
        if abs(time.time() - made) > HOP_WINDOW_S:
            return None
        for key in self._keys:
            if hmac.compare_digest(mac, _mac(key, ts, client, rid, method, target)):
                return client
        return None


def _mac(key: bytes, ts: str, client: str, rid: str, method: str, target: bytes) -> str:
    msg = b"\n".join((ts.encode(), client.encode("latin-1"), rid.encode("latin-1"),
                      method.encode("latin-1"), target))
    return hmac.new(key, msg, hashlib.sha256).hexdigest()
