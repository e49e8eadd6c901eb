"""The store's maps of session ids, split over many small dicts so that none holds the loop.

A Python dict grows all at once: when its 699,051st entry is added, every entry is copied
into a table twice as large — ~35 ms at that size, with the event loop held, and a
promotion of a million replicas adds them all within a second or two. Split by the id's
hash over `SHARDS` dicts, each grows on its own, 64 times smaller: a resize costs well under
a millisecond at a million sessions, ~6 ms at ten million. A lookup costs one Python call
more than a dict's (~0.1 µs); the promotion and the sweeps walk the store shard by shard
(`shards`), without a snapshot of a million ids.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from itertools import chain
from typing import Any, Generic, TypeVar, overload

__all__ = ["Shards", "SHARDS"]

V = TypeVar("V")
T = TypeVar("T")

SHARDS = 64
_MASK = SHARDS - 1
_MISSING: Any = object()


class _Shard(dict[str, V]):
    """One shard: a dict, of a subclass so that the cycle collector keeps it tracked from
    the start. A plain dict holding no object it tracks (an empty one) is untracked, and
    tracked again by its first insert, as a *young* object: a promotion that fills the
    empty primaries of a server with a million records within a second or two would then
    have every young run of the collector walk them (~0.1 s each). A subclass's dict is
    tracked when made and never untracked: made at start-up, it is old."""

    __slots__ = ()


class _View(Generic[V]):
    """A view of the shards: counted, and iterated shard after shard."""

    __slots__ = ("_shards",)

    def __init__(self, shards: tuple[dict[str, V], ...]) -> None:
        self._shards = shards

    def __len__(self) -> int:
        return sum(map(len, self._shards))


class _Values(_View[V]):
    __slots__ = ()

    def __iter__(self) -> Iterator[V]:
        return chain.from_iterable(shard.values() for shard in self._shards)


class _Items(_View[V]):
    __slots__ = ()

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return chain.from_iterable(shard.items() for shard in self._shards)


class Shards(MutableMapping[str, V]):
    """A mapping of session id -> record kept in `SHARDS` dicts (by the id's hash)."""

    __slots__ = ("_shards",)

    def __init__(self, items: dict[str, V] | None = None) -> None:
        self._shards: tuple[dict[str, V], ...] = tuple(_Shard() for _ in range(SHARDS))
        if items:
            for sid, value in items.items():
                self[sid] = value

    @property
    def shards(self) -> tuple[dict[str, V], ...]:
        """The dicts themselves, for walks that go one shard at a time (read only)."""
        return self._shards

    def shard_of(self, sid: str) -> dict[str, V]:
        """The dict that holds (or would hold) `sid`."""
        return self._shards[hash(sid) & _MASK]

    def walk(self) -> Iterator[str]:
        """The ids, shard by shard, each shard copied when it is reached: safe to walk
        across awaits (an entry removed after its shard was copied is still given)."""
        for shard in self._shards:
            yield from list(shard)

    def walk_values(self) -> Iterator[V]:
        """The values, as `walk` gives the ids."""
        for shard in self._shards:
            yield from list(shard.values())

    def __getitem__(self, sid: str) -> V:
        return self._shards[hash(sid) & _MASK][sid]

    def __setitem__(self, sid: str, value: V) -> None:
        self._shards[hash(sid) & _MASK][sid] = value

    def __delitem__(self, sid: str) -> None:
        del self._shards[hash(sid) & _MASK][sid]

    def __contains__(self, sid: object) -> bool:
        return sid in self._shards[hash(sid) & _MASK]

    @overload
    def get(self, sid: str, /) -> V | None: ...
    @overload
    def get(self, sid: str, default: V | T, /) -> V | T: ...

    def get(self, sid: str, default: Any = None, /) -> Any:
        return self._shards[hash(sid) & _MASK].get(sid, default)

    @overload
    def pop(self, sid: str, /) -> V: ...
    @overload
    def pop(self, sid: str, default: V | T, /) -> V | T: ...

    def pop(self, sid: str, default: Any = _MISSING, /) -> Any:
        shard = self._shards[hash(sid) & _MASK]
        if default is _MISSING:
            return shard.pop(sid)
        return shard.pop(sid, default)

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __bool__(self) -> bool:
        return any(self._shards)

    def __iter__(self) -> Iterator[str]:
        return chain.from_iterable(self._shards)

    def values(self) -> _Values[V]:  # type: ignore[override]
        return _Values(self._shards)

    def items(self) -> _Items[V]:  # type: ignore[override]
        return _Items(self._shards)

    def __repr__(self) -> str:
        return f"Shards({len(self)} entries)"
