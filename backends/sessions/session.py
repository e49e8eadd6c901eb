"""The session an application sees for one request: a `dict`, as Starlette's is.

Its values are decoded from the stored record when the request begins, so it is a real
`dict` to everything that reads one (`json.dumps`, `JSONResponse({"session": session})`,
`dict(session)`, `{**session}`), and every dict operation works (`|=`, `popitem()` LIFO,
`setdefault`, `update`, `copy`). Writes go through its own methods: each assignment is
serialized at once (a value that cannot be replicated raises TypeError there, and nothing
of it is kept), and values handed out that can change in place (lists, dicts...) are
serialized again at the end of the request, so in-place mutation is replicated too.

Besides the mapping: `id`, `new`, `invalidate()`, `regenerate_id()`, `max_inactive_s`,
`route`, `encode_url(url)`, and Starlette's `accessed` / `modified` flags. A session this
request emptied (`clear()`, or deleting its last key) ends when the request commits, as
Starlette, Flask and Django end theirs: both copies are removed and the client's token is
cleared.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from tandem.token import Route, new_sid

from ..errors import SessionError, SessionInvalidated, SessionTooLarge
from . import codec
from .app_session import AppService, AppSession, member_id

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

    from tandem.config import SessionSection

    from .store import Primary


class SessionContext(Protocol):
    """What a session needs from the server hosting it."""

    def route_of(self, record: Primary) -> Route: ...

    def encode_url(self, url: str, route: Route) -> str: ...

    # (optional) cluster_settings: SessionSection — the cluster file's [session] section
    # (optional) app_sessions: AppService — the server's application sessions


class SessionCookie(Protocol):
    """How a framework writes the token cookie (its own settings); None: the cluster file's.

    Both return a whole `Set-Cookie` value; `secure` is the cluster file's `cookie_secure`,
    which a framework's settings cannot turn off."""

    def set(self, name: str, token: str, *, secure: bool) -> bytes: ...

    def clear(self, name: str, *, secure: bool) -> bytes: ...


__all__ = ["Session", "Changes", "SessionContext", "SessionCookie"]

_MISSING: Any = object()
# values of these exact types cannot change in place: no need to serialize them again
_SCALARS = frozenset({str, int, float, bool, type(None)})


_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # one JSON value, in C
# What codec.dumps gives for a value of these exact types, without the JSON encoder's setup
# per call (~0.9 µs): an int's repr, a str quoted as ensure_ascii=False quotes it.
_encode_str = json.encoder.encode_basestring
_DIRECT: dict[type, Callable[[Any], str]] = {int: int.__repr__, str: _encode_str}


class Changes:
    """What one request did to its session: keys set (serialized) and keys deleted."""

    __slots__ = ("set", "deleted", "max_inactive_s", "errors")

    def __init__(self) -> None:
        self.set: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.max_inactive_s: float | None = None
        # values mutated in place into something that cannot be replicated: kept as before
        self.errors: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.set or self.deleted or self.max_inactive_s is not None)


