"""The application session a request sees: a mapping shared by every session naming its key.

`session.app_session(key)` gives this handle at once, without network work. Its values are
read from the application session's primary the first time they are needed: in an async
handler with `room = await session.app_session(key)`, in a sync one (a WSGI app, a thread)
on first use, the thread waiting for the read. Writes are kept in the handle, checked at the
assignment (JSON values only, as for sessions: a value that cannot be replicated raises
TypeError naming the key) and committed with the request's session, key by key, at the
application session's primary: last writer wins per key; `incr` and `append` are applied
there on the current value, so that concurrent writers lose nothing (docs/app-sessions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Generator, Iterator, MutableMapping
from typing import Any, Protocol

from ..errors import SessionError
from . import codec

__all__ = ["AppSession", "AppService", "AppChanges", "member_id", "applied", "RESERVED"]

# Keys of an application session's record that are not the application's (its members).
RESERVED = "\x00"
_MISSING: Any = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})


def member_id(sid: str) -> str:
    """How an application session names a member session: not its id (a credential's part)."""
    return hashlib.sha256(sid.encode()).hexdigest()[:16]


class AppService(Protocol):
    """What a handle needs from its server (backends.sessions.app_sessions.AppSessions)."""

    loop: asyncio.AbstractEventLoop | None

    async def open(self, key: str, *, member: str) -> dict[str, Any]: ...

    async def commit(self, handles: list[AppSession], *, rid: str | None) -> None: ...


class AppChanges:
    """One request's writes to one application session, each key in one kind of change."""

    __slots__ = ("set", "deleted", "incr", "append", "keep")

    def __init__(self) -> None:
        self.set: dict[str, str] = {}             # key -> serialized value
        self.deleted: set[str] = set()
        self.incr: dict[str, int | float] = {}    # key -> amount added at the primary
        self.append: dict[str, list[str]] = {}    # key -> serialized items added at the end
        self.keep: dict[str, int] = {}            # key -> items the list keeps (the last)

    def __bool__(self) -> bool:
        return bool(self.set or self.deleted or self.incr or self.append)

    def message(self) -> dict[str, Any]:
        return {"set": self.set, "del": sorted(self.deleted), "incr": self.incr,
                "append": self.append, "keep": self.keep}


class AppSession(MutableMapping[str, Any]):
    """One request's view of an application session (a room, a cart, a call)."""

    def __init__(self, key: str, *, member: str, service: AppService,
                 check: Callable[[], None]) -> None:
        # what it is, and whose
        self.key = key
        self.member = member          # this session's member id
        self._service = service
        self._check_session = check   # the member session's own check (invalidated?)
        # loaded from the primary (None: not yet)
        self._values: dict[str, Any] | None = None
        self._stored: dict[str, str] = {}
        self._members: list[str] = []
        self._where: tuple[str | None, str | None] = (None, None)
        self.version = 0
        self.commits = 0              # commits of this request's made so far
        # this request's writes, and the values handed out (mutable: compared at commit)
        self.changes = AppChanges()
        self._handed: set[str] = set()
        # a value's serialized form after this request's incr/append (what a value handed
        # out is compared with: only a change in place beyond them is a write of it)
        self._baseline: dict[str, str] = {}

    # --- loading --------------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, AppSession]:
        return self.load().__await__()

    async def load(self) -> AppSession:
        """Read the values from the primary (joining and touching the application session)."""
        if self._values is None:
            self.loaded(await self._service.open(self.key, member=self.member))
        return self

    async def refresh(self) -> AppSession:
        """Read the values again from the primary (this request's writes stay on top):
        what the others wrote since, in a websocket or a long response."""
        self._check_session()
        self.collect()  # values changed in place: writes of this request's, kept on top
        self._handed.clear()
        self.loaded(await self._service.open(self.key, member=self.member))
        return self

    async def save(self) -> AppSession:
        """Commit this request's writes now, at the primary (else they are committed with
        the session's, when the response head is ready): in a websocket, each message's."""
        self._check_session()
        await self._service.commit([self], rid=None)
        if self._values is None:
            await self.load()
        return self

    def loaded(self, state: dict[str, Any]) -> None:
        """Take the primary's state, with this request's own writes on top of it."""
        self._stored = dict(state["data"])
        self._members = list(state.get("members", ()))
        self._where = (state.get("primary"), state.get("secondary"))
        self.version = int(state.get("v", 0))
        values = {k: codec.loads(v) for k, v in self._stored.items()}
        c = self.changes
        for k in c.deleted:
            values.pop(k, None)
        for k, v in c.set.items():
            values[k] = codec.loads(v)
        # (a value another request made something else meanwhile is shown as it is: the
        # primary will not apply the increment or append to it either, and logs why)
        for k, n in c.incr.items():
            with contextlib.suppress(TypeError):
                values[k] = _number(k, values.get(k, 0)) + n
        for k, items in c.append.items():
            with contextlib.suppress(TypeError):
                values[k] = _kept([*_list(k, values.get(k, [])),
                                   *(codec.loads(i) for i in items)], c.keep.get(k))
        for k in (*c.incr, *c.append):
            if k in values:
                self._baseline[k] = codec.dumps(k, values[k])
        self._values = values

    def _data(self) -> dict[str, Any]:
        self._check_session()
        if self._values is None:
            self._load_blocking()
        assert self._values is not None
        return self._values

    def _load_blocking(self) -> None:
        open_now = getattr(self._service, "open_now", None)
        if open_now is not None:  # kept in this process (a framework's test client)
            self.loaded(open_now(self.key, member=self.member))
            return
        loop = self._service.loop
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # a worker thread (WSGI, a sync view): it may wait for the read
        else:
            raise SessionError(f"application session {self.key!r} is not loaded: in an async "
                               f"handler write `room = await session.app_session(key)`")
        if loop is None:
            raise SessionError("application sessions need a running tandem server")
        asyncio.run_coroutine_threadsafe(self.load(), loop).result()

    # --- what it is -------------------------------------------------------------------------

    @property
    def members(self) -> list[str]:
        """The member ids of the sessions that refer to it (this one's: `member`)."""
        self._data()
        return list(self._members)

    @property
    def primary(self) -> str | None:
        """The server holding it when it was read or last committed (None: not yet)."""
        return self._where[0]

    @property
    def secondary(self) -> str | None:
        return self._where[1]

    # --- the mapping ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        value = self._data()[key]
        if value.__class__ not in _SCALARS:
            self._handed.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data()))

    def __len__(self) -> int:
        return len(self._data())

    def __contains__(self, key: object) -> bool:
        return key in self._data()

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_session()
        serialized = _dumps(key, value)  # TypeError here, before anything changes
        c = self.changes
        c.deleted.discard(key)
        c.incr.pop(key, None)
        c.append.pop(key, None)
        c.keep.pop(key, None)
        c.set[key] = serialized
        if self._values is not None:
            self._values[key] = value

    def __delitem__(self, key: str) -> None:
        values = self._data()
        if key not in values:
            raise KeyError(key)
        del values[key]
        c = self.changes
        for kind in (c.set, c.incr, c.append, c.keep):
            kind.pop(key, None)
        c.deleted.add(key)
        self._handed.discard(key)

    def __repr__(self) -> str:
        return f"<AppSession {self.key!r} {self._values!r}>"

    # --- the atomic helpers -----------------------------------------------------------------

    def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Add `amount` to the number at `key` (0 if absent) at the primary, whatever other
        requests add meanwhile; returns the value as this request sees it."""
        values = self._data()  # (the value it returns is read: loaded first)
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"app_session[{key!r}].incr: amount must be a number, "
                            f"not {type(amount).__name__}")
        _dumps(key, amount)
        c = self.changes
        value = _number(key, values.get(key, 0)) + amount
        if key in c.set:  # set in this request: the increment applies to that value
            c.set[key] = _dumps(key, value)
        else:
            c.deleted.discard(key)
            c.incr[key] = c.incr.get(key, 0) + amount
        values[key] = value
        self._baseline[key] = _dumps(key, value)  # (not a change in place: an increment)
        return value

    def append(self, key: str, item: Any, *, keep: int | None = None) -> None:
        """Add `item` at the end of the list at `key` (a new list if absent) at the primary:
        concurrent appends all land, each once. `keep`: the list keeps its last `keep`
        items there (a chat's recent messages), the older ones go."""
        self._check_session()
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)
                                 or keep < 1):
            raise ValueError(f"app_session[{key!r}].append: keep must be a positive int, "
                             f"not {keep!r}")
        serialized = _dumps(key, item)
        c = self.changes
        if key in c.set:
            c.set[key] = _dumps(key, _kept([*_list(key, codec.loads(c.set[key])), item], keep))
        else:
            c.deleted.discard(key)
            c.append.setdefault(key, []).append(serialized)
            if keep is not None:
                c.keep[key] = keep
        if self._values is not None:
            value = self._values[key] = _kept(
                [*_list(key, self._values.get(key, [])), item], keep)
            self._baseline[key] = _dumps(key, value)  # (not a change in place: an append)

    # --- end of request ---------------------------------------------------------------------

    def collect(self) -> AppChanges:
        """This request's writes, with the values handed out and changed in place."""
        if self._values is not None:
            c = self.changes
            for key in self._handed:
                if key in c.set or key in c.deleted or key not in self._values:
                    continue
                now = _dumps(key, self._values[key])
                if now != self._baseline.get(key, self._stored.get(key)):
                    c.incr.pop(key, None)
                    c.append.pop(key, None)
                    c.keep.pop(key, None)
                    c.set[key] = now
        return self.changes

    def committed(self, state: dict[str, Any]) -> None:
        """The primary applied them: its state is what later reads and writes start from."""
        self.changes = AppChanges()
        self._handed.clear()
        self._baseline.clear()
        self.loaded(state)

    @property
    def dirty(self) -> bool:
        return bool(self.changes or self._handed)


