"""Finding the route token of an outgoing request, and reading where it says the session
lives.

The client holds no cluster secret, so it cannot verify a token's signature: it reads the
payload (`SID!PRIMARY!SECONDARY`) for routing only. The backend that receives the request
verifies it; a forged or damaged token costs only a wasted hop, never a wrong session.
"""

from __future__ import annotations

from urllib.parse import unquote

from tandem.token import NONE, Route, cookie_values, path_param, query_param

__all__ = ["read_route", "route_of_request"]


def read_route(token: str) -> Route | None:
    """The route a token names (signature not checked), or None when it is not one."""
    # itsdangerous: payload "." signature; the signature (url-safe base64) has no "."
    payload, dot, signature = token.rpartition(".")
    if not dot or not signature:
        return None
    parts = payload.split("!")
    if len(parts) != 3 or not all(parts):
        return None
    sid, primary, secondary = parts
    return Route(sid, primary, None if secondary == NONE else secondary)


def route_of_request(cookie: str | None, target: str, *, cookie_name: str,
                     url_rewriting: bool) -> Route | None:
    """The route of a request as a backend would find its token: the cookie first, then
    `;name=` in the path, then `name=` in the query (`target`: path and query)."""
    if cookie:
        for value in cookie_values(cookie, cookie_name):
            route = read_route(value)
            if route is not None:
                return route
    if url_rewriting and (";" in target or "?" in target):
        param = cookie_name.lower()
        in_path = path_param(target, param)
        if in_path and (route := read_route(in_path)) is not None:
            return route
        in_query = query_param(target, param)
        if in_query and (route := read_route(unquote(in_query))) is not None:
            return route
    return None
