"""The tandem session of the request being served, as Django's stores of that request see it.

Django's storage operations map onto the one session a request has (backends.frameworks.
django): a save hands values over, to be committed when the response head is ready; a
deletion empties the session, which then ends at the commit unless the request writes to
it again — a new session then, under a new id. What the request did is shared by every
store made in it (an app, or Django's own tests, may make several).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from ..sessions import codec
from .django_cookie import DjangoCookie
from .django_host import manager_of

if TYPE_CHECKING:
    from ..sessions.manager import SessionManager
    from ..sessions.session import Session

__all__ = ["RequestSession"]

# id(tandem session) -> its view, for the session's life (sessions are dicts: unhashable)
_views: dict[int, RequestSession] = {}


class RequestSession:
    """One request's tandem session, by Django's storage operations."""

    __slots__ = ("_session", "manager", "ended", "retiring")

    def __init__(self, session: Session) -> None:
        # (weakly: this view lives in `_views` until the session is collected)
        self._session = weakref.ref(session)
        self.manager: SessionManager | None = manager_of(session)
        self.ended = False  # deleted in this request, and not made anew
        self.retiring: set[str] = set()  # ids a cycle_key() gave up (they end at the commit)
        if session.cookie is None and self.manager is not None:
            # the token's cookie, written with the SESSION_COOKIE_* settings
            session.cookie = DjangoCookie(session, self.manager.config.session)

    @classmethod
    def of(cls, session: Session) -> RequestSession:
        view = _views.get(id(session))
        if view is None:
            view = _views[id(session)] = cls(session)
            weakref.finalize(session, _views.pop, id(session), None)
        return view

    @property
    def session(self) -> Session:
        session = self._session()
        assert session is not None, "the request is over"
        return session

    @property
    def default_max_inactive_s(self) -> float | None:
        return None if self.manager is None else self.manager.config.session.max_inactive_s

    def live_key(self) -> str | None:
        """The id naming the request's session now (None: there is none)."""
        t = self.session
        if t.invalidated or t.record is None or self.ended:
            return None
        return t.regenerate_requested or t.record.sid  # (a cycle_key()'s new id at once)

    def alive(self) -> bool:
        """Whether the session is still this server's: not ended meanwhile by a concurrent
        request (nor moved)."""
        record = self.session.record
        return self.manager is None or (
            record is not None and self.manager.store.primaries.get(record.sid) is record)

    def read(self) -> dict[str, str]:
        """The serialized values, as this request sees them."""
        t = self.session
        assert t.record is not None
        if not t.dirty:  # untouched this request: the stored forms themselves
            return dict(t.record.data)
        return {key: codec.dumps(key, t[key]) for key in t}

    def new_identity(self) -> str:
        """Django's `create()`: a session of its own for what the store saves next."""
        t = self.session
        if t.record is None:
            t.id  # noqa: B018 - the new session's record, made now
        elif self.ended:
            self.ended = False  # its values were dropped and its id retired already
        else:  # cycle_key(): a new id for the same values, the old one gone from now on
            self.retiring.add(t.id)
            t.regenerate_id()
        return t.id

    def push(self, changes: dict[str, str | None], *, empty: bool,
             max_inactive_s: float) -> None:
        """Hand a save's changes (key -> serialized value, None: deleted) to the session;
        `empty`: the values are none now."""
        t = self.session
        for key, serialized in changes.items():
            if serialized is not None:
                t[key] = codec.loads(serialized)  # (a copy: later changes need a save())
            elif key in t:
                del t[key]
        if empty:  # emptied, not deleted: kept with its key, as Django keeps it
            t.modified = False
        record = t.record
        if record is not None and max_inactive_s != record.max_inactive_s:
            t.max_inactive_s = max_inactive_s
        t.cookie_refresh = True  # (as Django's middleware sends its cookie at each save)

    def end(self) -> None:
        """The session is deleted: emptied, it ends when the response is sent (both
        copies; the client's token is cleared) — unless the request writes to it again,
        which makes a new session (a new id; the old one ended)."""
        t = self.session
        if t.record is not None and not self.ended:
            t.clear()
            t.regenerate_id()
        self.ended = True
