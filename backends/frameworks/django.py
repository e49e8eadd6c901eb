"""Django sessions backed by tandem's replicated session.

    SESSION_ENGINE = "backends.django"
    MIDDLEWARE = ["backends.django.SessionMiddleware", ...]   # or Django's own

`SessionStore` is Django's `SessionBase` with tandem as its storage, so the dictionary, the
flags (`accessed`, `modified`), the expiry methods and `SESSION_SERIALIZER`
(backends.frameworks.django_values) behave as with Django's own engines. What is stored:

- In a request served by tandem: the request's tandem session. Tandem's token (cookie
  `JSESSIONID`, or `;jsessionid=` in URLs) is the one thing that names a session, so the key
  Django's middleware reads from its own cookie is not used. `save()` hands the values to
  the tandem session, which commits them — replicated — when the response head is ready,
  as every request's changes (so a retried request is applied once). Unsaved changes are
  not committed: with either middleware, a 5xx response saves nothing. `delete()` and
  `flush()` end the session (both copies; the client's token is cleared) unless the request
  then writes to it, which makes a new one (`auth.login` after another user, a CSRF token
  after `logout`). A `save()` after another request ended the session raises `UpdateError`
  (the middlewares: `SessionInterrupted`, a 400). A new id (`cycle_key()`, a new session
  after `flush()`) is chosen at once — `session_key` is the new one, the old one no longer
  `exists()` — and the session moves to it when the request commits.
- Outside a request (Django's test client, a test, a shell): sessions by key, written at
  `save()`, as with Django's own engines — through a real `SessionManager` bound with
  `backends.django.use(manager, loop=loop)`, else this process's own sessions
  (backends.frameworks.django_host). A project's test suite works unchanged.

Expiry: `set_expiry(seconds)` is tandem's `max_inactive_s`; a date becomes the time left;
negative seconds or a past date end the session at `save()`. Without one, sessions live
`SESSION_COOKIE_AGE` when the project sets it, else the cluster file's
`session.max_inactive_s`. `clear_expired()` expires idle sessions at once (tandem's sweep
does it anyway). The token's cookie follows `SESSION_COOKIE_*` (backends.frameworks.
django_cookie). `request.session.app_session(key)`: the application session named `key`
(docs/app-sessions.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

# Django ships no type information (django-stubs is a separate project)
from django.conf import settings  # type: ignore[import-untyped]
from django.contrib.sessions.backends.base import (  # type: ignore[import-untyped]
    SessionBase,
    UpdateError,
)
from django.contrib.sessions.exceptions import SessionInterrupted  # type: ignore[import-untyped]
from django.contrib.sessions.middleware import (  # type: ignore[import-untyped]
    SessionMiddleware as _DjangoSessionMiddleware,
)
from django.utils import timezone  # type: ignore[import-untyped]
from django.utils.cache import patch_vary_headers  # type: ignore[import-untyped]

from tandem.token import new_sid

from ..errors import SessionError
from ..serve.asgi import current_session
from .django_host import Host, current_host, use
from .django_request import RequestSession
from .django_values import ValueCodec, Values

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]

    from ..sessions.app_session import AppSession

__all__ = ["SessionStore", "SessionMiddleware", "use"]

_EXPIRY = "_session_expiry"  # where Django keeps a custom expiry, in the session itself
_INTERRUPTED = ("The request's session was deleted before the request completed. The user "
                "may have logged out in a concurrent request, for example.")


class SessionStore(SessionBase):  # type: ignore[misc]
    """Django's session API over tandem's sessions."""

    _session_key: str | None  # (SessionBase's property: None names no session)

    def __init__(self, session_key: str | None = None) -> None:
        # in a request served by tandem: that request's session, whatever the cookie says
        tandem = current_session.get()
        self._request = None if tandem is None else RequestSession.of(tandem)
        self._stored: dict[str, str] = {}  # key -> serialized value, as the storage holds it
        if self._request is not None:
            session_key = self._request.live_key()
        super().__init__(session_key)
        self._codec = ValueCodec(self.serializer)
        # session.max_session_bytes, checked at assignment as tandem's Session checks it
        settings = None if tandem is None else tandem.cluster_settings
        self._limit = 0 if settings is None else settings.max_session_bytes

    # --- the dictionary: assignments are checked by SESSION_SERIALIZER ----------------------

    def _get_cache(self) -> Values:
        return self._values  # (AttributeError until loaded: SessionBase relies on it)

    def _set_cache(self, values: dict[str, Any]) -> None:
        self._values = values if isinstance(values, Values) else Values(
            self._codec.dumps, values, limit=self._limit)

    _session_cache = property(_get_cache, _set_cache)

    async def aset(self, key: str, value: Any) -> None:
        (await self._aget_session())[key] = value
        self.modified = True

    # --- the storage API ------------------------------------------------------------------

    def exists(self, session_key: str | None) -> bool:
        if self._request is not None:
            r = self._request
            return session_key is not None and session_key == r.live_key() and r.alive()
        return self._host().run(lambda: self.aexists(session_key))

    async def aexists(self, session_key: str | None) -> bool:
        if self._request is not None:
            return self.exists(session_key)
        host = self._host()
        return await host.arun(lambda: host.exists(session_key))

    def load(self) -> dict[str, Any]:
        if self._request is not None:
            r = self._request
            key = self.session_key
            return self._loaded(r.read() if key is not None and key == r.live_key() else None)
        return self._host().run(self.aload)

    async def aload(self) -> dict[str, Any]:
        if self._request is not None:
            return self.load()
        host = self._host()
        stored = await host.arun(lambda: host.load(self.session_key))
        values = self._loaded(stored)
        if stored is not None and self._expired(values):
            await host.arun(lambda: host.delete(self.session_key))
            return self._loaded(None)
        return values

    def create(self) -> None:
        if self._request is None:
            return self._host().run(self.acreate)
        self._session_key = self._request.new_identity()
        self.modified = True
        self.save(must_create=True)

    async def acreate(self) -> None:
        if self._request is not None:
            return self.create()
        host = self._host()
        data = await self._aget_session(no_load=True)
        if self._expired(data):  # created past its expiry: a key naming nothing
            self._session_key, self._stored = new_sid(), {}
            self.modified = True
            return None
        sid = await host.arun(lambda: host.write(None, self._changes(data, {}),
                                                 max_inactive_s=self._max_inactive_s(data)))
        self._session_key, self._stored = sid, self._serialized(data)
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        if self._request is None:
            return self._host().run(lambda: self.asave(must_create))
        if self.session_key is None:
            return self.create()
        r = self._request
        if not must_create and (self.session_key != r.live_key() or not r.alive()):
            raise UpdateError("this request's session has ended")
        data = self._get_session(no_load=must_create)
        if self._expired(data):
            self._end()
            return None
        r.push(self._changes(data, self._stored), empty=not data,
               max_inactive_s=self._max_inactive_s(data))
        self._stored = self._serialized(data)
        return None

    async def asave(self, must_create: bool = False) -> None:
        if self._request is not None:
            return self.save(must_create)
        if self.session_key is None:
            return await self.acreate()
        host = self._host()
        data = await self._aget_session(no_load=must_create)
        key = self.session_key
        if self._expired(data):
            await host.arun(lambda: host.delete(key))
            return None
        sid = await host.arun(lambda: host.write(key, self._changes(data, self._stored),
                                                 max_inactive_s=self._max_inactive_s(data)))
        if sid is None:
            raise UpdateError(f"session {key[:8]}… does not exist (any more)")
        self._stored = self._serialized(data)
        return None

    def delete(self, session_key: str | None = None) -> None:
        if self._request is None:
            return self._host().run(lambda: self.adelete(session_key))
        r = self._request
        if session_key is None:  # this session (flush(), logout)
            if self.session_key is not None and self.session_key == r.live_key():
                self._end()
        elif session_key in r.retiring:
            pass  # cycle_key() deleting the old id: it ends when the response is sent
        elif session_key == r.live_key():
            self._end()
        # (no other session is reachable from a request: tandem's token names the request's)
        return None

    async def adelete(self, session_key: str | None = None) -> None:
        if self._request is not None:
            return self.delete(session_key)
        host = self._host()
        key = session_key if session_key is not None else self.session_key
        await host.arun(lambda: host.delete(key))
        return None

    def cycle_key(self) -> None:
        """A new session id with the same values (what `auth.login` calls)."""
        if self._request is not None:
            return super().cycle_key()  # type: ignore[no-any-return]
        return self._host().run(self.acycle_key)

    async def acycle_key(self) -> None:
        if self._request is not None:
            return self.cycle_key()
        host = self._host()
        data = await self._aget_session()
        key = self.session_key
        sid = None if key is None else await host.arun(lambda: host.write(
            key, self._changes(data, self._stored), regenerate=True,
            max_inactive_s=self._max_inactive_s(data)))
        if sid is None:  # no stored session to carry over: a new one
            await self.acreate()
        else:
            self._session_key, self._stored = sid, self._serialized(data)
        self._session_cache = data
        return None

    async def aflush(self) -> None:
        if self._request is not None:
            return self.flush()  # type: ignore[no-any-return]
        return await super().aflush()  # type: ignore[no-any-return]

    def app_session(self, key: str) -> AppSession:
        """The application session named `key`, shared with every session naming it
        (docs/app-sessions.md); in a request served by tandem only. In an async view:
        `room = await request.session.app_session(key)`."""
        if self._request is None:
            raise SessionError("application sessions exist in requests served by tandem")
        return self._request.session.app_session(key)

    def _get_new_session_key(self) -> str:
        return new_sid()  # (tandem makes the ids of its sessions; this one is merely unused)

    @classmethod
    def clear_expired(cls) -> None:
        """Expire idle sessions now (tandem's sweep would, at its next round)."""
        host = current_host()
        host.run(host.clear_expired)

    @classmethod
    async def aclear_expired(cls) -> None:
        host = current_host()
        await host.arun(host.clear_expired)

    # --- expiry ---------------------------------------------------------------------------

    def get_session_cookie_age(self) -> float:
        """Sessions without an expiry of their own live this long (seconds of inactivity):
        `SESSION_COOKIE_AGE` when the project sets it, else the cluster file's."""
        if settings.is_overridden("SESSION_COOKIE_AGE"):
            return settings.SESSION_COOKIE_AGE  # type: ignore[no-any-return]
        age = (current_host().default_max_inactive_s if self._request is None
               else self._request.default_max_inactive_s)
        if age is None:
            return settings.SESSION_COOKIE_AGE  # type: ignore[no-any-return]
        return int(age) if age == int(age) else age

    @staticmethod
    def _expired(data: dict[str, Any]) -> bool:
        """Whether the session's own expiry has passed (it ends at once)."""
        expiry = data.get(_EXPIRY)
        if isinstance(expiry, str):
            return datetime.fromisoformat(expiry) <= timezone.now()  # type: ignore[no-any-return]
        return isinstance(expiry, (int, float)) and expiry < 0

    def _max_inactive_s(self, data: dict[str, Any]) -> float:
        expiry = data.get(_EXPIRY)
        if isinstance(expiry, str):
            left: float = (datetime.fromisoformat(expiry) - timezone.now()).total_seconds()
            return max(left, 0.001)
        if isinstance(expiry, (int, float)) and expiry > 0:
            return float(expiry)
        return float(self.get_session_cookie_age())  # none, or 0 (until the browser closes)

    def _end(self) -> None:
        """This request's session is deleted (it ends when the response is sent, unless the
        request writes to it again)."""
        assert self._request is not None
        self._request.end()
        self._stored = {}
        self._session_key = None

    # --- helpers --------------------------------------------------------------------------

    def _host(self) -> Host:
        return current_host()

    def _loaded(self, stored: dict[str, str] | None) -> dict[str, Any]:
        """The values of a load (None: no such session — Django then forgets the key)."""
        if stored is None:
            self._session_key = None
            self._stored = {}
            return {}
        self._stored = stored
        loads = self._codec.loads
        return {key: loads(key, serialized) for key, serialized in stored.items()}

    def _serialized(self, data: dict[str, Any]) -> dict[str, str]:
        dumps = self._codec.dumps
        return {key: dumps(key, value) for key, value in data.items()}

    def _changes(self, data: dict[str, Any], stored: dict[str, str]) -> dict[str, str | None]:
        """What saving `data` over `stored` changes: key -> serialized value, None: deleted."""
        changes: dict[str, str | None] = {key: None for key in stored if key not in data}
        dumps = self._codec.dumps
        for key, value in data.items():
            serialized = dumps(key, value)
            if stored.get(key) != serialized:
                changes[key] = serialized
        return changes

    def changed_in_place(self) -> bool:
        """Whether values read this request were changed without an assignment."""
        try:
            data = self._values
        except AttributeError:
            return False
        return bool(self._changes(data, self._stored))


class SessionMiddleware(_DjangoSessionMiddleware):  # type: ignore[misc]
    """Django's session middleware; in requests served by tandem it sets no cookie of its
    own (tandem's token names the session), and it also saves values changed in place."""

    def process_request(self, request: HttpRequest) -> None:
        if current_session.get() is None:
            super().process_request(request)  # outside tandem: Django's own cookie
        else:
            request.session = self.SessionStore()

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        session = getattr(request, "session", None)
        if not isinstance(session, SessionStore) or session._request is None:
            return super().process_response(request, response)
        if session.accessed:
            patch_vary_headers(response, ("Cookie",))
        if response.status_code < 500 and not session.is_empty() and (
                session.modified or settings.SESSION_SAVE_EVERY_REQUEST
                or session.changed_in_place()):
            try:
                session.save()
            except UpdateError:
                raise SessionInterrupted(_INTERRUPTED) from None
        return response
