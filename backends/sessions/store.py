"""The embedded session store of one server: the primaries it serves, the replicas it keeps.

Values are stored serialized (see codec.py). A primary knows its secondary and what that
secondary has been sent; a replica knows its primary and when that primary was last heard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import cast

from tandem.token import new_sid

from .shards import Shards

__all__ = ["Primary", "Replica", "LocalStore", "APP_PREFIX"]

# The ids of application sessions' records begin with it (sessions' ids have no dot).
APP_PREFIX = "app."

_NONE: frozenset[str] = frozenset()

# The undo of the last commit, kept as a flat tuple (key, old value, key, old value, ...):
# 56-72 bytes where a dict of one key costs 184. Messages carry it as a dict.
Undo = tuple[str | None, ...]


def pack_undo(undo: dict[str, str | None] | None) -> Undo | None:
    if not undo:
        return None
    return tuple(x for pair in undo.items() for x in pair)


def unpack_undo(undo: Undo | None) -> dict[str, str | None]:
    """The undo as a dict (a new one: it goes into messages, which must not share one)."""
    if not undo:
        return {}
    return {str(undo[i]): undo[i + 1] for i in range(0, len(undo), 2)}


class _Record:
    """The memory layout of both kinds of record, so that a replica is promoted in place (its
    class changes): promoting a million allocates no new object, which Python's collector
    would have to scan, holding the loop for a quarter of a second at a time."""

    __slots__ = ("sid", "data", "version", "epoch", "max_inactive_s", "created", "last_access",
                 "last_rid", "_undo",
                 # a primary's
                 "secondary", "sent_version", "acked_version", "_pending", "_stale_holders",
                 "superseded", "_site_pending",
                 # a replica's (kept by a promoted one: its `primary` is the old primary)
                 "primary", "last_heard")


class Primary(_Record):
    """A session served by this server.

    The change sets and the undo map are empty for nearly every session nearly all the time:
    they are None until first used (an empty set costs 216 bytes, an empty dict 64, per
    session: docs/memory.md), and read through properties that give an empty one instead.
    """

    __slots__ = ()

    def __init__(self, sid: str, *, data: dict[str, str] | None = None, version: int = 0,
                 epoch: int = 0, max_inactive_s: float, created: float | None = None,
                 last_access: float | None = None, last_rid: str | None = None,
                 undo: dict[str, str | None] | None = None) -> None:
        now = time.time()
        self.sid = sid
        self.data: dict[str, str] = {} if data is None else data
        self.version = version                 # bumped by every commit that changes something
        # bumped by every change of primary (promotion, fetch, hand-over): a copy from an
        # older epoch is stale, however high its version
        self.epoch = epoch
        self.max_inactive_s = max_inactive_s
        self.created = now if created is None else created
        self.last_access = now if last_access is None else last_access
        # exactly-once retries: the proxy's id of the request behind the last commit, and
        # the values that commit replaced (None: the key was absent)
        self.last_rid = last_rid
        self._undo = pack_undo(undo)
        self._primary_state()

    def _primary_state(self) -> None:
        # replication state
        self.secondary: str | None = None      # server holding the replica
        self.sent_version = -1                 # version last sent to `secondary` (-1: nothing)
        self.acked_version = -1                # version the secondary acknowledged
        self._pending: set[str] | None = None  # keys changed since `sent_version`
        # servers that may hold old copies to release
        self._stale_holders: set[str] | None = None
        # keys changed since every remote site's copy last acknowledged this session's
        # version (backends/sites: a delta from that version; cleared by the replicator)
        self._site_pending: set[str] | None = None
        # dropped here because another server took it over (we were thought failed)
        self.superseded = False

    @property
    def pending(self) -> AbstractSet[str]:
        """Keys changed since `sent_version`."""
        return self._pending or _NONE

    def clear_pending(self) -> None:
        self._pending = None

    @property
    def site_pending(self) -> AbstractSet[str]:
        """Keys changed since every remote site's copy acknowledged a version."""
        return self._site_pending or _NONE

    def clear_site_pending(self) -> None:
        self._site_pending = None

    @property
    def stale_holders(self) -> AbstractSet[str]:
        """Servers that may hold old copies of this session, to be told to release them."""
        return self._stale_holders or _NONE

    @stale_holders.setter
    def stale_holders(self, peers: Iterable[str]) -> None:
        self._stale_holders = set(peers) or None

    def add_stale_holder(self, peer: str) -> None:
        if self._stale_holders is None:
            self._stale_holders = {peer}
        else:
            self._stale_holders.add(peer)

    @property
    def undo(self) -> dict[str, str | None]:
        """The values the last commit replaced (None: the key was absent)."""
        return unpack_undo(self._undo)

    def expired(self, now: float) -> bool:
        return now - self.last_access > self.max_inactive_s

    def apply(self, set_: dict[str, str], deleted: set[str], *, rid: str | None = None,
              replicated: bool = True, sites: bool = False) -> None:
        """Apply a commit; `replicated`, `sites`: whether a secondary, remote sites are
        sent deltas (whether the changed keys must be remembered for them)."""
        data = self.data
        self._undo = pack_undo({k: data.get(k) for k in (*set_, *deleted)} if rid else None)
        self.last_rid = rid
        data.update(set_)
        for key in deleted:
            self.data.pop(key, None)
        self._changed(set_, replicated, sites)
        self._changed(deleted, replicated, sites)
        self.version += 1

    def roll_back(self, *, replicated: bool = True, sites: bool = False) -> None:
        """Undo the last commit (its request is being retried); a new version."""
        undo, self._undo, self.last_rid = unpack_undo(self._undo), None, None
        for key, old in undo.items():
            if old is None:
                self.data.pop(key, None)
            else:
                self.data[key] = old
        self._changed(undo, replicated, sites)
        self.version += 1

    def _changed(self, keys: Iterable[str], replicated: bool, sites: bool) -> None:
        if not keys:
            return
        if replicated:
            if self._pending is None:
                self._pending = set()
            self._pending.update(keys)
        if sites:
            if self._site_pending is None:
                self._site_pending = set()
            self._site_pending.update(keys)

    def state(self) -> dict[str, object]:
        """The full state as it travels on the replication channel."""
        return {"sid": self.sid, "v": self.version, "e": self.epoch, "data": self.data,
                "max_inactive_s": self.max_inactive_s, "created": self.created,
                "last_access": self.last_access, "rid": self.last_rid, "undo": self.undo}


