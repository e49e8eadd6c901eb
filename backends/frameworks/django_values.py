"""What a Django session value is: `SESSION_SERIALIZER` decides, tandem stores the result.

Django serializes the whole session dictionary at `save()` (so an unserializable value fails
at the end of the request); tandem's values are checked one by one at assignment, where the
error can name the key. Both rules hold here: the serializer of the project is asked at
assignment (TypeError naming the key), and what comes back in a later request is what
Django's own engines would give back — the serializer's round trip.

The replicated form of a value:
- with Django's JSON serializer (the default): the value itself, as JSON — the form every
  tandem session value has, readable by any app of the cluster. (Tuples come back as lists,
  as with Django's own engines; NaN and infinities are refused: tandem's JSON is strict.)
- with any other serializer: `{"$django": BASE64}`, the serializer's bytes for `{key: value}`,
  turned back into the value by the same serializer.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Django ships no type information (django-stubs is a separate project)
from django.contrib.sessions.serializers import (  # type: ignore[import-untyped]
    JSONSerializer as _SessionsJSON,
)
from django.core.signing import JSONSerializer as _SigningJSON  # type: ignore[import-untyped]

from ..errors import SessionTooLarge
from ..sessions import codec

__all__ = ["ValueCodec", "Values"]

_BLOB = "$django"  # the key of the wrapper holding another serializer's bytes
_JSON_SERIALIZERS = (_SessionsJSON, _SigningJSON)


class ValueCodec:
    """A session value to and from its serialized replicated form, by one
    `SESSION_SERIALIZER`."""

    __slots__ = ("serializer", "plain")

    def __init__(self, serializer: Any) -> None:
        self.serializer = serializer
        # Django's own JSON serializer is tandem's codec: the value is its replicated form
        self.plain = serializer in _JSON_SERIALIZERS

    def dumps(self, key: Any, value: Any) -> str:
        """The serialized replicated form of `value`; TypeError naming `key` if the
        serializer cannot take it."""
        if self.plain:
            return codec.dumps(key, value)
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        try:
            blob = self.serializer().dumps({key: value})
        except Exception as exc:  # pickling errors and the like: one kind of error
            raise TypeError(f"session[{key!r}]: value of type {type(value).__name__} cannot "
                            f"be serialized by {_name(self.serializer)} ({exc})") from None
        return codec.dumps(key, {_BLOB: base64.b64encode(blob).decode("ascii")})

    def loads(self, key: str, serialized: str) -> Any:
        """What comes back for a serialized replicated form: a fresh object."""
        stored = codec.loads(serialized)
        if (not self.plain and type(stored) is dict and len(stored) == 1
                and isinstance(stored.get(_BLOB), str)):
            return self.serializer().loads(base64.b64decode(stored[_BLOB]))[key]
        return stored  # (a plain JSON value: also what another app of the cluster wrote)


class Values(dict[str, Any]):
    """The session dictionary of one `SessionStore`: assignments are checked at once — by
    the serializer, and against `session.max_session_bytes` (`limit`, 0: none)."""

    __slots__ = ("_check", "_limit", "_sizes")

    def __init__(self, check: Callable[[Any, Any], str],
                 items: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
                 limit: int = 0) -> None:
        super().__init__(items)
        self._check = check
        self._limit = limit
        self._sizes: dict[str, int] = {}  # key -> bytes it holds, once measured

    def __setitem__(self, key: str, value: Any) -> None:
        serialized = self._check(key, value)
        if self._limit:
            size = _bytes(key) + _bytes(serialized)
            total = size + sum(self._size(k) for k in self if k != key)
            if total > self._limit:
                raise SessionTooLarge(key, size=total, limit=self._limit)
            self._sizes[key] = size
        super().__setitem__(key, value)

    def _size(self, key: str) -> int:
        size = self._sizes.get(key)
        if size is None:  # (a value loaded, or mutated in place: measured when needed)
            size = self._sizes[key] = _bytes(key) + _bytes(self._check(key, self[key]))
        return size

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._sizes.pop(key, None)

    def pop(self, key: str, *default: Any) -> Any:
        self._sizes.pop(key, None)
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self._sizes.clear()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Values:  # type: ignore[override,misc]
        self.update(other)
        return self


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _name(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
