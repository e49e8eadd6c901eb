"""Flask's `session` as tandem's replicated session.

    from backends.flask import SessionInterface
    app.session_interface = SessionInterface()

`flask.session` is then a `dict` (as Flask's own session is) over the request's tandem
session (`environ["tandem.session"]`), replicated when the response head is ready. Flask's
rules keep their meaning (docs/frameworks.md has the whole table):

- Values are what Flask's session serializer takes (its tagged JSON: JSON types plus tuple,
  bytes, `Markup`, `UUID`, `datetime`, and tags an app registers on `serializer`): each is
  stored in its tagged form, so what comes back is what went in (`flash()` categories are
  tuples again). A value it cannot take raises TypeError at the assignment. Values mutated
  in place are replicated too.
- `accessed` and `modified` as Flask sets them; `Vary: Cookie` when Flask would send it.
- A session left empty by a change ends (both copies removed, the client's token cleared),
  as Flask deletes its cookie. `session.permanent = True`: the session lives
  `PERMANENT_SESSION_LIFETIME` of inactivity on the servers and its cookie gets `Expires`;
  with `SESSION_REFRESH_EACH_REQUEST` the cookie is sent again with each response.
- The token cookie is written as Flask writes its own, with `SESSION_COOKIE_DOMAIN`, `_PATH`
  (or `APPLICATION_ROOT`), `_SECURE`, `_HTTPONLY`, `_SAMESITE`, `_PARTITIONED` layered over
  the cluster file's settings (backends.frameworks.cookie_rule); its name stays the cluster
  file's `session.cookie_name` (the proxy routes by it).
- Called in-process by its own test client (`app.test_client()`,
  `client.session_transaction()`), outside any tandem server, the app keeps its sessions in
  this process (backends.frameworks.local) under Flask's cookie name, so users' test suites
  run unchanged.

The tandem session itself is `session.tandem`; `regenerate_id()` (call it at login),
`invalidate()`, `encode_url(url)` and `app_session(key)` are forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from flask.sessions import SessionInterface as _FlaskSessionInterface
from flask.sessions import SessionMixin, session_json_serializer
from werkzeug.http import dump_cookie

from .cookie_rule import cluster_sets, layered
from .local import LocalSessions

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

    from flask import Flask, Request, Response
    from flask.json.tag import TaggedJSONSerializer

    from ..sessions.app_session import AppSession
    from ..sessions.session import Session as TandemSession

__all__ = ["SessionInterface", "FlaskSession", "FlaskCookie"]

log = structlog.get_logger("tandem.frameworks")

_MISSING: Any = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})
_SAMESITE = ("Strict", "Lax", "None")


class FlaskSession(dict[str, Any], SessionMixin):
    """Flask's session over one request's tandem session: a dict of the values as Flask's
    serializer gives them back, each write passed on (tagged) to the tandem session."""

    def __init__(self, tandem: TandemSession, serializer: TaggedJSONSerializer, *,
                 local: bool = False) -> None:
        super().__init__()
        self.tandem = tandem
        self.serializer = serializer
        self.local = local  # kept in this process (no tandem server: the app's test client)
        self.accessed = False
        self.modified = False
        self._handed: set[str] = set()  # keys whose (mutable) values were handed out
        untag = getattr(serializer, "_untag_scan", None)
        for key, value in dict.items(tandem):  # (not a read of the app's: no Vary)
            if value.__class__ not in _SCALARS:
                value = untag(value) if untag is not None else serializer.loads(
                    serializer.dumps(value))
            dict.__setitem__(self, key, value)

    # --- reads (Flask before 3.1.3 marks `accessed` on them; later, its request context) ---

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        value = dict.__getitem__(self, key)
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        return value

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.accessed = True
        return dict.__len__(self)

    def keys(self) -> dict_keys[str, Any]:
        self.accessed = True
        return dict.keys(self)

    def values(self) -> dict_values[str, Any]:
        self._hand_out_all()
        return dict.values(self)

    def items(self) -> dict_items[str, Any]:
        self._hand_out_all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self._hand_out_all()
        return dict.copy(self)

    # --- writes -------------------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        self.tandem[key] = self._tag(key, value)  # TypeError here: nothing changes
        dict.__setitem__(self, key, value)
        self._handed.discard(key)
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        self.accessed = self.modified = True

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        del self.tandem[key]
        self._handed.discard(key)
        self.accessed = self.modified = True

    def setdefault(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return self[key]
        self[key] = default
        return default

    def pop(self, key: str, *default: Any) -> Any:
        self.accessed = True
        if not dict.__contains__(self, key):
            return dict.pop(self, key, *default)  # the default, or KeyError
        value = self[key]
        del self[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        key, value = dict.popitem(self)  # the newest key first
        self.tandem.pop(key, None)
        self._handed.discard(key)
        self.accessed = self.modified = True
        return key, value

    def clear(self) -> None:
        self.tandem.clear()
        dict.clear(self)
        self._handed.clear()
        self.accessed = self.modified = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        values = dict(*args, **kwargs)
        self.tandem.update({k: self._tag(k, v) for k, v in values.items()})  # all or nothing
        dict.update(self, values)
        self._handed.update(k for k, v in values.items() if v.__class__ not in _SCALARS)
        self.accessed = self.modified = True

    def __ior__(self, other: Any) -> FlaskSession:  # type: ignore[override,misc]
        self.update(other)
        return self

    # --- what Flask and tandem add ------------------------------------------------------

    @property
    def permanent(self) -> bool:
        # (read by the interface too: not an access of the app's)
        return bool(dict.get(self, "_permanent", False))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self["_permanent"] = bool(value)

    @property
    def new(self) -> bool:  # type: ignore[override]
        return self.tandem.new

    def regenerate_id(self) -> None:
        """A new session id at the end of this request, same data (call it at login)."""
        self.tandem.regenerate_id()

    def invalidate(self) -> None:
        """End the session now: both copies are removed, the client's token is cleared."""
        self.tandem.invalidate()
        dict.clear(self)
        self.modified = True

    def encode_url(self, url: str) -> str:
        """`url` with the session token, for clients that do not keep cookies."""
        return self.tandem.encode_url(url)

    def app_session(self, key: str) -> AppSession:
        """The application session named `key`, shared with every session naming it (its
        values are JSON, not Flask's tagged ones: docs/app-sessions.md)."""
        return self.tandem.app_session(key)

    def __repr__(self) -> str:
        return f"<FlaskSession {dict.__repr__(self)}>"

    # --- internals ----------------------------------------------------------------------

    def _tag(self, key: str, value: Any) -> Any:
        return value if value.__class__ in _SCALARS else self.serializer.tag(value)

    def _hand_out_all(self) -> None:
        self.accessed = True
        self._handed.update(k for k, v in dict.items(self) if v.__class__ not in _SCALARS)

    def sync(self) -> None:
        """Pass on the values mutated in place (end of the request, before the commit)."""
        tandem = self.tandem
        if tandem.invalidated:
            return
        for key in self._handed:
            value = dict.get(self, key, _MISSING)
            if value is _MISSING:
                continue
            tagged = self._tag(key, value)
            if tagged != dict.get(tandem, key, _MISSING):
                try:
                    tandem[key] = tagged
                except TypeError as exc:  # mutated into something it cannot take: kept
                    log.error("session_value_unserializable", error=str(exc))


