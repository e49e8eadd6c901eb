"""URL rewriting of responses, for clients that do not keep cookies (`;jsessionid=TOKEN`).

When URLs carry the token — the rule, which `session.encode_url(url)` follows too:

- The request's token came by cookie: never. A GET or HEAD whose path carries
  `;jsessionid=` as well (a link from a first response, below) is redirected (302) to the
  same URL without it before the application runs, so that the token leaves the address
  bar, the history and the `Referer` of the next page; other methods are served as they
  are, their responses not rewritten.
- It came in the URL (path parameter, or query): always. This client sent no cookie.
- No token (the request creates the session): the first response carries the token both in
  `Set-Cookie` and in its URLs, as Tomcat and WebLogic do, since nothing tells yet whether
  the client keeps cookies. One that does sends the cookie with its next request, and from
  then on sees no token (above). A request that brought our cookie with a token that does
  not verify (an old secret, a damaged value) comes from a client that keeps cookies: its
  response is not rewritten.

The rule is per request, not per session ("cookies worked once for this session"): a
request with the token only in its URL comes from a client that sent no cookie this time,
and links without the token would lose it its session.

`UrlRewriteMiddleware` (ASGI) applies it to responses: same-origin URLs in the `Location` of
redirects, and in HTML bodies (`html_rewriter`: `href`, `src`, `action`, `formaction`,
`srcset`, `xlink:href`, meta refresh). It streams: a body that is not HTML, or is
compressed (`Content-Encoding`), passes through untouched, message by message. HTML is
rewritten chunk by chunk, with a bounded carry-over (`max_carry_bytes`). The response head
is held until the first body message: a body sent in one message gets its exact
`Content-Length`, a streamed one loses it (the server then sends it chunked).

tandem's `TandemMiddleware` wraps it around its session handling when
`session.url_rewriting = true` and the rule says so, so the head it sees is the committed
one and the token is the one the client must hold after this response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .html_rewriter import HtmlRewriter, rewrite_html
from .origin import Origin, rewrite_url

__all__ = ["UrlRewriteMiddleware", "HtmlRewriter", "TokenOf", "Origin", "rewrite_url",
           "rewrite_html", "token_in_urls"]

# the ASGI types, as in backends.asgi (which imports this module)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
TokenOf = Callable[[Scope], "str | None"]

_HTML_TYPES = (b"text/html", b"application/xhtml+xml")


def token_in_urls(via: str | None, *, cookie_sent: bool) -> bool:
    """Do responses to a request put the token in URLs? (the rule above)

    `via`: where the request's verified token came from ("cookie", "path", "query", None);
    `cookie_sent`: whether it brought a cookie of ours at all.
    """
    if via is None:
        return not cookie_sent
    return via != "cookie"


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
