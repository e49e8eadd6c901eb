"""The embedded session store of one server: the primaries it serves, the replicas it keeps.

Values are stored serialized (see codec.py). A primary knows its secondary and what that
secondary has been sent; a replica knows its primary and when that primary was last heard.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from tandem.token import new_sid

__all__ = ["Primary", "Replica", "LocalStore", "APP_PREFIX"]

# The ids of application sessions' records begin with it (sessions' ids have no dot).
APP_PREFIX = "app."


class Primary:
    """A session served by this server."""

    __slots__ = ("sid", "data", "version", "epoch", "max_inactive_s", "created", "last_access",
                 "secondary", "sent_version", "acked_version", "pending", "stale_holders",
                 "last_rid", "undo", "superseded", "site_pending")

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
        # replication state
        self.secondary: str | None = None      # server holding the replica
        self.sent_version = -1                 # version last sent to `secondary` (-1: nothing)
        self.acked_version = -1                # version the secondary acknowledged
        self.pending: set[str] = set()         # keys changed since `sent_version`
        self.stale_holders: set[str] = set()   # servers that may hold old copies to release
        # keys changed since every remote site's copy last acknowledged this session's
        # version (backends/sites: a delta from that version; cleared by the replicator)
        self.site_pending: set[str] = set()
        # exactly-once retries: the proxy's id of the request behind the last commit, and
        # the values that commit replaced (None: the key was absent)
        self.last_rid = last_rid
        self.undo: dict[str, str | None] = undo or {}
        # dropped here because another server took it over (we were thought failed)
        self.superseded = False

    def expired(self, now: float) -> bool:
        return now - self.last_access > self.max_inactive_s

    def apply(self, set_: dict[str, str], deleted: set[str], *, rid: str | None = None) -> None:
        data = self.data
        self.undo = {k: data.get(k) for k in (*set_, *deleted)} if rid else {}
        self.last_rid = rid
        data.update(set_)
        for key in deleted:
            self.data.pop(key, None)
        self.pending.update(set_)
        self.pending.update(deleted)
        self.site_pending.update(set_)
        self.site_pending.update(deleted)
        self.version += 1

    def roll_back(self) -> None:
        """Undo the last commit (its request is being retried); a new version."""
        for key, old in self.undo.items():
            if old is None:
                self.data.pop(key, None)
            else:
                self.data[key] = old
            self.pending.add(key)
            self.site_pending.add(key)
        self.undo, self.last_rid = {}, None
        self.version += 1

    def state(self) -> dict[str, object]:
        """The full state as it travels on the replication channel."""
        return {"sid": self.sid, "v": self.version, "e": self.epoch, "data": self.data,
                "max_inactive_s": self.max_inactive_s, "created": self.created,
                "last_access": self.last_access, "rid": self.last_rid, "undo": self.undo}


class Replica:
    """A copy of a session whose primary is another server."""

    __slots__ = ("sid", "data", "version", "epoch", "max_inactive_s", "created", "last_access",
                 "primary", "last_heard", "last_rid", "undo")

    def __init__(self, sid: str, *, data: dict[str, str], version: int, epoch: int,
                 max_inactive_s: float, created: float, last_access: float,
                 primary: str) -> None:
        self.sid = sid
        self.data = data
        self.version = version
        self.epoch = epoch
        self.max_inactive_s = max_inactive_s
        self.created = created
        self.last_access = last_access
        self.primary = primary
        self.last_heard = time.monotonic()     # last message from the primary about it
        self.last_rid: str | None = None       # as on the primary (exactly-once retries)
        self.undo: dict[str, str | None] = {}

    def orphaned(self, now_mono: float) -> bool:
        """A replica whose primary stays silent expires after 2 x max_inactive."""
        return now_mono - self.last_heard > 2 * self.max_inactive_s


class LocalStore:
    """Primaries and replicas held by this server, with expiry."""

    def __init__(self, *, max_inactive_s: float) -> None:
        self.max_inactive_s = max_inactive_s
        self.primaries: dict[str, Primary] = {}
        self.replicas: dict[str, Replica] = {}
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
        record = Primary(replica.sid, data=replica.data, version=replica.version,
                         epoch=epoch, last_rid=replica.last_rid, undo=replica.undo,
                         max_inactive_s=replica.max_inactive_s, created=replica.created,
                         last_access=replica.last_access)
        self.primaries[record.sid] = record
        return record

    def demote(self, record: Primary, *, new_primary: str) -> Replica:
        """Keep a primary's state as a replica of `new_primary` (it moved there)."""
        self.remove(record.sid)
        replica = Replica(record.sid, data=record.data, version=record.version,
                          epoch=record.epoch, max_inactive_s=record.max_inactive_s,
                          created=record.created,
                          last_access=record.last_access, primary=new_primary)
        replica.last_rid, replica.undo = record.last_rid, record.undo
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

    def primaries_with_secondary(self, peer: str | None) -> Iterator[Primary]:
        return (r for r in list(self.primaries.values()) if r.secondary == peer)

    def assign_secondary(self, record: Primary, peer: str | None) -> None:
        """Point `record` at a new secondary (which has been sent nothing yet)."""
        self._count(record.secondary, -1)
        record.secondary = peer
        record.sent_version = record.acked_version = -1
        record.pending.clear()
        self._count(peer, +1)

    def remove(self, sid: str) -> Primary | None:
        record = self.primaries.pop(sid, None)
        if record is not None:
            self._count(record.secondary, -1)
        return record

    def _count(self, peer: str | None, delta: int) -> None:
        if peer is not None:
            self.replica_counts[peer] = self.replica_counts.get(peer, 0) + delta