class FlaskCookie:
    """The token cookie as Flask writes its session cookie (werkzeug's `dump_cookie`)."""

    __slots__ = ("owner", "flask_name", "domain", "path", "secure", "httponly", "samesite",
                 "partitioned", "expires")

    def __init__(self, owner: SessionInterface, *, flask_name: str, domain: str | None,
                 path: str, secure: bool, httponly: bool, samesite: str | None,
                 partitioned: bool, expires: datetime | None) -> None:
        if samesite is not None and samesite.title() not in _SAMESITE:
            raise ValueError("SameSite must be 'Strict', 'Lax', or 'None'.")  # as werkzeug
        self.owner = owner
        self.flask_name = flask_name
        self.domain = domain
        self.path = path
        self.secure = secure
        self.httponly = httponly
        self.samesite = samesite
        self.partitioned = partitioned
        self.expires = expires

    def set(self, name: str, token: str, *, secure: bool) -> bytes:
        self._check_name(name)
        return self._dump(name, token, expires=self.expires, secure=secure)

    def clear(self, name: str, *, secure: bool) -> bytes:
        self._check_name(name)
        return self._dump(name, "", expires=0, max_age=0, secure=secure)

    def _dump(self, name: str, value: str, *, secure: bool, **extra: Any) -> bytes:
        if self.partitioned:  # (werkzeug before 3.0 has no such argument)
            extra["partitioned"] = True
        return dump_cookie(name, value, domain=self.domain, path=self.path,
                           secure=self.secure or secure, httponly=self.httponly,
                           samesite=self.samesite, **extra).encode("latin-1")

    def _check_name(self, name: str) -> None:
        if name != self.flask_name and not self.owner.name_warned:
            self.owner.name_warned = True
            log.warning("session_cookie_name_ignored", framework="flask",
                        setting=self.flask_name, used=name,
                        why="the proxy routes by the cluster file's session.cookie_name")