class Replica(_Record):
    """A copy of a session whose primary is another server."""

    __slots__ = ()

    def __init__(self, sid: str, *, data: dict[str, str], version: int, epoch: int,
                 max_inactive_s: float, created: float, last_access: float,
                 primary: str, last_rid: str | None = None,
                 undo: dict[str, str | None] | None = None) -> None:
        self.sid = sid
        self.data = data
        self.version = version
        self.epoch = epoch
        self.max_inactive_s = max_inactive_s
        self.created = created
        self.last_access = last_access
        self.primary: str = primary
        self.last_heard: float = time.monotonic()     # last message from the primary about it
        self.last_rid = last_rid               # as on the primary (exactly-once retries)
        self._undo = pack_undo(undo)           # as on the primary

    @property
    def undo(self) -> dict[str, str | None]:
        return unpack_undo(self._undo)

    @undo.setter
    def undo(self, undo: dict[str, str | None] | None) -> None:
        self._undo = pack_undo(undo)

    def orphaned(self, now_mono: float) -> bool:
        """A replica whose primary stays silent expires after 2 x max_inactive."""
        return now_mono - self.last_heard > 2 * self.max_inactive_s


class LocalStore:
    """Primaries and replicas held by this server, with expiry."""

    def __init__(self, *, max_inactive_s: float) -> None:
        self.max_inactive_s = max_inactive_s
        self.primaries: Shards[Primary] = Shards()
        self.replicas: Shards[Replica] = Shards()
        # how many of this server's primaries each peer holds as secondary (rank tie-break)
        self.replica_counts: dict[str, int] = {}

    def create(self, sid: str | None = None) -> Primary:
        """A new primary, under `sid` if given (an id already handed out: a regenerated
        session's), else a new one."""
        if sid is None or sid in self.primaries or sid in self.replicas:
            sid = new_sid()
        while sid in self.primaries or sid in self.replicas:  # pragma: no cover - 2**-192
            sid = new_sid()
        record = Primary(sid, max_inactive_s=self.max_inactive_s)
        self.primaries[sid] = record
        return record

    def promote(self, replica: Replica, *, epoch: int) -> Primary:
        """Turn a replica into a primary served here (same version, a newer epoch)."""
        self.replicas.pop(replica.sid, None)
        replica.__class__ = Primary  # type: ignore[assignment]  # (in place: see _Record)
        record = cast(Primary, replica)
        record.epoch = epoch
        record._primary_state()
        self.primaries[record.sid] = record
        return record

    def demote(self, record: Primary, *, new_primary: str) -> Replica:
        """Keep a primary's state as a replica of `new_primary` (it moved there)."""
        self.remove(record.sid)
        replica = Replica(record.sid, data=record.data, version=record.version,
                          epoch=record.epoch, max_inactive_s=record.max_inactive_s,
                          created=record.created,
                          last_access=record.last_access, primary=new_primary,
                          last_rid=record.last_rid, undo=record.undo)
        self.replicas[record.sid] = replica
        return replica

    def expired(self) -> tuple[list[Primary], list[Replica]]:
        """Remove and return the primaries past max_inactive and the orphaned replicas."""
        now, mono = time.time(), time.monotonic()
        dead_p = [r for r in self.primaries.values() if r.expired(now)]
        for r in dead_p:
            self.remove(r.sid)
        dead_r = [c for c in self.replicas.values() if c.orphaned(mono)]
        for c in dead_r:
            del self.replicas[c.sid]
        return dead_p, dead_r

    def assign_secondary(self, record: Primary, peer: str | None) -> None:
        """Point `record` at a new secondary (which has been sent nothing yet)."""
        self._count(record.secondary, -1)
        record.secondary = peer
        record.sent_version = record.acked_version = -1
        record.clear_pending()
        self._count(peer, +1)

    def inactive(self, max_inactive_s: float) -> float:
        """`max_inactive_s` as one float object shared by every session that has the
        configured value (24 bytes each otherwise)."""
        return self.max_inactive_s if max_inactive_s == self.max_inactive_s else max_inactive_s

    @staticmethod
    def interned(data: dict[str, str]) -> dict[str, str]:
        """A received session's values with their keys interned: one string per key name
        for all sessions, not one per session (each message decodes its own)."""
        intern = sys.intern
        return {intern(k): v for k, v in data.items()}

    def remove(self, sid: str) -> Primary | None:
        record = self.primaries.pop(sid, None)
        if record is not None:
            self._count(record.secondary, -1)
        return record

    def _count(self, peer: str | None, delta: int) -> None:
        if peer is not None:
            self.replica_counts[peer] = self.replica_counts.get(peer, 0) + delta
