"""The session object an application sees for one request.

A `MutableMapping[str, value]` over the stored record, plus `id`, `invalidate()`,
`regenerate_id()` and `max_inactive_s`. Assignments are serialized at once (a value that
cannot be replicated raises TypeError there, and nothing of it is kept); values that were
read are re-serialized at the end of the request, so in-place mutation is replicated too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SessionInvalidated
from . import codec

if TYPE_CHECKING:
    from tandem.token import Route

    from .store import Primary


class SessionContext(Protocol):
    """What a session needs from the server hosting it."""

    def route_of(self, record: Primary) -> Route: ...

    def encode_url(self, url: str, record: Primary) -> str: ...

__all__ = ["Session", "Changes", "SessionContext"]

_MISSING = object()


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


class Session(MutableMapping[str, Any]):
    """One request's view of a session; changes reach the store when the handler completes."""

    __slots__ = ("_record", "_create", "_cache", "_read_as", "_set", "_deleted", "_invalidated",
                 "_regenerate", "_max_inactive_s", "_context", "__weakref__")

    def __init__(self, record: Primary | None, *, create: Callable[[], Primary],
                 context: SessionContext | None = None) -> None:
        # the stored record (None: no session yet; created lazily on first write)
        self._record = record
        self._create = create
        # per-request state
        self._cache: dict[str, Any] = {}        # key -> value handed out (in-place edits)
        self._read_as: dict[str, str] = {}      # key -> serialized form when it was read
        self._set: dict[str, str] = {}          # key -> serialized value assigned this request
        self._deleted: set[str] = set()
        self._invalidated = False
        self._regenerate = False
        self._max_inactive_s: float | None = None
        self._context = context

    # --- identity -------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (creates the session if it does not exist yet)."""
        return self._ensure().sid

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

    @property
    def invalidated(self) -> bool:
        return self._invalidated

    def regenerate_id(self) -> None:
        """Give the session a new id at the end of this request (session-fixation defence)."""
        self._check()
        self._ensure()
        self._regenerate = True

    @property
    def regenerate_requested(self) -> bool:
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
    def route(self) -> Route | None:
        """Where the session lives now: (sid, primary, secondary); None before it exists."""
        if self._context is None or self._record is None or self._invalidated:
            return None
        return self._context.route_of(self._record)

    def encode_url(self, url: str) -> str:
        """`url` with `;jsessionid=TOKEN` when this request's URLs carry the token, else `url`.

        The rule of URL rewriting (backends.serve.rewrite): not when the token came by
        cookie, yes when it came in the URL, and yes in the first response of a new session;
        only for URLs to this same site.
        """
        if self._context is None or self._record is None or self._invalidated:
            return url
        return self._context.encode_url(url, self._record)

    # --- mapping --------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._check()
        if key in self._cache:
            return self._cache[key]
        if key in self._set:
            value = codec.loads(self._set[key])
        elif key in self._deleted or self._record is None or key not in self._record.data:
            raise KeyError(key)
        else:
            # Compare against what was read, not against what is stored at commit time: a
            # concurrent request may have committed this key since, and a value we only
            # read must not overwrite it.
            serialized = self._record.data[key]
            self._read_as[key] = serialized
            value = codec.loads(serialized)
        self._cache[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._check()
        serialized = codec.dumps(key, value)  # raises TypeError before anything changes
        self._ensure()
        self._set[key] = serialized
        self._deleted.discard(key)
        self._cache[key] = value

    def __delitem__(self, key: str) -> None:
        self._check()
        if key not in self:
            raise KeyError(key)
        self._set.pop(key, None)
        self._cache.pop(key, None)
        self._deleted.add(key)

    def __contains__(self, key: object) -> bool:
        self._check()
        if key in self._set:
            return True
        if key in self._deleted or self._record is None:
            return False
        return key in self._record.data

    def _keys(self) -> list[str]:
        stored = [] if self._record is None else list(self._record.data)
        keys = [k for k in stored if k not in self._deleted]
        keys += [k for k in self._set if k not in keys]
        return keys

    def __iter__(self) -> Iterator[str]:
        self._check()
        return iter(self._keys())

    def __len__(self) -> int:
        self._check()
        return len(self._keys())

    def __repr__(self) -> str:
        if self._record is None:
            return "<Session (none yet)>"
        return f"<Session {self._record.sid[:8]}… keys={len(self)}>"

    # --- end of request -------------------------------------------------------------------

    def collect_changes(self) -> Changes:
        """Keys set, deleted, or mutated in place since the request began.

        A value mutated in place into something that cannot be serialized keeps its last
        replicable value; the reason is listed in `changes.errors` for the caller to log.
        """
        changes = Changes()
        if self._record is None:
            return changes
        stored = self._record.data
        read_as = self._read_as
        for key, value in self._cache.items():
            if key in self._deleted:
                continue
            try:
                now = codec.dumps(key, value)
            except TypeError as exc:
                changes.errors.append(str(exc))
                if key in self._set:  # the last replicable value assigned this request
                    changes.set[key] = self._set[key]
                continue
            if key in self._set or now != read_as.get(key, _MISSING):
                changes.set[key] = now
        for key, serialized in self._set.items():
            if key not in changes.set and key not in self._deleted and key not in self._cache:
                changes.set[key] = serialized
        changes.deleted = {k for k in self._deleted if k in stored}
        changes.max_inactive_s = self._max_inactive_s
        return changes

    def reset(self) -> None:
        """Forget this request's changes (the values it holds are re-read from the store)."""
        self._cache.clear()
        self._read_as.clear()
        self._set.clear()
        self._deleted.clear()
        self._max_inactive_s = None
        self._regenerate = False

    @property
    def dirty(self) -> bool:
        """Anything for a commit to look at (values handed out, set, deleted, flags)?"""
        return bool(self._cache or self._set or self._deleted or self._regenerate
                    or self._max_inactive_s is not None)

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