class SessionInterface(_FlaskSessionInterface):
    """Flask session interface backed by tandem's replicated session."""

    #: Flask's tagged JSON: decides what a session value may be
    serializer = session_json_serializer

    def __init__(self) -> None:
        self.name_warned = False
        self._local: LocalSessions | None = None  # sessions of in-process calls

    def open_session(self, app: Flask, request: Request) -> FlaskSession:
        tandem = request.environ.get("tandem.session")
        if tandem is not None:
            return FlaskSession(tandem, self.serializer)
        # called in-process (the app's own test client), not by a tandem server
        tandem = self._locals(app).open(request.cookies.get(self.get_cookie_name(app)))
        return FlaskSession(tandem, self.serializer, local=True)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, FlaskSession):
            return  # Flask's null session, after open_session failed
        # (dict.__len__ and the permanent property here: not accesses of the app's)
        tandem = session.tandem
        if session.accessed:
            response.vary.add("Cookie")
        session.sync()
        if not tandem.invalidated and not dict.__len__(session) and session.modified:
            response.vary.add("Cookie")  # emptied: Flask deletes its cookie, tandem ends it
            if tandem.record is not None:
                tandem.invalidate()
        if tandem.record is not None:
            tandem.cookie = self._cookie(app, session)  # (also what a clearing one looks like)
            if not tandem.invalidated:
                if dict.__len__(session) and self.should_set_cookie(app, session):
                    tandem.cookie_refresh = True
                    response.vary.add("Cookie")
                self._lifetime(app, session)
        tandem.accessed = False  # Flask decided Vary itself
        if session.local:
            self._commit_locally(app, tandem, response)

    # --- internals ----------------------------------------------------------------------

    def _cookie(self, app: Flask, session: FlaskSession) -> FlaskCookie:
        """The token cookie by Flask's settings, layered over the cluster file's
        (backends.frameworks.cookie_rule)."""
        config, defaults = app.config, app.default_config

        def sets(*keys: str) -> bool:  # the app sets it: not Flask's default
            return any(config.get(k) != defaults.get(k) for k in keys)

        cluster = session.tandem.cluster_settings
        path = layered(self.get_cookie_path(app),
                       app_sets=sets("SESSION_COOKIE_PATH", "APPLICATION_ROOT"),
                       cluster_value=cluster_sets(cluster, "cookie_path"))
        samesite = layered(self.get_cookie_samesite(app),
                           app_sets=sets("SESSION_COOKIE_SAMESITE"),
                           cluster_value=cluster_sets(cluster, "cookie_samesite"))
        partitioned = getattr(self, "get_cookie_partitioned", None)  # (Flask 3.1 on)
        return FlaskCookie(
            self, flask_name=self.get_cookie_name(app), domain=self.get_cookie_domain(app),
            path=path, samesite=samesite, httponly=self.get_cookie_httponly(app),
            # (the cluster file's SameSite=None: browsers refuse it without Secure)
            secure=self.get_cookie_secure(app) or (
                samesite == "None" and not sets("SESSION_COOKIE_SAMESITE")),
            partitioned=bool(partitioned(app)) if partitioned is not None else False,
            expires=self.get_expiration_time(app, session))

    def _lifetime(self, app: Flask, session: FlaskSession) -> None:
        """A permanent session lives PERMANENT_SESSION_LIFETIME of inactivity on the
        servers; one that is not, the cluster file's lifetime (set only on a change: each
        change is replicated)."""
        tandem = session.tandem
        if session.permanent:
            lifetime: float | None = app.permanent_session_lifetime.total_seconds()
        else:
            lifetime = tandem.default_max_inactive_s
        if lifetime is not None and tandem.max_inactive_s != lifetime:
            tandem.max_inactive_s = lifetime

    def _locals(self, app: Flask) -> LocalSessions:
        if self._local is None:
            self._local = LocalSessions(
                max_inactive_s=app.permanent_session_lifetime.total_seconds())
        return self._local

    def _commit_locally(self, app: Flask, tandem: TandemSession, response: Response) -> None:
        """In-process: commit here, and write the cookie as a tandem server would."""
        record, cookie = tandem.record, tandem.cookie
        if record is None or cookie is None:
            return
        held, old = not tandem.new, record.sid  # (before the commit makes it not new)
        result = self._locals(app).commit(tandem)
        name = self.get_cookie_name(app)
        if result.cleared:
            if held:
                response.headers.add("Set-Cookie", cookie.clear(name, secure=False).decode())
        elif result.token is not None and (result.token != old or not held
                                           or tandem.cookie_refresh):
            response.headers.add("Set-Cookie",
                                 cookie.set(name, result.token, secure=False).decode())
