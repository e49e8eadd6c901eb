"""Django sessions backed by tandem's replicated session.

    SESSION_ENGINE = "backends.django"
    MIDDLEWARE = ["backends.django.SessionMiddleware", ...]   # in place of Django's

`request.session` is then a view of the request's tandem session: what the app stores is
replicated to the secondary when the response head is ready. `cycle_key()` (what
`django.contrib.auth.login` calls) gives the session a new id with the same data;
`flush()` (what `logout` calls) empties it and retires its id, and a session still empty at
the end of the request is invalidated: both copies removed, the client's token cleared.

The cookie. tandem's token (cookie `JSESSIONID`, or `;jsessionid=` in URLs) is the one
thing that names a session, and only tandem writes it. So the engine does not use Django's
session key from the cookie at all: `SessionStore` binds to the tandem session of the
request being served, which tandem publishes in a context variable
(`backends.asgi.current_session`, also set in the worker thread of a WSGI app). This
module's `SessionMiddleware` is Django's without the cookie: it never sets or deletes one.
Django's own middleware works too, but it then also sends a `sessionid` cookie holding the
bare session id, which tandem never reads (harmless: without the cluster secret's signature
an id is no token).

Kept from Django: `accessed`/`modified`, `Vary: Cookie`, `set_expiry()` (seconds of
inactivity become tandem's `max_inactive_s`), and no saving on 5xx responses (the request's
changes are dropped). Unlike Django, `session_key` changes when the response is sent, not
at the `cycle_key()` call. Values must be JSON types (Django's default serializer is JSON
too); with cookie-less clients use `CSRF_USE_SESSIONS = True`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

# Django ships no type information (django-stubs is a separate project)
from django.contrib.sessions.backends.base import SessionBase  # type: ignore[import-untyped]
from django.contrib.sessions.middleware import (  # type: ignore[import-untyped]
    SessionMiddleware as _DjangoSessionMiddleware,
)
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.utils import timezone  # type: ignore[import-untyped]
from django.utils.cache import patch_vary_headers  # type: ignore[import-untyped]

from ..serve.asgi import current_session

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]

    from ..sessions.session import Session as TandemSession

__all__ = ["SessionStore", "SessionMiddleware"]


class SessionStore(SessionBase):  # type: ignore[misc]
    """Django's session API over the tandem session of the current request."""

    def __init__(self, session_key: str | None = None) -> None:
        # the cookie's key is ignored: the request's tandem session is the session
        self._tandem = current_session.get()
        self._flushed = False
        super().__init__(session_key)

    def _bound(self) -> TandemSession:
        if self._tandem is None:
            raise ImproperlyConfigured(
                "SESSION_ENGINE 'backends.django' works inside requests served by tandem "
                "(`tandem up --app project.wsgi:application`); there is no tandem session here")
        return self._tandem

    # --- what SessionBase reads and writes through ----------------------------------------

    def _get_session(self, no_load: bool = False) -> Any:
        self.accessed = True
        return self._bound()

    _session = property(_get_session)

    async def _aget_session(self, no_load: bool = False) -> Any:
        return self._get_session(no_load)

    def _get_key(self) -> str | None:
        t = self._tandem
        if t is None or t.invalidated or t.record is None:
            return None
        return t.record.sid

    def _ignore_key(self, value: str | None) -> None:
        pass  # SessionBase assigns the cookie's key; tandem's token decides

    session_key = property(_get_key)
    _session_key = property(_get_key, _ignore_key)

    def _get_or_create_session_key(self) -> str:
        return self._bound().id

    def _get_new_session_key(self) -> str:
        return self._bound().id

    def is_empty(self) -> bool:
        t = self._tandem
        return t is None or t.invalidated or t.record is None or len(t) == 0

    def clear(self) -> None:
        t = self._bound()
        if not t.invalidated:
            for key in list(t):
                del t[key]
        self.accessed = self.modified = True

    # --- the storage API --------------------------------------------------------------

    def exists(self, session_key: str | None) -> bool:
        return session_key is not None and session_key == self.session_key

    def create(self) -> None:
        self._bound().id  # noqa: B018 - creates the session
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        # Nothing to write: tandem commits and replicates when the response head is ready.
        self._bound()

    def delete(self, session_key: str | None = None) -> None:
        t = self._bound()
        if session_key is not None and session_key != self.session_key:
            return  # another request's session: it expires on its own
        if t.record is not None and not t.invalidated:
            t.invalidate()

    def load(self) -> dict[str, Any]:
        return dict(self._bound())

    def cycle_key(self) -> None:
        """A new session id at the end of this request, same data (session fixation)."""
        t = self._bound()
        if t.record is not None and not t.invalidated:
            t.regenerate_id()
        self.modified = True

    def flush(self) -> None:
        """Empty the session and retire its id (invalidated at the end if left empty)."""
        t = self._bound()
        self.clear()
        if t.record is not None and not t.invalidated:
            t.regenerate_id()
        self._flushed = True

    def set_expiry(self, value: Any) -> None:
        super().set_expiry(value)
        if isinstance(value, datetime):
            value = value - timezone.now()
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, (int, float)) and value > 0:
            self._bound().max_inactive_s = value

    def finish(self, status: int) -> None:
        """End of the request: drop the changes of a 5xx, invalidate a flushed empty session."""
        t = self._tandem
        if t is None or t.invalidated or t.record is None:
            return
        if status >= 500:
            t.reset()
        elif self._flushed and len(t) == 0:
            t.invalidate()

    @classmethod
    def clear_expired(cls) -> None:
        pass  # tandem expires sessions (and their replicas) itself

    # Everything is in memory: no thread hop for the async variants.

    async def aexists(self, session_key: str | None) -> bool:
        return self.exists(session_key)

    async def acreate(self) -> None:
        self.create()

    async def asave(self, must_create: bool = False) -> None:
        self.save(must_create)

    async def adelete(self, session_key: str | None = None) -> None:
        self.delete(session_key)

    async def aload(self) -> dict[str, Any]:
        return self.load()

    async def acycle_key(self) -> None:
        self.cycle_key()

    async def aflush(self) -> None:
        self.flush()

    async def aset_expiry(self, value: Any) -> None:
        self.set_expiry(value)

    @classmethod
    async def aclear_expired(cls) -> None:
        pass


class SessionMiddleware(_DjangoSessionMiddleware):  # type: ignore[misc]
    """Django's session middleware without its cookie (tandem's token names the session)."""

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        session = getattr(request, "session", None)
        if not isinstance(session, SessionStore):
            return super().process_response(request, response)
        if session.accessed:
            patch_vary_headers(response, ("Cookie",))
        session.finish(response.status_code)
        return response
