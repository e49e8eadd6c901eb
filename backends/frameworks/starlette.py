"""Starlette and FastAPI on tandem's session.

An app served by tandem has nothing to write: `request.session` and `websocket.session` are
`scope["session"]`, tandem's session, a `dict` as Starlette's own is. An app that keeps
Starlette's `SessionMiddleware` keeps its options too: when tandem loads the app it puts this
module's `SessionMiddleware` in its place (`adopt`, wherever the app has it: its middleware
list, a mounted app's, a wrapped instance), which leaves tandem's session in the scope and
writes the token cookie with the middleware's settings, as Starlette writes its own:

- `path`, `same_site`, `https_only`, `domain`, `partitioned`: the cookie's attributes,
  layered over the cluster file's settings (backends.frameworks.cookie_rule);
- `max_age`: the cookie's `Max-Age`, sent again with each response that wrote the session
  (as Starlette re-sends its cookie); set by the app (not Starlette's default), also the
  session's lifetime of inactivity on the servers (else the cluster file's); `max_age <= 0`:
  the session ends with each response; `None`: a browser-session cookie;
- `session_cookie`: not used — the token cookie keeps the cluster file's
  `session.cookie_name`, by which the proxy routes (logged once when they differ);
- `secret_key`: not used — the token is signed with the cluster's secrets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from ..sessions.session import Session
from .cookie_rule import cluster_sets, layered

if TYPE_CHECKING:
    from tandem.config import SessionSection

__all__ = ["SessionMiddleware", "StarletteCookie", "adopt"]

log = structlog.get_logger("tandem.frameworks")

_DEPTH = 64  # how deep `adopt` looks into nested apps and routers
_MAX_AGE = 14 * 24 * 60 * 60  # Starlette's default max_age (s)
_EXPIRED = "expires=Thu, 01 Jan 1970 00:00:00 GMT; "


class StarletteCookie:
    """The token cookie as Starlette's SessionMiddleware writes its session cookie."""

    __slots__ = ("path", "max_age", "flags")

    def __init__(self, *, path: str, max_age: int | None, flags: str) -> None:
        self.path = path
        self.max_age = max_age
        self.flags = flags  # "httponly; samesite=lax[; secure][; domain=…][; partitioned]"

    def set(self, name: str, token: str, *, secure: bool) -> bytes:
        max_age = f"Max-Age={self.max_age}; " if self.max_age is not None else ""
        return (f"{name}={token}; path={self.path}; {max_age}{self._flags(secure)}"
                ).encode("latin-1")

    def clear(self, name: str, *, secure: bool) -> bytes:
        # max_age <= 0: the session ended because of it, and Starlette's cookie says so
        gone = (f"Max-Age={self.max_age}; " if self.max_age is not None and self.max_age <= 0
                else _EXPIRED)
        return f"{name}=null; path={self.path}; {gone}{self._flags(secure)}".encode("latin-1")

    def _flags(self, secure: bool) -> str:
        if secure and "secure" not in (f.strip() for f in self.flags.split(";")):
            return self.flags + "; secure"
        return self.flags


