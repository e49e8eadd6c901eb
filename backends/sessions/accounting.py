"""What the memory budget counts (sessions/budget.py): the measured cost of a record, a key
and a stub, the store's dicts that count every change, and the `Stub` of a session held by
the store only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from .shards import Shards
from .store import Primary, Replica

__all__ = ["Stub", "Tracked", "record_bytes", "PRIMARY_OVERHEAD", "REPLICA_OVERHEAD",
           "KEY_OVERHEAD", "STUB_BYTES"]

# What a record costs besides its keys and values (bytes, measured with tracemalloc on
# CPython 3.11, `bench/offload.py --measure`): the Primary or Replica object with its slots,
# its dict, the store's index entry and the budget's LRU entry.
PRIMARY_OVERHEAD = 540
REPLICA_OVERHEAD = 520
# What each key adds besides the characters of its name and value: the value's str object
# header and the dict entry.
KEY_OVERHEAD = 50
# What a stub costs (the object, its request id, its undo and index entry), measured the
# same way.
STUB_BYTES = 420

R = TypeVar("R", Primary, Replica)


def record_bytes(record: Primary | Replica) -> int:
    """The accounted size of a record: its keys and serialized values, plus the overheads."""
    overhead = PRIMARY_OVERHEAD if isinstance(record, Primary) else REPLICA_OVERHEAD
    return overhead + sum(len(k) + len(v) + KEY_OVERHEAD for k, v in record.data.items())


class Stub:
    """A session whose state is in the store only: what routing and failover need of it.

    `primary`: this server serves it (`peer` its secondary); else it is a replica stub
    (`peer` its primary, `heard` when that primary last spoke of it)."""

    __slots__ = ("sid", "version", "epoch", "peer", "primary", "last_access",
                 "max_inactive_s", "rid", "undo", "heard")

    def __init__(self, sid: str, *, version: int, epoch: int, peer: str | None, primary: bool,
                 last_access: float, max_inactive_s: float, rid: str | None,
                 undo: dict[str, str | None]) -> None:
        self.sid = sid
        self.version = version
        self.epoch = epoch
        self.peer = peer
        self.primary = primary
        self.last_access = last_access
        self.max_inactive_s = max_inactive_s
        # exactly-once retries, as on the record (its last request's id and what it replaced)
        self.rid = rid
        self.undo = undo
        self.heard = time.monotonic()

    @classmethod
    def of(cls, record: Primary | Replica, *, primary: bool) -> Stub:
        peer = record.secondary if isinstance(record, Primary) else record.primary
        return cls(record.sid, version=record.version, epoch=record.epoch, peer=peer,
                   primary=primary, last_access=record.last_access,
                   max_inactive_s=record.max_inactive_s, rid=record.last_rid,
                   undo=record.undo)

    def expired(self, now: float, mono: float) -> bool:
        if self.primary:
            return now - self.last_access > self.max_inactive_s
        return mono - self.heard > 2 * self.max_inactive_s  # (an orphaned replica's rule)


class Tracked(Shards[R]):
    """The store's primaries or replicas, each change counted in the budget (only when a
    budget is set: otherwise the store keeps its plain maps)."""

    __slots__ = ("_lru", "_changed")

    def __init__(self, items: Shards[R], lru: OrderedDict[str, int],
                 changed: Callable[[int], None]) -> None:
        super().__init__()
        self._lru = lru
        self._changed = changed
        for shard in items.shards:
            for sid, record in shard.items():
                self[sid] = record

    def __setitem__(self, sid: str, record: R) -> None:
        self.shard_of(sid)[sid] = record
        size = record_bytes(record)
        old = self._lru.pop(sid, 0)
        self._lru[sid] = size  # (the most recently used end)
        self._changed(size - old)

    def __delitem__(self, sid: str) -> None:
        super().__delitem__(sid)
        self._changed(-self._lru.pop(sid, 0))

    def pop(self, sid: str, *default: Any) -> Any:
        found = super().pop(sid, *default)
        if sid in self._lru:
            self._changed(-self._lru.pop(sid))
        return found

    def clear(self) -> None:
        super().clear()
        self._changed(-sum(self._lru.values()))
        self._lru.clear()

    def resized(self, record: R) -> None:
        """The record's values changed (a commit, a delta): counted again, used now."""
        if self.get(record.sid) is record:
            self[record.sid] = record
