"""Reading the route token of a request: cookie, then path parameter, then query parameter.

A token that does not verify is treated as absent (the request is routed as a new
session), counted and logged as `bad_token` with at most the claimed SID prefix.

A client sends the same Cookie header on every request of its session, so the route of a
whole Cookie header whose token verified is kept (bounded): one dict lookup per request
instead of decoding the header, splitting it and asking the codec (whose own cache saves
the HMAC).
"""

from __future__ import annotations

from urllib.parse import unquote

import structlog

from tandem.errors import TokenError
from tandem.logs import short
from tandem.token import Route, TokenCodec, cookie_values, path_param, query_param

from .metrics import Metrics

__all__ = ["TokenReader"]

log = structlog.get_logger("tandem.proxy")


class TokenReader:
    """Finds and verifies the route token of a request."""

    __slots__ = ("_codec", "_metrics", "_cookie", "_param", "_path_key", "_query_key",
                 "_url_rewriting", "by_cookie", "_cache_size")

    def __init__(self, codec: TokenCodec, metrics: Metrics, *, cookie_name: str,
                 url_rewriting: bool, cache_size: int = 8192) -> None:
        self._codec = codec
        # Whole Cookie header -> its verified route; read directly by the client's fast lane
        # (a hit is exactly what route() would answer).
        self.by_cookie: dict[bytes, Route] = {}
        self._cache_size = cache_size
        self._metrics = metrics
        self._cookie = cookie_name
        self._param = cookie_name.lower()
        self._path_key = (";" + self._param + "=").encode("ascii")
        self._query_key = (self._param + "=").encode("ascii")
        self._url_rewriting = url_rewriting

    def route(self, cookie: bytes | None, target: bytes) -> Route | None:
        """The verified route of a request, or None (no token, or none that verifies)."""
        if cookie is not None:
            route = self.by_cookie.get(cookie)
            if route is not None:
                return route
            bad = False
            for value in cookie_values(cookie.decode("latin-1"), self._cookie):
                route = self._decode(value, "cookie")
                if route is not None:
                    # (only when no bad token came first: those are counted every time)
                    if not bad and self._cache_size > 0:
                        if len(self.by_cookie) >= self._cache_size:
                            del self.by_cookie[next(iter(self.by_cookie))]  # oldest
                        self.by_cookie[cookie] = route
                    return route
                bad = True
        # (one-byte searches first: memchr, much cheaper than a substring search)
        if (self._url_rewriting and (b"?" in target or b";" in target)
                and self._query_key in target):
            text = target.decode("latin-1")
            if self._path_key in target:
                param = path_param(text, self._param)
                if param is not None:
                    route = self._decode(param, "path")
                    if route is not None:
                        return route
            query = query_param(text, self._param)
            if query is not None:
                route = self._decode(unquote(query) if "%" in query else query, "query")
                if route is not None:
                    return route
        return None

    def _decode(self, token: str, where: str) -> Route | None:
        try:
            return self._codec.decode(token)
        except TokenError as exc:
            self._metrics.bad_tokens += 1
            claimed = token.split("!", 1)[0] if "!" in token else None
            log.warning("bad_token", where=where, error=type(exc).__name__,
                        sid=short(claimed))
            return None
