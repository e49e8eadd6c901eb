"""URL rewriting of responses, for clients that do not keep cookies (`;jsessionid=TOKEN`).

An ASGI middleware. When the request's token did not come by cookie and the response
carries a session token, it adds `;<param>=TOKEN` to same-origin URLs: the `Location` of
redirects, and the `href`, `src`, `action` and `formaction` attributes of HTML bodies.

It streams: a body that is not HTML, or is compressed (`Content-Encoding`), passes through
untouched, message by message. HTML is rewritten chunk by chunk; only a tag cut by a chunk
boundary is carried over to the next chunk (bounded by `max_carry_bytes`). The response head
is held until the first body message: a body sent in one message gets its exact
`Content-Length`, a streamed one loses it (the server then sends it chunked).

tandem's `TandemMiddleware` wraps it around its session handling when
`session.url_rewriting = true`, so the head it sees is the committed one and the token is
the one the client must hold after this response.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tandem.token import add_path_param

__all__ = ["UrlRewriteMiddleware", "HtmlRewriter", "TokenOf", "Origin", "rewrite_url",
           "rewrite_html"]

# the ASGI types, as in backends.asgi (which imports this module)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
TokenOf = Callable[[Scope], "str | None"]

_HTML_TYPES = (b"text/html", b"application/xhtml+xml")
_URL_ATTRS = frozenset({b"href", b"src", b"action", b"formaction"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}

# A start tag: its name, then attributes; a quoted value may hold '>' and may be cut off by
# the end of the buffer. Group 2 (the closing '>') is missing when the buffer ended first.
_TAG = re.compile(rb"""<([A-Za-z][^\s/>"']*)(?:[^>"']|"[^"]*(?:"|\Z)|'[^']*(?:'|\Z))*(>)?""")
# One attribute: name, and optionally '=' and a value (double-, single- or un-quoted).
_ATTR = re.compile(rb"""([^\s"'>/=]+)(?:(\s*=\s*)("[^"]*"|'[^']*'|[^\s"'>]+))?""")
# elements whose text is not HTML: passed over up to their end tag
_RAW_TEXT = {name: re.compile(b"</" + name + rb"[\s/>]", re.I) for name in (b"script", b"style")}
_RAW_END_MAX = len(b"</script>")  # what may be kept back while looking for that end tag
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class Origin:
    """The origin a request was made to, as the client sees it, and its path (for links)."""

    __slots__ = ("host", "port", "path")

    def __init__(self, scope: Scope) -> None:
        host = ""
        proto = ""
        for name, value in scope.get("headers", ()):
            if name == b"host" and not host:
                host = value.decode("latin-1").strip().lower()
            elif name == b"x-forwarded-proto" and not proto:
                proto = value.decode("latin-1").split(",", 1)[0].strip().lower()
        scheme = proto or scope.get("scheme", "http")
        if not host and scope.get("server"):
            server_host, server_port = scope["server"][:2]
            host = f"{server_host}:{server_port}"
        self.host, self.port = _split_host(host, scheme)
        raw = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
        self.path = raw.decode("latin-1")

    def same(self, scheme: str, netloc: str) -> bool:
        """Is `scheme://netloc` this origin? (scheme only supplies the default port)"""
        host, port = _split_host(netloc.rpartition("@")[2].lower(), scheme.lower())
        return host == self.host and port == self.port


def _split_host(netloc: str, scheme: str) -> tuple[str, str]:
    if netloc.startswith("["):  # IPv6 literal
        end = netloc.find("]")
        host, rest = netloc[:end + 1], netloc[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = netloc.partition(":")
    return host, port or _DEFAULT_PORTS.get(scheme, "")


def rewrite_url(url: str, *, param: str, token: str, origin: Origin) -> str:
    """`url` with `;param=token` when it points to `origin`; otherwise `url` itself."""
    stripped = url.strip()
    if not stripped or stripped[0] == "#":
        return url  # this same document: no request is made
    if stripped[0] == "?":
        # A query-only reference keeps the current path, and with it any (older) token in
        # the path: name the last segment explicitly so the new token takes its place.
        last = origin.path.rsplit("/", 1)[-1]
        return add_path_param("./" + last + stripped, param, token)
    if stripped.startswith("//"):
        scheme, rest = "http", stripped[2:]
        absolute = True
    elif _SCHEME.match(stripped):
        scheme, _, rest = stripped.partition(":")
        if scheme.lower() not in ("http", "https") or not rest.startswith("//"):
            return url  # mailto:, javascript:, data:, tel: ...
        rest = rest[2:]
        absolute = True
    else:
        absolute = False
    if absolute:
        cut = len(rest)
        for sep in "/?#":
            j = rest.find(sep)
            if 0 <= j < cut:
                cut = j
        if not origin.same(scheme, rest[:cut]):
            return url
        if cut == len(rest) or rest[cut] != "/":  # no path: the token needs one
            head = stripped[:len(stripped) - len(rest) + cut]
            stripped = head + "/" + rest[cut:]
        return add_path_param(stripped, param, token)
    path_end = len(stripped)
    for sep in "?#":
        j = stripped.find(sep)
        if 0 <= j < path_end:
            path_end = j
    last = stripped[:path_end].rsplit("/", 1)[-1].partition(";")[0]
    if last in (".", ".."):  # a dot segment with a parameter would no longer be one
        stripped = stripped[:path_end] + "/" + stripped[path_end:]
    return add_path_param(stripped, param, token)


def _rewrite_tag(tag: bytes, *, param: str, token: str, origin: Origin) -> bytes:
    out: list[bytes] = []
    last = 0
    name_end = 1
    while name_end < len(tag) and tag[name_end] not in b" \t\r\n\f/>\"'":
        name_end += 1
    for m in _ATTR.finditer(tag, name_end):
        value = m.group(3)
        if value is None or m.group(1).lower() not in _URL_ATTRS:
            continue
        quote = value[:1] if value[:1] in (b'"', b"'") else b""
        inner = value[1:-1] if quote else value
        url = inner.decode("latin-1")
        new = rewrite_url(url, param=param, token=token, origin=origin)
        if new is url:
            continue
        start = m.start(3)
        out += (tag[last:start], quote, new.encode("latin-1"), quote)
        last = m.end(3)
    if not out:
        return tag
    out.append(tag[last:])
    return b"".join(out)


class HtmlRewriter:
    """Rewrites the URLs in the tags of an HTML body fed to it chunk by chunk.

    Only a tag cut off by the end of a chunk is kept back for the next one, up to
    `max_carry_bytes` (beyond that it is not a tag after all and goes out as it is). The
    text of `<script>` and `<style>` elements is passed over.
    """

    __slots__ = ("param", "token", "origin", "max_carry_bytes", "_carry", "_raw_end")

    def __init__(self, *, param: str, token: str, origin: Origin,
                 max_carry_bytes: int = 16384) -> None:
        self.param = param
        self.token = token
        self.origin = origin
        self.max_carry_bytes = max_carry_bytes
        self._carry = b""
        self._raw_end: re.Pattern[bytes] | None = None  # inside <script>/<style>: its end

    def feed(self, data: bytes, *, final: bool = False) -> bytes:
        """The rewritten output for `data` so far; with `final`, everything that is left."""
        buf = self._carry + data if self._carry else data
        self._carry = b""
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if self._raw_end is not None:
                end = self._raw_end.search(buf, pos)
                if end is None:
                    keep = 0 if final else min(len(buf) - pos, _RAW_END_MAX)
                    out.append(buf[pos:len(buf) - keep])
                    self._carry = buf[len(buf) - keep:]
                    break
                out.append(buf[pos:end.start()])
                pos = end.start()
                self._raw_end = None
                continue
            m = _TAG.search(buf, pos)
            if m is None:
                keep = 1 if not final and buf.endswith(b"<") else 0
                out.append(buf[pos:len(buf) - keep])
                self._carry = buf[len(buf) - keep:]
                break
            tag = m.group()
            if m.group(2) is None:  # cut off by the end of the chunk
                if final or len(buf) - m.start() > self.max_carry_bytes:
                    out.append(buf[pos:])  # not a tag after all
                else:
                    out.append(buf[pos:m.start()])
                    self._carry = buf[m.start():]
                break
            out += (buf[pos:m.start()], _rewrite_tag(tag, param=self.param, token=self.token,
                                                     origin=self.origin))
            pos = m.end()
            name = m.group(1).lower()
            if name in _RAW_TEXT and not tag.endswith(b"/>"):
                self._raw_end = _RAW_TEXT[name]
        return b"".join(out)


def rewrite_html(html: bytes, *, param: str, token: str, origin: Origin) -> bytes:
    """A whole HTML document, rewritten."""
    return HtmlRewriter(param=param, token=token, origin=origin).feed(html, final=True)


class UrlRewriteMiddleware:
    """Adds the session token to same-origin URLs of responses to cookie-less clients."""

    def __init__(self, app: ASGIApp, *, param_name: str, token_of: TokenOf,
                 max_carry_bytes: int = 16384) -> None:
        self.app = app
        self.param = param_name
        self.token_of = token_of  # the token after this response (None: nothing to add)
        self.max_carry_bytes = max_carry_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self.wrap(scope, send))

    def wrap(self, scope: Scope, send: Send) -> Send:
        """The `send` of one response, rewritten (an http scope)."""
        return _Response(self, scope, send).send


class _Response:
    """The rewriting state of one response."""

    __slots__ = ("mw", "scope", "downstream", "head", "html", "through")

    def __init__(self, mw: UrlRewriteMiddleware, scope: Scope, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.downstream = send
        self.head: Message | None = None   # held until the first body message (HTML only)
        self.html: HtmlRewriter | None = None
        self.through = False  # decided at the response head: nothing to rewrite

    async def send(self, message: Message) -> None:
        if self.through:
            await self.downstream(message)
            return
        mtype = message["type"]
        if mtype == "http.response.start":
            await self._start(message)
        elif mtype == "http.response.body" and self.html is not None:
            await self._body(message)
        else:
            if self.head is not None:
                await self._flush_head(None)
            await self.downstream(message)

    async def _start(self, message: Message) -> None:
        scope = self.scope
        status = message["status"]
        headers = message.get("headers", ())
        # Decided once, at the head; the body messages of a response left alone pass on.
        locations: list[int] = []
        content_type = encoding = b""
        for i, (name, value) in enumerate(headers):
            lname = name.lower()
            if lname == b"location":
                locations.append(i)
            elif lname == b"content-type":
                content_type = value.lower()
            elif lname == b"content-encoding":
                encoding = value.strip().lower()
        html = (content_type.split(b";", 1)[0].strip() in _HTML_TYPES
                and encoding in (b"", b"identity") and status not in (204, 304)
                and not _wide_charset(content_type))
        redirect = bool(locations) and 300 <= status < 400
        # The token is looked at now, not when the request arrived: the session layer
        # inside has read it by now and committed the session, so it is the one to hand out.
        token = None
        if (html or redirect) and scope.get("tandem.token_via") != "cookie":
            token = self.mw.token_of(scope)
        if token is None:
            self.through = True
            await self.downstream(message)
            return
        origin = Origin(scope)
        if redirect:
            headers = list(headers)
            for i in locations:
                name, value = headers[i]
                url = value.decode("latin-1")
                new = rewrite_url(url, param=self.mw.param, token=token, origin=origin)
                if new is not url:
                    headers[i] = (name, new.encode("latin-1"))
            message = {**message, "headers": headers}
        if html:
            self.html = HtmlRewriter(param=self.mw.param, token=token, origin=origin,
                                     max_carry_bytes=self.mw.max_carry_bytes)
            self.head = message
        else:
            self.through = True
            await self.downstream(message)

    async def _body(self, message: Message) -> None:
        assert self.html is not None
        more = message.get("more_body", False)
        out = self.html.feed(message.get("body", b""), final=not more)
        if self.head is not None:
            exact = not more and self.scope.get("method") != "HEAD"
            await self._flush_head(len(out) if exact else None)
        if out or not more:
            await self.downstream({**message, "body": out})

    async def _flush_head(self, length: int | None) -> None:
        head, self.head = self.head, None
        assert head is not None
        headers = [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await self.downstream({**head, "headers": headers})


def _wide_charset(content_type: bytes) -> bool:
    """UTF-16/32 bodies are not ASCII-compatible: the byte patterns above do not apply."""
    i = content_type.find(b"charset=")
    return i >= 0 and content_type[i + 8:].strip(b"\"' ").startswith((b"utf-16", b"utf-32"))