class Session(dict[str, Any]):
    """One request's session; changes reach the store when the response head is sent."""

    __slots__ = ("_record", "_create", "_context", "_stored", "_set", "_deleted", "_handed",
                 "_invalidated", "_regenerate", "_max_inactive_s", "accessed", "modified",
                 "cookie", "cookie_refresh", "app_service", "_apps", "_limit", "_bytes",
                 "__weakref__")

    def __init__(self, record: Primary | None, *, create: Callable[[], Primary],
                 context: SessionContext | None = None) -> None:
        # (no dict.__init__: the dict is empty until the values are decoded below)
        # the stored record (None: no session yet; created lazily on first write)
        self._record = record
        self._create = create
        self._context = context
        # per request: the serialized form of each value when it was loaded (what a value
        # only read is compared with: a concurrent request may have committed that key
        # since, and a value we did not change must not overwrite it)
        if record is not None and record.data:
            self._stored = stored = record.data.copy()
            for key, serialized in stored.items():
                try:
                    value, end = _scan(serialized, 0)  # (C: no json.loads setup per value)
                except StopIteration:
                    end = -1
                if end != len(serialized):  # not one compact JSON value: the strict parser
                    value = codec.loads(serialized)
                dict.__setitem__(self, key, value)
        else:
            self._stored = {}
        self._set: dict[str, str] = {}     # key -> serialized value assigned this request
        self._deleted: set[str] = set()
        self._handed: set[str] = set()     # keys whose (mutable) values were handed out
        self._invalidated = False
        self._regenerate: str | None = None  # the new id regenerate_id() gave
        self._max_inactive_s: float | None = None
        # Starlette's flags: read or written / written (Vary: Cookie; an emptied session)
        self.accessed = False
        self.modified = False
        # set by a framework's glue: how to write the token cookie, and whether to send it
        # again although the token did not change (Flask's permanent sessions, Starlette's
        # Max-Age refreshed by each write)
        self.cookie: SessionCookie | None = None
        self.cookie_refresh = False
        # where its application sessions are (None: the context's, a server's); set by a
        # framework's glue for sessions kept in its process (backends.frameworks.local)
        self.app_service: AppService | None = None
        # the application sessions this request opened: key -> handle (None: none yet)
        self._apps: dict[str, AppSession] | None = None
        # session.max_session_bytes (0: unbounded), and what the session holds in bytes
        # (keys + serialized values; counted at the first assignment, then kept up to date)
        settings = getattr(context, "cluster_settings", None)
        self._limit: int = settings.max_session_bytes if settings is not None else 0
        self._bytes: int | None = None

    # --- identity -------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (creates the session if it does not exist yet); after
        `regenerate_id()`, the new one."""
        record = self._ensure()
        return self._regenerate or record.sid

    @property
    def new(self) -> bool:
        """True when this request created the session."""
        return self._record is None or self._record.version == 0

    @property
    def record(self) -> Primary | None:
        return self._record

    def invalidate(self) -> None:
        """End the session: both copies are removed and the client's token is cleared."""
        self._check()
        self._invalidated = True
        dict.clear(self)

    @property
    def invalidated(self) -> bool:
        return self._invalidated

    def settle(self) -> None:
        """Just before a commit: a session this request emptied ends (as Starlette, Flask
        and Django end theirs), unless the request failed (see `discard`)."""
        if self.modified and self._record is not None and not dict.__len__(self):
            self._invalidated = True

    def regenerate_id(self) -> None:
        """Give the session a new id (session-fixation defence). The id is chosen now —
        `id`, `route` and `encode_url` name it from here on — and the session moves to it
        when the request commits; the old id ends then."""
        self._check()
        self._ensure()
        self._regenerate = new_sid()

    @property
    def regenerate_requested(self) -> str | None:
        """The new id `regenerate_id()` chose (None: none asked for)."""
        return self._regenerate

    @property
    def max_inactive_s(self) -> float:
        self._check()
        if self._max_inactive_s is not None:
            return self._max_inactive_s
        return self._ensure().max_inactive_s

    @max_inactive_s.setter
    def max_inactive_s(self, seconds: float) -> None:
        self._check()
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"max_inactive_s must be a positive number, got {seconds!r}")
        self._ensure()
        self._max_inactive_s = float(seconds)

    @property
    def cluster_settings(self) -> SessionSection | None:
        """The cluster file's `[session]` section (None outside a tandem server)."""
        return getattr(self._context, "cluster_settings", None)

    @property
    def default_max_inactive_s(self) -> float | None:
        """The cluster file's session lifetime (None outside a tandem server)."""
        settings = self.cluster_settings
        return None if settings is None else settings.max_inactive_s

    @property
    def route(self) -> Route | None:
        """Where the session lives now: (sid, primary, secondary); None before it exists."""
        if self._context is None or self._record is None or self._invalidated:
            return None
        route = self._context.route_of(self._record)
        if self._regenerate is not None:  # (its secondary stays: see Committer._regenerate)
            route = Route(self._regenerate, route.primary, route.secondary)
        return route

    def encode_url(self, url: str) -> str:
        """`url` with `;jsessionid=TOKEN` when this request's URLs carry the token, else `url`.

        The rule of URL rewriting (backends.serve.rewrite): not when the token came by
        cookie, yes when it came in the URL, and yes in the first response of a new session;
        only for URLs to this same site.
        """
        route = self.route
        if route is None or self._context is None:
            return url
        return self._context.encode_url(url, route)

    # --- application sessions -------------------------------------------------------------

    def app_session(self, key: str) -> AppSession:
        """The application session named `key` (a room, a shared cart, a call): a mapping
        shared by every session that names the same key, this one a member of it; its
        writes are committed with this session's (docs/app-sessions.md). In an async
        handler: `room = await session.app_session(key)`."""
        self._check()
        if key.__class__ is not str:
            raise TypeError(f"an application session's key is a str, not {type(key).__name__}")
        if not key:
            raise ValueError("an application session's key may not be empty")
        apps = self._apps
        if apps is None:
            apps = self._apps = {}
        handle = apps.get(key)
        if handle is None:
            service = self.app_service or getattr(self._context, "app_sessions", None)
            if service is None:
                raise SessionError("application sessions need a tandem server, or a "
                                   "framework's glue that keeps them in this process")
            record = self._ensure()  # a member is a session: it exists from now on
            handle = apps[key] = AppSession(key, member=member_id(record.sid),
                                            service=service, check=self._check)
        self.accessed = True
        return handle

    @property
    def app_sessions_open(self) -> dict[str, AppSession] | None:
        """The application sessions this request opened (None: none)."""
        return self._apps

    # --- Starlette's session API ----------------------------------------------------------

    def mark_accessed(self) -> None:
        self.accessed = True

    def mark_modified(self) -> None:
        self.accessed = self.modified = True

    # --- reads ----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if self._invalidated:
            self._check()
        self.accessed = True
        value = dict.__getitem__(self, key)
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if self._invalidated:  # (the reads and writes of every request: no call to _check)
            self._check()
        self.accessed = True
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        return value

    def __contains__(self, key: object) -> bool:
        self._check()
        self.accessed = True
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._check()
        self.accessed = True
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._check()
        self.accessed = True
        return dict.__len__(self)

    def keys(self) -> dict_keys[str, Any]:
        self._check()
        self.accessed = True
        return dict.keys(self)

    def values(self) -> dict_values[str, Any]:
        self._hand_out_all()
        return dict.values(self)

    def items(self) -> dict_items[str, Any]:
        self._hand_out_all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self._hand_out_all()
        return dict.copy(self)

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        self._hand_out_all()
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        self._hand_out_all()
        return dict.__ror__(self, other)

    # --- writes ---------------------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        if self._invalidated:
            self._check()
        direct = _DIRECT.get(value.__class__) if key.__class__ is str else None
        try:
            serialized = direct(value) if direct is not None else codec.dumps(key, value)
        except ValueError:  # an int past Python's digit limit: codec.dumps says TypeError
            serialized = codec.dumps(key, value)  # (before anything changes)
        if self._limit:
            self._fits({key: serialized})  # SessionTooLarge: nothing changes
        self._ensure()
        self._set[key] = serialized
        self._deleted.discard(key)
        self.accessed = self.modified = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._check()
        dict.__delitem__(self, key)
        self._deleted_now(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def pop(self, key: str, *default: Any) -> Any:
        self._check()
        if not dict.__contains__(self, key):  # (neither accessed nor modified: Starlette's)
            return dict.pop(self, key, *default)  # the default, or KeyError
        self.accessed = True
        value = dict.pop(self, key)
        self._deleted_now(key)
        return value

    def popitem(self) -> tuple[str, Any]:
        self._check()
        key, value = dict.popitem(self)  # the newest key first, KeyError when empty
        self._deleted_now(key)
        return key, value

    def clear(self) -> None:
        self._check()
        for key in dict.keys(self):
            self._set.pop(key, None)
            self._deleted.add(key)
        dict.clear(self)
        self._handed.clear()
        self._bytes = None
        self.accessed = self.modified = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._check()
        values = dict(*args, **kwargs)
        serialized = {k: codec.dumps(k, v) for k, v in values.items()}  # all or nothing
        if serialized and self._limit:
            self._fits(serialized)  # SessionTooLarge: nothing changes
        if serialized:
            self._ensure()
            self._set.update(serialized)
            self._deleted.difference_update(serialized)
            dict.update(self, values)
        self.accessed = self.modified = True

    def __ior__(self, other: Any) -> Session:  # type: ignore[override]
        self.update(other)
        return self

    # --- end of request -------------------------------------------------------------------

    def collect_changes(self) -> Changes:
        """Keys set, deleted, or mutated in place since the request began.

        A value mutated in place into something that cannot be serialized keeps its last
        replicable value; the reason is listed in `changes.errors` for the caller to log.
        """
        changes = Changes()
        record = self._record
        if record is None:
            return changes
        assigned, stored = self._set, self._stored
        # (assigned keys in the order of assignment: new keys reach the record in that
        # order, which popitem() follows)
        handed = self._handed
        keys = [*assigned, *(handed - assigned.keys())] if handed else assigned
        for key in keys:
            value = dict.get(self, key, _MISSING)
            if value is _MISSING:
                continue  # deleted since
            before = assigned.get(key)
            if before is not None and value.__class__ in _SCALARS:
                changes.set[key] = before
                continue
            try:
                now = codec.dumps(key, value)
            except TypeError as exc:
                changes.errors.append(str(exc))
                if before is not None:  # the last replicable value assigned this request
                    changes.set[key] = before
                continue
            if before is not None or now != stored.get(key, _MISSING):
                changes.set[key] = now
        if self._limit and handed:
            self._bound_mutations(changes, record.data)
        if self._deleted:
            changes.deleted = {k for k in self._deleted if k in record.data}
        changes.max_inactive_s = self._max_inactive_s
        return changes

    def _bound_mutations(self, changes: Changes, data: dict[str, str]) -> None:
        """Values mutated in place past `session.max_session_bytes`: their last value is
        kept, and the reason listed in `changes.errors` (no assignment to raise at)."""
        final = {**data, **changes.set}
        for key in changes.deleted:
            final.pop(key, None)
        size = sum(_entry_bytes(k, v) for k, v in final.items())
        assigned = self._set
        for key in [k for k, v in changes.set.items() if v != assigned.get(k)]:
            if size <= self._limit:
                break
            over, now = size, changes.set.pop(key)
            before = assigned.get(key)  # the value assigned this request, else the stored one
            if before is not None:
                changes.set[key] = before
            size -= _entry_bytes(key, now) - _entry_bytes(key, before or data.get(key))
            changes.errors.append(str(SessionTooLarge(key, size=over, limit=self._limit)))

    def reset(self) -> None:
        """Forget this request's changes: what is stored now is what later changes are
        compared with (after a commit, or to drop them)."""
        record = self._record
        if record is not None:  # (the other keys keep the form they were read in)
            stored, data = self._stored, record.data
            for keys in (self._set, self._deleted, self._handed):
                for key in keys:
                    if key in data:
                        stored[key] = data[key]
                    else:
                        stored.pop(key, None)
        self._set.clear()
        self._deleted.clear()
        self._handed.clear()
        self._max_inactive_s = None
        self._regenerate = None
        self.modified = False

    def discard(self) -> None:
        """Drop everything this request asked for, an invalidation included (its response
        is a server error: nothing of it is committed)."""
        self.reset()
        self._invalidated = False
        self.cookie_refresh = False

    @property
    def dirty(self) -> bool:
        """Anything for a commit to look at (values handed out, set, deleted, flags)?"""
        return bool(self._handed or self._set or self._deleted or self._max_inactive_s is not None
                    or self._regenerate is not None
                    or (self._apps and any(h.dirty for h in self._apps.values())))

    # --- internals ------------------------------------------------------------------------

    def _check(self) -> None:
        if self._invalidated:
            raise SessionInvalidated("this session was invalidated earlier in the request")

    def _ensure(self) -> Primary:
        if self._record is None:
            self._record = self._create()
        return self._record

    def _attach(self, record: Primary) -> None:
        self._record = record

    def _deleted_now(self, key: str) -> None:
        if self._bytes is not None:  # (the key is gone from the dict already)
            self._bytes -= _entry_bytes(key, self._set.get(key) or self._stored.get(key))
        self._set.pop(key, None)
        self._handed.discard(key)
        self._deleted.add(key)
        self.accessed = self.modified = True

    def _serialized(self, key: str) -> str | None:
        """The serialized form the session holds for `key` (None: absent)."""
        serialized = self._set.get(key)
        if serialized is None and dict.__contains__(self, key):
            serialized = self._stored.get(key)
        return serialized

    def _fits(self, serialized: dict[str, str]) -> None:
        """Raise SessionTooLarge (naming the key and the sizes) if assigning these would
        make the session hold more than `session.max_session_bytes`; else count them."""
        if self._bytes is None:
            self._bytes = sum(_entry_bytes(k, self._serialized(k)) for k in dict.keys(self))
        size = self._bytes
        for key, value in serialized.items():
            size += _entry_bytes(key, value) - _entry_bytes(key, self._serialized(key))
            if size > self._limit:
                raise SessionTooLarge(key, size=size, limit=self._limit)
        self._bytes = size

    def _hand_out_all(self) -> None:
        self._check()
        self.accessed = True
        handed = self._handed
        for key, value in dict.items(self):
            if value.__class__ not in _SCALARS:
                handed.add(key)


def _entry_bytes(key: str, serialized: str | None) -> int:
    """What one key holds: its name and its serialized value, in UTF-8 bytes (0: absent)."""
    if serialized is None:
        return 0
    return ((len(key) if key.isascii() else len(key.encode()))
            + (len(serialized) if serialized.isascii() else len(serialized.encode())))