def applied(data: dict[str, str], msg: dict[str, Any]) -> tuple[
        dict[str, str], set[str], list[tuple[str, str]]]:
    """A commit's writes (`AppChanges.message()`) as changes of the stored values `data`:
    sets and deletions as sent, increments and appends applied to the values held now
    (the concurrency rule: docs/app-sessions.md); with the writes that could not apply."""
    set_ = {k: v for k, v in msg["set"].items() if not k.startswith(RESERVED)}
    deleted = {k for k in msg["del"] if not k.startswith(RESERVED) and k in data}
    conflicts: list[tuple[str, str]] = []
    for key, amount in msg["incr"].items():
        current = codec.loads(data[key]) if key in data else 0
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            conflicts.append((key, "incr of a value that is not a number: not applied"))
            continue
        set_[key] = codec.dumps(key, current + amount)
    keep = msg.get("keep", {})
    for key, items in msg["append"].items():
        current = codec.loads(data[key]) if key in data else []
        if not isinstance(current, list):
            conflicts.append((key, "append to a value that is not a list: not applied"))
            continue
        n = keep.get(key)
        set_[key] = codec.dumps(key, _kept([*current, *map(codec.loads, items)],
                                           n if isinstance(n, int) and n > 0 else None))
    return set_, deleted, conflicts


def _dumps(key: str, value: Any) -> str:
    if key.__class__ is not str:
        raise TypeError(f"application session keys must be str, not {type(key).__name__}")
    if key.startswith(RESERVED):
        raise ValueError(f"application session keys may not start with {RESERVED!r}")
    try:
        return codec.dumps(key, value)
    except TypeError as exc:  # the session's rule, named for what was written
        raise TypeError(f"app_{exc}") from None


def _number(key: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"app_session[{key!r}] is {type(value).__name__}, not a number")
    return value


def _list(key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"app_session[{key!r}] is {type(value).__name__}, not a list")
    return value


def _kept(items: list[Any], keep: int | None) -> list[Any]:
    return items if keep is None or len(items) <= keep else items[-keep:]
