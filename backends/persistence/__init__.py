"""Persistent session stores: sessions that outlive both in-memory copies (docs/persistence.md).

`open_store(config)` builds the store `session.persistence` names — `file`, `sqlite`,
`postgresql` or `redis` — without connecting it (`await store.open()` does); the driver of
an optional store is imported only then. `Persister` (persister.py) is what the session
manager talks to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import SessionStore, State, StoredSession, mask
from .errors import StoreCorrupt, StoreError, StoreTimeout, StoreUnavailable

if TYPE_CHECKING:
    from tandem.config import Config

__all__ = [
    "SessionStore",
    "State",
    "StoredSession",
    "StoreError",
    "StoreUnavailable",
    "StoreTimeout",
    "StoreCorrupt",
    "mask",
    "open_store",
]

SQLITE_FILE = "sessions.sqlite3"   # the database file when `persistence.path` is a directory


def open_store(config: Config) -> SessionStore | None:
    """The store for `session.persistence` (None for "none"), not yet connected."""
    kind = config.session.persistence
    p = config.persistence
    if kind == "none":
        return None
    if kind == "file":
        from .file import FileStore
        return FileStore(path=p.path, durable=p.mode == "sync")
    if kind == "sqlite":
        from .sqlite import SqliteStore
        path = Path(p.path)
        if path.is_dir():
            path = path / SQLITE_FILE
        return SqliteStore(path=str(path), durable=p.mode == "sync")
    if kind == "postgresql":
        if not p.dsns:
            raise ConfigError('at least one DSN is needed with session.persistence = '
                              '"postgresql"', key="persistence.dsns", value=[],
                              file=config.source)
        _require("asyncpg", "postgresql", where=", ".join(mask(d) for d in p.dsns))
        from .postgresql import PostgresStore
        return PostgresStore(dsns=p.dsns, connect_timeout_s=p.timeout_s)
    if kind == "redis":
        _require("redis", "redis", where=", ".join(mask(u) for u in p.urls) or mask(p.url))
        from .redis import RedisStore
        return RedisStore(url=p.url, urls=p.urls, timeout_s=p.timeout_s)
    raise ConfigError("unknown store", key="session.persistence", value=kind,
                      file=config.source)


def _require(module: str, extra: str, *, where: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise StoreUnavailable(
            f"the {module} package is not installed (pip install 'tandem-proxy[{extra}]')",
            store=extra, where=where) from exc
