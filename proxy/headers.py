"""Header rewriting: hop-by-hop stripping, X-Forwarded-* and Forwarded, X-Tandem-* removal.

Works on the raw `(name, value)` byte pairs httptools hands over, one pass per message;
names are compared lowercased with bytes operations (no regexes on the data path).
"""

from __future__ import annotations

import re

from tandem.view import parse_cluster_header  # (the contract's; re-exported here)

from .errors import ClientProtocolError, ExpectationFailed, UnsupportedTransferCoding

__all__ = [
    "HOP_BY_HOP",
    "DROP_PREFIXES",
    "RequestHeaders",
    "ResponseHeaders",
    "scan_request",
    "scan_response",
    "fast_fields",
    "forwarding_fields",
    "fast_response_head",
    "trailer_block",
    "request_head",
    "forwarded_for",
    "simple_response",
    "parse_cluster_header",
    "CLUSTER_HEADER",
]

# Hop-by-hop fields (RFC 9110 section 7.6.1) plus the old Proxy-Connection; names listed
# in Connection are hop-by-hop too. Transfer-Encoding is re-framed by the proxy.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
CLUSTER_HEADER = b"x-tandem-cluster"
DROP_PREFIXES = (b"x-tandem-", b"proxy-")  # fields never passed on, either way

# Request fields that need a look; everything else is forwarded untouched.
_HOST, _COOKIE, _CL, _TE, _CONN, _UPGRADE, _EXPECT, _XFF, _FWD, _DROP = range(10)
_REQUEST_SPECIAL = {
    b"host": _HOST,
    b"cookie": _COOKIE,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONN,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
    b"forwarded": _FWD,
    # Set by the proxy from what it saw; a client's own values are not passed on.
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
}
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


class RequestHeaders:
    """What the proxy needs from a request head, and the lines it forwards."""

    __slots__ = ("lines", "host", "cookie", "content_length", "chunked", "expect_continue",
                 "upgrade", "xff", "forwarded")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.cookie: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.xff: bytes | None = None
        self.forwarded: bytes | None = None


class ResponseHeaders:
    """What the proxy needs from a response head, and the lines it forwards."""

    __slots__ = ("lines", "content_length", "chunked", "cluster", "upgrade")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.content_length: bytes | None = None
        self.chunked = False
        self.cluster: bytes | None = None
        self.upgrade: bytes | None = None


