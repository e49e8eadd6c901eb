"""Sessions kept in this process, for a framework's own test client (or development server)
calling an app that is not served by tandem.

A user's test suite calls its app in-process (Flask's `app.test_client()`,
`client.session_transaction()`): no tandem server, no peer, no proxy. The app's session code
must work there all the same, so the framework's glue keeps its sessions here: the same
session object and change tracking as under tandem, in one `LocalStore`, named by their
random id alone (the cookie's value), never replicated — and the application sessions
they name (`session.app_session(key)`: `LocalAppSessions`), shared by the clients of
the test process.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from tandem.logs import short

from ..sessions.app_session import RESERVED, AppSession, applied
from ..sessions.session import Session
from ..sessions.store import LocalStore

__all__ = ["LocalSessions", "LocalCommit", "LocalAppSessions"]

_MEMBER = RESERVED + "m:"  # (as a server keeps its members: backends.sessions.app_sessions)

log = structlog.get_logger("tandem.frameworks")


@dataclass(frozen=True, slots=True)
class LocalCommit:
    token: str | None       # the cookie value the client must hold after this response
    cleared: bool = False   # the session ended: clear the client's cookie


class LocalAppSessions:
    """The application sessions of one app called in-process: key -> stored values, with
    its members (docs/app-sessions.md), never replicated, never expired."""

    loop: asyncio.AbstractEventLoop | None = None  # (reads need no event loop: `open_now`)

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, str]] = {}

    def open_now(self, key: str, *, member: str) -> dict[str, Any]:
        data = self.rooms.setdefault(key, {})
        data.setdefault(_MEMBER + member, "{}")
        return self._state(data)

    def commit_now(self, handles: list[AppSession]) -> None:
        for handle in handles:
            changes = handle.collect()
            if not changes:
                continue
            data = self.rooms.setdefault(handle.key, {})
            set_, deleted, conflicts = applied(data, changes.message())
            for key, error in conflicts:
                log.error("app_session_conflict", key=key, error=error)
            data.update(set_)
            for key in deleted:
                data.pop(key, None)
            data.setdefault(_MEMBER + handle.member, "{}")
            handle.commits += 1
            handle.committed(self._state(data))

    async def open(self, key: str, *, member: str) -> dict[str, Any]:
        return self.open_now(key, member=member)

    async def commit(self, handles: list[AppSession], *, rid: str | None) -> None:
        self.commit_now(handles)

    @staticmethod
    def _state(data: dict[str, str]) -> dict[str, Any]:
        return {"data": {k: v for k, v in data.items() if not k.startswith(RESERVED)},
                "members": sorted(k[len(_MEMBER):] for k in data if k.startswith(_MEMBER)),
                "v": 0, "primary": None, "secondary": None}


class LocalSessions:
    """The sessions of one app called in-process."""

    def __init__(self, *, max_inactive_s: float) -> None:
        self.store = LocalStore(max_inactive_s=max_inactive_s)
        self.apps = LocalAppSessions()

    def open(self, token: str | None) -> Session:
        """The session named by a cookie value (a new, empty one if it names none)."""
        record = self.store.primaries.get(token) if token else None
        if record is not None and record.expired(time.time()):
            self.store.remove(record.sid)
            record = None
        session = Session(record, create=self.store.create)
        session.app_service = self.apps
        return session

    def commit(self, session: Session) -> LocalCommit:
        """Apply the request's changes, as a tandem server's commit does (no replication)."""
        record = session.record
        store = self.store
        if record is None or store.primaries.get(record.sid) is not record:
            return LocalCommit(None)
        apps = session.app_sessions_open
        if apps:  # (first, as a server commits them)
            self.apps.commit_now(list(apps.values()))
        session.settle()
        if session.invalidated:
            store.remove(record.sid)
            return LocalCommit(None, cleared=True)
        changes = session.collect_changes()
        for error in changes.errors:
            log.error("session_value_unserializable", sid=short(record.sid), error=error)
        if changes.max_inactive_s is not None:
            record.max_inactive_s = changes.max_inactive_s
        if changes.set or changes.deleted:
            record.apply(changes.set, changes.deleted, replicated=False)
        new_id = session.regenerate_requested
        if new_id is not None:
            old, record = record, store.create(new_id)
            record.data, record.version = old.data, old.version
            record.max_inactive_s, record.created = old.max_inactive_s, old.created
            store.remove(old.sid)
            session._attach(record)
        session.reset()
        record.last_access = time.time()
        record.version = max(record.version, 1)
        return LocalCommit(record.sid)
