"""Sessions in an SQLite database file (`persistence.path`): the embedded store for one host.

The stdlib `sqlite3` module runs in one worker thread that owns the connection. WAL mode
lets the servers of one host share the file (readers never block the writer);
`busy_timeout` makes a server wait for another's write instead of failing. In `sync` mode
every transaction is fsynced (`synchronous = FULL`); in `batched` mode `NORMAL` (a power
loss may roll back the last transactions, a process crash does not).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .base import StoredSession, map_errors
from .errors import StoreUnavailable

__all__ = ["SqliteStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tandem_sessions (
    sid            TEXT PRIMARY KEY,
    version        INTEGER NOT NULL,
    body           TEXT NOT NULL,
    last_access    REAL NOT NULL,
    max_inactive_s REAL NOT NULL,
    expires_at     REAL NOT NULL,
    epoch          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tandem_sessions_expires_at ON tandem_sessions (expires_at);
"""

_UPSERT = """
INSERT INTO tandem_sessions
    (sid, version, body, last_access, max_inactive_s, epoch, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (sid) DO UPDATE SET
    version = excluded.version,
    epoch = excluded.epoch,
    body = excluded.body,
    last_access = max(last_access, excluded.last_access),
    max_inactive_s = excluded.max_inactive_s,
    expires_at = max(last_access, excluded.last_access) + excluded.max_inactive_s
WHERE (epoch, version) <= (excluded.epoch, excluded.version)
"""

_TOUCH = """
UPDATE tandem_sessions SET last_access = ?2, expires_at = ?2 + max_inactive_s
WHERE sid = ?1 AND last_access < ?2
"""


class SqliteStore:
    """`session.persistence = "sqlite"`."""

    kind = "sqlite"

    def __init__(self, *, path: str, durable: bool = True, busy_timeout_s: float = 5.0) -> None:
        # configuration
        self.path = Path(path)
        self.where = str(self.path)
        self._synchronous = "FULL" if durable else "NORMAL"
        self._busy_timeout_s = busy_timeout_s
        # resources: one thread owns the connection
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-sqlite")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open(self) -> None:
        with map_errors(self.kind, self.where, unavailable=(sqlite3.Error, OSError)):
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                 isolation_level=None, check_same_thread=True)
            try:
                # Servers starting together set up the same file: switching it to WAL can
                # fail at once with "database is locked" (the busy handler does not cover
                # that), so the set-up is retried within the busy timeout.
                deadline = time.monotonic() + self._busy_timeout_s
                while True:
                    try:
                        db.execute("PRAGMA journal_mode = WAL")
                        db.execute(f"PRAGMA synchronous = {self._synchronous}")
                        db.executescript(_SCHEMA)
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            except BaseException:
                db.close()
                raise
            self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- operations ---------------------------------------------------------------------

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        def q(db: sqlite3.Connection) -> StoredSession | None:
            row = db.execute(
                "SELECT sid, version, body, last_access, max_inactive_s, epoch"
                " FROM tandem_sessions WHERE sid = ? AND expires_at >= ?", (sid, now)).fetchone()
            return None if row is None else StoredSession(*row)
        return await self._run_db(q)

    async def save(self, rows: Sequence[StoredSession]) -> None:
        params = [(*r, r.expires_at) for r in sorted(rows)]
        await self._run_db(lambda db: self._tx(db, _UPSERT, params))

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        params = sorted((sid, last_access) for sid, (last_access, _) in items.items())
        await self._run_db(lambda db: self._tx(db, _TOUCH, params))

    async def delete(self, sids: Collection[str]) -> None:
        params = [(sid,) for sid in sorted(sids)]
        await self._run_db(lambda db: self._tx(
            db, "DELETE FROM tandem_sessions WHERE sid = ?", params))

    async def sweep(self, *, now: float) -> int:
        def q(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM tandem_sessions WHERE expires_at < ?",
                              (now,)).rowcount
        return await self._run_db(q)

    # --- helpers ------------------------------------------------------------------------

    @staticmethod
    def _tx(db: sqlite3.Connection, sql: str, params: Sequence[tuple[object, ...]]) -> None:
        if not params:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def _run_db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise StoreUnavailable("not open", store=self.kind, where=self.where)
            with map_errors(self.kind, self.where, unavailable=(sqlite3.OperationalError,),
                            other=(sqlite3.Error,)):
                return fn(self._db)
        return await self._run(call)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreUnavailable("not open", store=self.kind, where=self.where)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