def _connection_names(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")} - {b""}


def scan_request(raw: list[tuple[bytes, bytes]], *, http10: bool,
                 drop: frozenset[bytes] = frozenset()) -> RequestHeaders:
    """Validate framing fields, pick out routing fields, keep the end-to-end lines."""
    rh = RequestHeaders()
    lines = rh.lines
    extra: set[bytes] | None = None
    for name, value in raw:
        n = name.lower()
        kind = _REQUEST_SPECIAL.get(n)
        if kind is None:
            if n.startswith(DROP_PREFIXES) or n in drop:
                continue
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == _HOST:
            if rh.host is not None:
                raise ClientProtocolError("more than one Host header")
            rh.host = value
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == _COOKIE:
            rh.cookie = value if rh.cookie is None else rh.cookie + b"; " + value
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == _CL:
            rh.content_length = int(value)  # digits only: checked by the parser
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == _TE:
            if http10:
                raise ClientProtocolError("Transfer-Encoding in an HTTP/1.0 request")
            if value.strip().lower() != b"chunked":
                raise UnsupportedTransferCoding("only the chunked transfer coding is supported")
            rh.chunked = True
        elif kind == _CONN:
            names = _connection_names(value) - _CONNECTION_OPTIONS
            if names:
                extra = names if extra is None else extra | names
        elif kind == _UPGRADE:
            rh.upgrade = value
        elif kind == _EXPECT:
            if value.strip().lower() != b"100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            rh.expect_continue = not http10
        elif kind == _XFF:
            rh.xff = value if rh.xff is None else rh.xff + b", " + value
        elif kind == _FWD:
            rh.forwarded = value if rh.forwarded is None else rh.forwarded + b", " + value
    if extra and not drop:
        # Fields named in Connection are hop-by-hop: scan again, dropping them too.
        return scan_request(raw, http10=http10, drop=frozenset(extra))
    return rh


def scan_response(raw: list[tuple[bytes, bytes]],
                  drop: frozenset[bytes] = frozenset()) -> ResponseHeaders:
    """Keep a response's end-to-end lines; note framing, upgrade and the cluster view."""
    rh = ResponseHeaders()
    lines = rh.lines
    extra: set[bytes] | None = None
    for name, value in raw:
        n = name.lower()
        if n in HOP_BY_HOP:
            if n == b"transfer-encoding":
                rh.chunked = True  # the parser accepts chunked as the final coding only
            elif n == b"connection":
                names = _connection_names(value) - _CONNECTION_OPTIONS
                if names:
                    extra = names if extra is None else extra | names
            elif n == b"upgrade":
                rh.upgrade = value
            continue
        if n.startswith(DROP_PREFIXES) or n in drop:
            if n == CLUSTER_HEADER:
                rh.cluster = value
            continue
        if n == b"content-length":
            rh.content_length = value
        lines.append(b"%s: %s\r\n" % (name, value))
    if extra and not drop:
        return scan_response(raw, drop=frozenset(extra))
    return rh


def trailer_block(raw: list[tuple[bytes, bytes]] | None) -> bytes:
    """The last chunk of a chunked body with its trailer fields (hop-by-hop ones dropped)."""
    if not raw:
        return b"0\r\n\r\n"
    parts = [b"0\r\n"]
    for name, value in raw:
        n = name.lower()
        if n not in HOP_BY_HOP and not n.startswith(DROP_PREFIXES) and n != b"content-length":
            parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# --- fast paths: heads that need nothing but the forwarding fields ---------------------------
#
# Most heads carry no hop-by-hop or X-Tandem-* field. When such a head sits whole at the
# start of the chunk just read, it is forwarded verbatim (llhttp validates it all the same)
# instead of being rebuilt field by field. One regex scan (in C) of the lowercased fields
# lists every field name the proxy must act on; a Python loop over every field, or
# httptools' per-field callbacks (about 0.3 µs each), would cost several times more.
# Anything unusual takes the general path above.

_REQUEST_FIELDS = re.compile(
    rb"\n(host:|cookie:|content-length:|connection:|keep-alive:|te:|trailer:"
    rb"|transfer-encoding:|upgrade:|forwarded:|expect:|proxy-|x-tandem-|x-forwarded-)")
# (on the response as received: re.I costs less here than lower() and a second search)
_RESPONSE_FIELDS = re.compile(
    rb"\r\n(?:(connection:|keep-alive:|te:|trailer:|transfer-encoding:|upgrade:|proxy-"
    rb"|x-tandem-)|content-length:([^\r]*))", re.I)


def fast_fields(fields: bytes) -> tuple[bytes, bytes | None, int] | None:
    """(Host, Cookie, Content-Length or 0) of a request head's fields (from the CRLF that
    ends the request line to the one that ends the last field) when they can be forwarded
    verbatim; None when they need the general path (a field to drop or rewrite)."""
    lower = fields.lower()
    host = cookie = None
    length = 0
    for name in _REQUEST_FIELDS.findall(lower):
        if name == b"host:" and host is None:
            i = lower.find(b"\nhost:") + 6
            host = fields[i:fields.find(b"\r", i)].strip(b" \t")
        elif name == b"cookie:" and cookie is None:
            i = lower.find(b"\ncookie:") + 8
            cookie = fields[i:fields.find(b"\r", i)].strip(b" \t")
        elif name == b"content-length:":
            i = lower.find(b"\ncontent-length:") + 16
            value = fields[i:fields.find(b"\r", i)].strip(b" \t")
            if not value.isdigit():
                return None  # the general path answers 400
            length = int(value)  # only one: the parser rejects a second
        else:
            return None
    if host is None:
        return None  # the general path answers 400
    return host, cookie, length


def forwarding_fields(host: bytes, *, client_ip: bytes, for_node: bytes,
                      proto: bytes = b"http") -> bytes:
    """The forwarding fields the proxy adds to a request that carried none."""
    quoted = host
    if b'"' in host or b"\\" in host:
        quoted = host.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b"".join((b"X-Forwarded-For: ", client_ip, b"\r\nX-Forwarded-Proto: ", proto,
                     b"\r\nX-Forwarded-Host: ", host, b"\r\nForwarded: ", for_node,
                     b';host="', quoted, b'";proto=', proto, b"\r\n"))


def fast_response_head(chunk: bytes) -> tuple[int, int] | None:
    """(end of the head, Content-Length or -1 when absent) of an HTTP/1.1 response whose
    head starts `chunk` and has nothing to rewrite; else None (so for 1xx: interim)."""
    if not chunk.startswith(b"HTTP/1.1 ") or chunk[9:10] == b"1":
        return None
    end = chunk.find(b"\r\n\r\n")
    if end < 0:
        return None
    found = _RESPONSE_FIELDS.findall(chunk, 8, end + 2)
    if not found:
        return end, -1
    if len(found) == 1 and not found[0][0]:
        value = found[0][1].strip(b" \t")
        if value.isdigit():
            return end, int(value)
    return None  # a field to drop, or Content-Length twice or malformed: the general path


def forwarded_for(ip: str) -> bytes:
    """The `for=` node of a Forwarded element (RFC 7239: IPv6 quoted in brackets)."""
    return (f'for="[{ip}]"' if ":" in ip else f"for={ip}").encode("ascii")


def request_head(method: bytes, target: bytes, rh: RequestHeaders, *, client_ip: bytes,
                 for_node: bytes, default_host: bytes, upgrade: bool,
                 proto: bytes = b"http") -> bytes:
    """The upstream request head without its last CRLF (X-Tandem-View is added per send)."""
    host = rh.host if rh.host is not None else default_host
    quoted = host
    if b'"' in host or b"\\" in host:
        quoted = host.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    xff = client_ip if rh.xff is None else rh.xff + b", " + client_ip
    element = for_node + b';host="' + quoted + b'";proto=' + proto
    fwd = element if rh.forwarded is None else rh.forwarded + b", " + element
    parts = [method, b" ", target, b" HTTP/1.1\r\n", *rh.lines]
    if rh.host is None:
        parts.append(b"Host: " + default_host + b"\r\n")
    parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto,
              b"\r\nX-Forwarded-Host: ", host, b"\r\nForwarded: ", fwd, b"\r\n")
    if rh.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade and rh.upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", rh.upgrade, b"\r\n")
    return b"".join(parts)


def simple_response(status: int, reason: bytes, text: str, *, close: bool,
                    extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete plain-text response generated by the proxy itself."""
    body = text.encode("utf-8") + b"\n"
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason),
             b"Content-Type: text/plain; charset=utf-8\r\n",
             b"Content-Length: %d\r\n" % len(body),
             b"Cache-Control: no-store\r\n"]
    parts += [name + b": " + value + b"\r\n" for name, value in extra]
    if close:
        parts.append(b"Connection: close\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)

