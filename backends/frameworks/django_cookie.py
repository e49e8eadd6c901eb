"""Tandem's token cookie written with Django's `SESSION_COOKIE_*` settings.

The rule, for every framework: a setting the project sets wins over the cluster file's;
one left at the framework's default leaves the cluster file's. For Django:

- `SESSION_COOKIE_PATH`, `SESSION_COOKIE_SAMESITE`: `Path`, `SameSite` (Django's `None`: no
  `SameSite`); left at Django's defaults, the cluster file's `cookie_path`, `cookie_samesite`.
- `SESSION_COOKIE_SECURE`: adds `Secure`; the cluster file's `cookie_secure = true` stays.
- `SESSION_COOKIE_DOMAIN`, `SESSION_COOKIE_HTTPONLY`: `Domain`, `HttpOnly` (the cluster file
  has neither: Django's values, whose defaults are none and on).
- `SESSION_COOKIE_AGE`, `SESSION_EXPIRE_AT_BROWSER_CLOSE`, `set_expiry()`: `Max-Age` and
  `Expires` as Django's middleware sets them (the session's expiry age; none when it
  expires at browser close) — for a session with an expiry of its own, or when the project
  sets `SESSION_COOKIE_AGE`. Otherwise the cluster file's browser-session cookie: its
  lifetime is then the cluster's `session.max_inactive_s` of inactivity, which every
  request renews, where a `Max-Age` is renewed only by a save.
- `SESSION_COOKIE_NAME` is not used: the proxy finds the token by the cluster file's
  `session.cookie_name`.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from django.conf import settings  # type: ignore[import-untyped]
from django.utils.http import http_date  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from tandem.config import SessionSection

    from ..sessions.session import Session

__all__ = ["DjangoCookie"]

_EXPIRY = "_session_expiry"
_CLEARED = "; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0"


class DjangoCookie:
    """The `Set-Cookie` values of one request's token (tandem's `SessionCookie`)."""

    __slots__ = ("_attrs", "_session", "_browser_close", "_age_set")

    def __init__(self, session: Session, cluster: SessionSection) -> None:
        attrs = ""
        if settings.SESSION_COOKIE_DOMAIN:
            attrs += f"; Domain={settings.SESSION_COOKIE_DOMAIN}"
        path = (settings.SESSION_COOKIE_PATH if settings.is_overridden("SESSION_COOKIE_PATH")
                else cluster.cookie_path)
        attrs += f"; Path={path}"
        if settings.SESSION_COOKIE_HTTPONLY:
            attrs += "; HttpOnly"
        samesite = (settings.SESSION_COOKIE_SAMESITE
                    if settings.is_overridden("SESSION_COOKIE_SAMESITE")
                    else cluster.cookie_samesite)
        if samesite:
            attrs += f"; SameSite={samesite}"
        if settings.SESSION_COOKIE_SECURE or str(samesite).lower() == "none":
            attrs += "; Secure"  # (SameSite=None is refused by browsers without it)
        self._attrs = attrs
        self._session = weakref.ref(session)
        self._browser_close = settings.SESSION_EXPIRE_AT_BROWSER_CLOSE
        self._age_set = settings.is_overridden("SESSION_COOKIE_AGE")

    def set(self, name: str, token: str, *, secure: bool) -> bytes:
        expiry = self._max_age()
        lasting = "" if expiry is None else (
            f"; expires={http_date(time.time() + expiry)}; Max-Age={expiry}")
        return self._value(f"{name}={token}{lasting}", secure)

    def clear(self, name: str, *, secure: bool) -> bytes:
        return self._value(f"{name}={_CLEARED}", secure)

    def _value(self, head: str, secure: bool) -> bytes:
        attrs = self._attrs
        if secure and "; Secure" not in attrs:
            attrs += "; Secure"
        return (head + attrs).encode("latin-1")

    def _max_age(self) -> int | None:
        """Seconds the cookie lasts (None: until the browser closes), as Django's own
        middleware decides: the session's expiry if it has one, else the settings'."""
        session = self._session()
        expiry: Any = None
        if session is not None:
            expiry = dict.get(session, _EXPIRY)  # (no read flags: the response is going out)
        if expiry == 0 or (expiry is None and (self._browser_close or not self._age_set)):
            return None
        if session is None or session.record is None:
            return None
        return max(0, int(session.record.max_inactive_s))
