"""Flask's `session` as tandem's replicated session.

    from backends.flask import SessionInterface
    app.session_interface = SessionInterface()

`flask.session` is then a view of the request's tandem session (`environ["tandem.session"]`):
what the app stores is replicated to the secondary when the response head is ready. Flask's
usual attributes keep their meaning:

- `session.modified` is set by assignments, deletions and `clear()`; setting it by hand is
  harmless and not needed (values mutated in place are replicated anyway).
- `session.clear()` empties the session; a session left empty at the end of the request is
  invalidated (both copies removed, the client's token cleared), as Flask deletes its cookie.
- `session.permanent = True` makes the session live `app.permanent_session_lifetime` of
  inactivity on the servers (tandem's `max_inactive_s`). The client's token stays a
  browser-session cookie: tandem owns that cookie and this interface never sets one.
- `session.new` is true when this request created the session.

The tandem session itself is `session.tandem`; `regenerate_id()` (call it at login),
`invalidate()` and `encode_url(url)` are forwarded. Values must be JSON types, as everywhere
in tandem (Flask's `flash()` works: its tuples are stored as lists).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask.sessions import SessionInterface as _FlaskSessionInterface
from flask.sessions import SessionMixin

if TYPE_CHECKING:
    from flask import Flask, Request, Response

    from ..sessions.session import Session as TandemSession

__all__ = ["SessionInterface", "FlaskSession"]


class FlaskSession(SessionMixin):
    """Flask's session interface over one request's tandem session."""

    def __init__(self, tandem: TandemSession) -> None:
        self.tandem = tandem
        self.modified = False
        self.accessed = False

    # --- mapping (reads mark the session accessed, writes mark it modified) ---------------

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return self.tandem[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.accessed = True
        self.tandem[key] = value  # TypeError here for values that cannot be replicated
        self.modified = True

    def __delitem__(self, key: str) -> None:
        self.accessed = True
        del self.tandem[key]
        self.modified = True

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return key in self.tandem

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return iter(list(self.tandem))

    def __len__(self) -> int:
        self.accessed = True
        return len(self.tandem)

    def clear(self) -> None:
        for key in list(self.tandem):
            del self.tandem[key]
        self.accessed = self.modified = True

    def __repr__(self) -> str:
        return f"<FlaskSession {self.tandem!r}>"

    # --- what Flask and tandem add ------------------------------------------------------

    @property
    def new(self) -> bool:  # type: ignore[override]
        return self.tandem.new

    def regenerate_id(self) -> None:
        """A new session id at the end of this request, same data (call it at login)."""
        self.tandem.regenerate_id()

    def invalidate(self) -> None:
        """End the session now: both copies are removed, the client's token is cleared."""
        self.tandem.invalidate()
        self.modified = True

    def encode_url(self, url: str) -> str:
        """`url` with the session token, for clients that do not keep cookies."""
        return self.tandem.encode_url(url)


class SessionInterface(_FlaskSessionInterface):
    """Flask session interface backed by tandem's replicated session."""

    def open_session(self, app: Flask, request: Request) -> FlaskSession:
        tandem = request.environ.get("tandem.session")
        if tandem is None:
            raise RuntimeError(
                "backends.flask.SessionInterface needs the app to be served by tandem "
                "(`tandem up --app module:app` or `tandem backend`): the WSGI environ has no "
                "'tandem.session'")
        return FlaskSession(tandem)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, FlaskSession):
            return  # Flask's null session, after open_session failed
        if session.accessed:
            response.vary.add("Cookie")
        tandem = session.tandem
        if tandem.invalidated or tandem.record is None:
            return  # nothing stored, or already ended
        if session.modified and len(tandem) == 0:
            tandem.invalidate()  # emptied: Flask would delete its cookie
            return
        if session.permanent:
            lifetime = app.permanent_session_lifetime.total_seconds()
            if tandem.max_inactive_s != lifetime:  # set once: each change is replicated
                tandem.max_inactive_s = lifetime
