"""The route token: `SID!PRIMARY!SECONDARY`, signed with itsdangerous (the wire contract).

The first configured secret signs, every secret verifies (key rotation). Only backends mint
tokens; the proxy only reads them. Verified tokens are cached (bounded) so that a client
that sends the same token on every request costs one dict lookup, not one HMAC; so are
minted ones, so that a route handed out again (a link, a cookie) is not signed again.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import itsdangerous

from .errors import BadSignature, MalformedToken

__all__ = ["Route", "TokenCodec", "NONE", "new_sid", "cookie_values", "path_param",
           "query_param", "strip_path_param", "add_path_param"]

NONE = "NONE"
_SALT = "tandem.route"
_SID_BYTES = 24  # 192 bits; url-safe base64 never contains '!' or '.'


def new_sid() -> str:
    return _secrets.token_urlsafe(_SID_BYTES)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a session lives: its id, its primary server and its secondary (None: none)."""

    sid: str
    primary: str
    secondary: str | None

    @property
    def payload(self) -> str:
        return f"{self.sid}!{self.primary}!{self.secondary or NONE}"

    def __repr__(self) -> str:  # never print a whole SID
        shown = self.sid[:6] if len(self.sid) > 12 else ""
        return f"Route({shown}…, {self.primary}, {self.secondary or NONE})"


class TokenCodec:
    """Signs and verifies route tokens with the cluster secrets."""

    def __init__(self, secrets: Sequence[str], *, cache_size: int = 16384) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        # itsdangerous signs with the *last* key of its list; ours signs with the first.
        self._signer = itsdangerous.Signer(
            list(reversed(list(secrets))), salt=_SALT, digest_method=hashlib.sha256
        )
        self._cache: dict[str, Route] = {}
        self._encoded: dict[Route, str] = {}
        self._cache_size = cache_size

    def encode(self, route: Route) -> str:
        token = self._encoded.get(route)
        if token is not None:
            return token
        for part in (route.sid, route.primary, route.secondary or NONE):
            if not part or "!" in part or not part.isascii():
                raise ValueError(f"cannot encode {route!r}: empty, '!' or non-ASCII part")
        token = self._signer.sign(route.payload).decode("ascii")
        if self._cache_size > 0:
            if len(self._encoded) >= self._cache_size:
                del self._encoded[next(iter(self._encoded))]  # oldest first
            self._encoded[route] = token
            # the client will send it back: its verification is known already
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = route
        return token

    def decode(self, token: str) -> Route:
        """Verify and parse; raises BadSignature or MalformedToken."""
        route = self._cache.get(token)
        if route is not None:
            return route
        try:
            raw = self._signer.unsign(token)
        except (itsdangerous.BadSignature, UnicodeError, ValueError) as exc:
            raise BadSignature("route token signature does not verify") from exc
        try:
            payload = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MalformedToken("route token payload is not ASCII") from exc
        parts = payload.split("!")
        if len(parts) != 3 or not all(parts):
            raise MalformedToken("route token payload is not SID!PRIMARY!SECONDARY")
        sid, primary, secondary = parts
        route = Route(sid, primary, None if secondary == NONE else secondary)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # oldest first
            self._cache[token] = route
        return route


# --- where the token travels ------------------------------------------------------------------


def cookie_values(cookie_header: str, name: str) -> Iterator[str]:
    """Every value of cookie `name` in a Cookie header, in order."""
    prefix = name + "="
    if prefix not in cookie_header:
        return
    for part in cookie_header.split(";"):
        part = part.strip()
        if part.startswith(prefix):
            value = part[len(prefix):]
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if value:
                yield value


def path_param(target: str, name: str) -> str | None:
    """The `;name=TOKEN` path parameter of a request target (name already lowercased)."""
    key = ";" + name + "="
    q = target.find("?")
    path = target if q < 0 else target[:q]
    i = path.find(key)
    if i < 0:
        return None
    start = i + len(key)
    end = len(path)
    for sep in ";/":
        j = path.find(sep, start)
        if 0 <= j < end:
            end = j
    return path[start:end] or None


def query_param(target: str, name: str) -> str | None:
    """The `name=TOKEN` query parameter of a request target."""
    q = target.find("?")
    if q < 0:
        return None
    key = name + "="
    for part in target[q + 1:].split("&"):
        if part.startswith(key):
            return part[len(key):] or None
    return None


def strip_path_param(path: str, name: str) -> str:
    """The path with its `;name=…` parameter removed (what the application sees).

    Only the path is searched: a query string is left as it is.
    """
    key = ";" + name + "="
    q = path.find("?")
    limit = len(path) if q < 0 else q
    i = path.find(key, 0, limit)
    if i < 0:
        return path
    end = limit
    for sep in ";/":
        j = path.find(sep, i + len(key), limit)
        if 0 <= j < end:
            end = j
    return path[:i] + path[end:]


def add_path_param(url: str, name: str, token: str) -> str:
    """`url` with `;name=token` on its path (any earlier such parameter replaced)."""
    cut = len(url)
    for sep in "?#":
        j = url.find(sep)
        if 0 <= j < cut:
            cut = j
    return strip_path_param(url[:cut], name) + ";" + name + "=" + token + url[cut:]
