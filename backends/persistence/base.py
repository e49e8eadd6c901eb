"""The `SessionStore` seam: what every persistent store implements, and what they share.

A store keeps one row per session: the full state (as `Primary.state()` gives it), keyed
by SID, with its version and an expiry time (`last_access + max_inactive_s`). Rows are
encoded on the event loop (`StoredSession.of`) so a store running in a thread never sees a
dict the application is still changing.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import StoreCorrupt, StoreError, StoreUnavailable

__all__ = ["SessionStore", "StoredSession", "State", "mask", "map_errors"]

State = dict[str, Any]   # {"sid", "v", "data": {key: JSON text}, "max_inactive_s", ...}


class StoredSession(NamedTuple):
    """One session as a store writes it: indexed columns plus an opaque JSON body."""

    sid: str
    version: int
    body: str                # JSON: {"data": {...}, "created": ...}
    last_access: float       # seconds since the epoch
    max_inactive_s: float
    epoch: int = 0           # bumped by every change of primary: an older epoch is stale

    @property
    def age(self) -> tuple[int, int]:
        """Which of two copies is newer: the higher epoch, then the higher version."""
        return self.epoch, self.version

    @property
    def expires_at(self) -> float:
        return self.last_access + self.max_inactive_s

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> StoredSession:
        body = json.dumps({"data": state["data"], "created": state["created"]},
                          separators=(",", ":"))
        return cls(str(state["sid"]), int(state["v"]), body, float(state["last_access"]),
                   float(state["max_inactive_s"]), int(state.get("e", 0)))

    def state(self, *, store: str, where: str) -> State:
        """Back to the replication-channel shape (`Primary.state()`)."""
        try:
            body = json.loads(self.body)
            data, created = body["data"], float(body["created"])
            if not isinstance(data, dict):
                raise TypeError("data is not an object")
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreCorrupt(f"session {self.sid[:8]} cannot be decoded: {exc}",
                               store=store, where=where) from exc
        return {"sid": self.sid, "v": self.version, "e": self.epoch, "data": data,
                "max_inactive_s": self.max_inactive_s, "created": created,
                "last_access": self.last_access}


@runtime_checkable
class SessionStore(Protocol):
    """A persistent home for sessions that outlives both in-memory copies."""

    kind: str    # "file" | "sqlite" | "postgresql" | "redis"
    where: str   # what it is connected to, safe to log (passwords masked)

    async def open(self) -> None:
        """Connect and create what is missing; raise StoreUnavailable naming the cause."""

    async def close(self) -> None:
        """Release connections, threads and files."""

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        """The stored session, or None when it is absent or expired at `now`."""

    async def save(self, rows: Sequence[StoredSession]) -> None:
        """Insert or replace; a row never replaces a newer stored row (`StoredSession.age`)."""

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        """Move last access (sid -> (last_access, max_inactive_s)) forward, nothing else."""

    async def delete(self, sids: Collection[str]) -> None:
        """Remove these sessions (invalidated or expired); absent ones are ignored."""

    async def sweep(self, *, now: float) -> int:
        """Remove every session expired at `now`; return how many were removed."""


# --- shared helpers --------------------------------------------------------------------------

_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_SECRET_PARAMS = {"password", "pass", "passwd", "sslpassword"}


def mask(dsn: str) -> str:
    """A DSN or URL fit for logs and errors: any password replaced by `***`."""
    if "://" not in dsn:  # libpq keyword form: host=... password=...
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v)
                               for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable DSN>"


@contextlib.contextmanager
def map_errors(kind: str, where: str, *, unavailable: tuple[type[BaseException], ...],
               other: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Translate a driver's exceptions into StoreUnavailable / StoreError, once."""
    try:
        yield
    except StoreError:
        raise
    except unavailable as exc:
        raise StoreUnavailable(_describe(exc), store=kind, where=where) from exc
    except other as exc:
        raise StoreError(_describe(exc), store=kind, where=where) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"