class SessionMiddleware:
    """Starlette's `SessionMiddleware` (same arguments) for an app served by tandem: the
    session stays tandem's, the options go to its cookie and lifetime."""

    def __init__(self, app: Any, secret_key: Any = None, session_cookie: str = "session",
                 max_age: int | None = _MAX_AGE, path: str = "/", same_site: str = "lax",
                 https_only: bool = False, domain: str | None = None,
                 partitioned: bool = False) -> None:
        self.app = app
        self.session_cookie = session_cookie
        self.max_age = max_age
        self.path = path
        self.same_site = same_site
        self.https_only = https_only
        self.domain = domain
        self.partitioned = partitioned
        self._cookie: StarletteCookie | None = None  # made at the first request

    @classmethod
    def replacing(cls, theirs: Any) -> SessionMiddleware:
        """Ours in place of an instance of Starlette's, with its settings."""
        flags = [f.strip() for f in theirs.security_flags.split(";")]
        option = {f.partition("=")[0]: f.partition("=")[2] for f in flags}
        return cls(theirs.app, session_cookie=theirs.session_cookie, max_age=theirs.max_age,
                   path=theirs.path, same_site=option.get("samesite", "lax"),
                   https_only="secure" in option, domain=option.get("domain"),
                   partitioned="partitioned" in option)

    def cookie(self, cluster: SessionSection | None) -> StarletteCookie:
        """The cookie by these options layered over the cluster file's
        (backends.frameworks.cookie_rule), with the flags in Starlette's order."""
        path = layered(self.path, app_sets=self.path != "/",
                       cluster_value=cluster_sets(cluster, "cookie_path"))
        same_site = layered(self.same_site, app_sets=self.same_site != "lax",
                            cluster_value=cluster_sets(cluster, "cookie_samesite"))
        flags = "httponly; samesite=" + same_site.lower()
        if self.https_only or (same_site == "None" and self.same_site == "lax"):
            flags += "; secure"  # (the cluster file's SameSite=None needs Secure)
        if self.domain is not None:
            flags += f"; domain={self.domain}"
        if self.partitioned:
            flags += "; partitioned"
        return StarletteCookie(path=path, max_age=self.max_age, flags=flags)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        session = scope.get("session")
        if not isinstance(session, Session):
            raise RuntimeError(
                "backends.frameworks.starlette.SessionMiddleware stands in for Starlette's "
                "in an app served by tandem; there is no tandem session in this scope")
        if self._cookie is None:
            self._cookie = self.cookie(session.cluster_settings)
        session.cookie = self._cookie

        async def send_wrapper(message: Any) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                self._settle(session)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _settle(self, session: Session) -> None:
        """Before the commit: the lifetime, and whether the cookie goes out again."""
        if session.record is None or session.invalidated:
            return
        if session.modified and not dict.__len__(session):
            return  # emptied: it ends, its cookie cleared if the client had one
        max_age = self.max_age
        if max_age is not None and max_age <= 0:
            # Starlette writes a cookie already expired, and reads none back
            session.cookie_refresh = session.modified
            session.invalidate()
            return
        if max_age is not None and max_age != _MAX_AGE and session.max_inactive_s != max_age:
            session.max_inactive_s = max_age  # set by the app: the lifetime on the servers
        if session.modified:
            session.cookie_refresh = True  # a new Max-Age with each write, as Starlette


def adopt(app: Any, *, cookie_name: str) -> Any:
    """`app` with our SessionMiddleware wherever it has Starlette's (changed in place; the
    return value differs only when `app` itself is an instance of Starlette's)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware as Theirs

    seen: set[int] = set()

    def replaced(ours: SessionMiddleware, where: str) -> None:
        log.info("starlette_session_middleware_replaced", where=where)
        if ours.session_cookie != cookie_name:
            log.warning("session_cookie_name_ignored", framework="starlette",
                        setting=ours.session_cookie, used=cookie_name,
                        why="the proxy routes by the cluster file's session.cookie_name")

    def visit(obj: Any, depth: int) -> Any:
        if obj is None or depth > _DEPTH or id(obj) in seen:
            return obj
        seen.add(id(obj))
        if isinstance(obj, Theirs):
            ours = SessionMiddleware.replacing(obj)
            replaced(ours, type(obj).__name__)
            ours.app = visit(obj.app, depth + 1)
            return ours
        if isinstance(obj, Starlette):
            entries: list[Any] = obj.user_middleware
            for i, entry in enumerate(entries):
                if entry.cls is Theirs:
                    entries[i] = Middleware(SessionMiddleware, *entry.args, **entry.kwargs)
                    replaced(SessionMiddleware(None, *entry.args, **entry.kwargs),
                             type(obj).__name__)
                    obj.middleware_stack = None  # (re)built with ours at the next call
            visit(obj.router, depth + 1)
            return obj
        routes = getattr(obj, "routes", None)  # a router, a Mount, a Host
        if isinstance(routes, list):
            for route in routes:
                visit(route, depth + 1)
        inner = getattr(obj, "app", None)  # a middleware, a Mount's app
        if inner is not None:
            new = visit(inner, depth + 1)
            if new is not inner:
                obj.app = new
        return obj

    return visit(app, 0)
