"""Sessions kept in this process, for a framework's own test client (or development server)
calling an app that is not served by tandem.

A user's test suite calls its app in-process (Flask's `app.test_client()`,
`client.session_transaction()`): no tandem server, no peer, no proxy. The app's session code
must work there all the same, so the framework's glue keeps its sessions here: the same
session object and change tracking as under tandem, in one `LocalStore`, named by their
random id alone (the cookie's value), never replicated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from tandem.logs import short

from ..sessions.session import Session
from ..sessions.store import LocalStore

__all__ = ["LocalSessions", "LocalCommit"]

log = structlog.get_logger("tandem.frameworks")


@dataclass(frozen=True, slots=True)
class LocalCommit:
    token: str | None       # the cookie value the client must hold after this response
    cleared: bool = False   # the session ended: clear the client's cookie


class LocalSessions:
    """The sessions of one app called in-process."""

    def __init__(self, *, max_inactive_s: float) -> None:
        self.store = LocalStore(max_inactive_s=max_inactive_s)

    def open(self, token: str | None) -> Session:
        """The session named by a cookie value (a new, empty one if it names none)."""
        record = self.store.primaries.get(token) if token else None
        if record is not None and record.expired(time.time()):
            self.store.remove(record.sid)
            record = None
        return Session(record, create=self.store.create)

    def commit(self, session: Session) -> LocalCommit:
        """Apply the request's changes, as a tandem server's commit does (no replication)."""
        record = session.record
        store = self.store
        if record is None or store.primaries.get(record.sid) is not record:
            return LocalCommit(None)
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
