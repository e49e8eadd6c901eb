"""Where Django's `SessionStore` finds sessions by key outside a request served by tandem.

Inside a request the store is the request's own tandem session, named by tandem's token
(backends.frameworks.django). Outside one — a test that builds `SessionStore()` itself,
Django's test client, a shell — there is no token, and the store works as Django's own
engines do: by key, each `save()` written at once, into one of:

- a real `SessionManager` running on its event loop (in another thread, usually), bound with
  `use(manager, loop=loop)`: every write goes through the manager's own commit, so it is
  replicated to the session's secondary like any request's;
- otherwise this process's own sessions (backends.frameworks.local), never replicated: what
  a project's own test suite needs, its app called in-process by Django's test client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from ..sessions import codec
from ..sessions.session import Session
from .local import LocalSessions

if TYPE_CHECKING:
    from ..sessions.manager import SessionManager
    from ..sessions.store import LocalStore, Primary

__all__ = ["Host", "ManagerHost", "LocalHost", "use", "current_host", "manager_of"]

log = structlog.get_logger("tandem.frameworks")

T = TypeVar("T")

_lock = threading.Lock()
_bound: ManagerHost | None = None
_local: LocalHost | None = None


def use(manager: SessionManager | None, *, loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
    """Serve `SessionStore`s made outside requests from `manager`, which runs on `loop`
    (None: no longer)."""
    global _bound
    if manager is not None and loop is None:
        raise ValueError("use(manager, loop=...): the event loop the manager runs on")
    with _lock:
        _bound = None if manager is None else ManagerHost(manager, loop)  # type: ignore[arg-type]


def current_host() -> Host:
    """The bound manager's sessions, else this process's own."""
    global _local
    host: Host | None = _bound
    if host is None:
        with _lock:
            if _local is None:
                from django.conf import settings  # type: ignore[import-untyped]

                _local = LocalHost(LocalSessions(max_inactive_s=settings.SESSION_COOKIE_AGE))
                log.info("django_sessions_local", reason="outside requests served by tandem, "
                         "no session manager bound: this process's own sessions")
            host = _local
    return host


def manager_of(session: Session) -> SessionManager | None:
    """The manager serving a request's tandem session (its server's configuration and store).

    The session holds its server as its context: the middleware, or the middleware seen
    through one request. (Read here, in one place, until the session says it itself.)
    """
    context = getattr(session, "_context", None)
    middleware = getattr(context, "_mw", context)
    return getattr(middleware, "manager", None)


class Host:
    """Sessions by key, reachable from any thread: the `a*` coroutines run where the
    sessions live; `run()` (a caller not on an event loop) and `arun()` (any loop) get
    them there."""

    store: LocalStore
    default_max_inactive_s: float

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        raise NotImplementedError

    async def arun(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        raise NotImplementedError

    def _session(self, record: Primary | None) -> Session:
        raise NotImplementedError

    async def _commit(self, session: Session) -> None:
        raise NotImplementedError

    def _expire(self, primaries: list[Primary]) -> None:
        raise NotImplementedError

    # --- where the sessions live ------------------------------------------------------

    def record(self, sid: str | None) -> Primary | None:
        """The live session named `sid` here (None: none, ended, or idle past its time)."""
        if sid is None:
            return None
        record = self.store.primaries.get(sid)
        if record is None or record.expired(time.time()):
            return None
        return record

    async def exists(self, sid: str | None) -> bool:
        return self.record(sid) is not None

    async def load(self, sid: str | None) -> dict[str, str] | None:
        """The serialized values of session `sid` (None: there is no such session)."""
        record = self.record(sid)
        return None if record is None else dict(record.data)

    async def write(self, sid: str | None, changes: dict[str, str | None], *,
                    max_inactive_s: float | None = None, regenerate: bool = False,
                    ) -> str | None:
        """Commit `changes` (key -> serialized value, None: deleted) to session `sid`, or to a
        new session (`sid` None); the session's id after the commit, None when `sid` names
        no session (any more). `regenerate`: a new id, same data (the old one ends)."""
        if sid is None:
            session = self._session(None)
            session.id  # noqa: B018 - the new session's record, made now
        else:
            record = self.record(sid)
            if record is None:
                return None
            session = self._session(record)
        for key, serialized in changes.items():
            if serialized is not None:
                session[key] = codec.loads(serialized)
            elif key in session:
                del session[key]
        if max_inactive_s is not None and max_inactive_s != session.max_inactive_s:
            session.max_inactive_s = max_inactive_s
        if regenerate:
            session.regenerate_id()
        session.modified = False  # (an emptied session is kept, as Django keeps it)
        await self._commit(session)
        record = session.record
        assert record is not None
        return record.sid

    async def delete(self, sid: str | None) -> None:
        record = self.record(sid)
        if record is not None:
            session = self._session(record)
            session.invalidate()
            await self._commit(session)

    async def clear_expired(self) -> None:
        """Expire now what the sweep would expire at its next round."""
        primaries, _replicas = self.store.expired()
        if primaries:
            self._expire(primaries)


class ManagerHost(Host):
    """The sessions of a real `SessionManager`, on the event loop it runs on."""

    def __init__(self, manager: SessionManager, loop: asyncio.AbstractEventLoop) -> None:
        self.manager = manager
        self.loop = loop
        self.store = manager.store
        self.default_max_inactive_s = manager.config.session.max_inactive_s

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `fn()` on the manager's loop and wait for it (not from that loop's thread)."""
        if _running_loop() is self.loop:
            raise RuntimeError(
                "a Django session outside a request cannot wait for tandem's event loop from "
                "that loop's own thread: use the async methods (asave(), aload(), ...)")
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result()

    async def arun(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if asyncio.get_running_loop() is self.loop:
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(fn), self.loop))

    def _session(self, record: Primary | None) -> Session:
        return Session(record, create=self.manager.new_session)

    async def _commit(self, session: Session) -> None:
        await self.manager.commit(session)

    def _expire(self, primaries: list[Primary]) -> None:
        self.manager.expiry.expire(primaries)


class LocalHost(Host):
    """This process's own sessions: nothing waits, so the coroutines run where they are
    called (under a lock: Django's test client may be called from several threads)."""

    def __init__(self, sessions: LocalSessions) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.default_max_inactive_s = sessions.store.max_inactive_s
        self._lock = threading.RLock()

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        with self._lock:
            coro = fn()
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            coro.close()
            raise RuntimeError("a local session operation waited for something")

    async def arun(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self.run(fn)

    def _session(self, record: Primary | None) -> Session:
        return Session(record, create=self.store.create)

    async def _commit(self, session: Session) -> None:
        self.sessions.commit(session)

    def _expire(self, primaries: list[Primary]) -> None:
        pass  # (store.expired() removed them: no copy elsewhere)


async def _call(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return await fn()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
