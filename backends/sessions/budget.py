"""The memory budget of one server's sessions, and the stubs of sessions held by the store.

`session.max_memory_mb` bounds what this server's primaries and replicas hold: each record
counts the bytes of its keys and serialized values plus a fixed overhead per record and per
key, each stub a fixed size (all measured: sessions/accounting.py, docs/memory.md).
Past the budget the evictor writes the least recently used records to the persistent store
— replicas first (they are read only at a failover), then primaries — and keeps a `Stub` of
each in their place: id, version, epoch, the other copy's server. A primary stub is loaded
back from the store by the session's next request (`reinstate`); a replica stub promoted at
a failover becomes a primary stub. Without a store nothing can be evicted: new sessions get
503 (`memory-budget`) instead.

`persistence.mode = "offload"` uses the same stubs without a budget too: the store is the
home of the state and a secondary holds a replica stub of what the store has.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from tandem.logs import short

from ..errors import NotServing
from ..tasks import cancel_and_wait
from .accounting import STUB_BYTES, Stub, Tracked
from .shards import Shards
from .slices import chunks
from .store import APP_PREFIX, LocalStore, Primary, Replica

if TYPE_CHECKING:
    from ..persistence.persister import Persister

__all__ = ["Budget", "LOW_WATER", "EVICT_BATCH"]

log = structlog.get_logger("tandem.sessions")

# The evictor stops once this share of the budget is used (room for the next burst).
LOW_WATER = 0.9
# Records written to the store per eviction round (one pipeline / transaction).
EVICT_BATCH = 32


class Budget:
    """Accounting, eviction and stubs of one server's sessions."""

    def __init__(self, *, limit_bytes: int, store: LocalStore, persister: Persister | None,
                 offload: bool, stats: dict[str, int], me: str,
                 sweep_interval_s: float = 5.0) -> None:
        # configuration
        self.me = me
        self.limit = limit_bytes          # 0: unbounded (offload's stubs only)
        self.offload = offload
        self.store = store
        self.persister = persister
        # accounting: sid -> accounted bytes, least recently used first; the totals
        self.used = 0
        self.used_primaries = 0
        self.used_replicas = 0
        self.lru_primaries: OrderedDict[str, int] = OrderedDict()
        self.lru_replicas: OrderedDict[str, int] = OrderedDict()
        self.primaries: Tracked[Primary] | None = None
        self.replicas: Tracked[Replica] | None = None
        if limit_bytes:
            self.primaries = Tracked(store.primaries, self.lru_primaries, self._count_primary)
            self.replicas = Tracked(store.replicas, self.lru_replicas, self._count_replica)
            store.primaries, store.replicas = self.primaries, self.replicas
        # sessions whose state is in the store only
        self.stubs: Shards[Stub] = Shards()
        # primaries held here whose version the store holds too (evicted without a write)
        self.clean: set[str] = set()
        self.sweep_interval_s = sweep_interval_s  # stubs of idle sessions go this often
        self.stats = stats
        for key in ("evicted", "stub_loaded", "refused_memory"):
            stats.setdefault(key, 0)
        # the evictor; the sessions it is writing, and those of them ended meanwhile
        self._writing: set[str] = set()
        self._ended: set[str] = set()
        self._over = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- accounting ---------------------------------------------------------------------

    def _count_primary(self, delta: int) -> None:
        self.used_primaries += delta
        self._count(delta)

    def _count_replica(self, delta: int) -> None:
        self.used_replicas += delta
        self._count(delta)

    def _count(self, delta: int) -> None:
        self.used += delta
        if self.limit and self.used > self.limit:
            self._room.clear()
            self._over.set()

    def over(self) -> bool:
        """Is more held than the budget allows (stubs included)?"""
        return bool(self.limit) and self.used + STUB_BYTES * len(self.stubs) > self.limit

    def full(self, version: int) -> bool:
        """Must the copy of a session at this version be refused? A new session's (its
        first version), past the budget, when nothing can be evicted (no store)."""
        return version <= 1 and self.persister is None and self.over()

    def used_bytes(self) -> dict[str, int]:
        """What the health JSON and the metrics show."""
        return {"limit": self.limit, "used": self.used + STUB_BYTES * len(self.stubs),
                "primaries": self.used_primaries, "replicas": self.used_replicas,
                "stubs": len(self.stubs)}

    def used_now(self, record: Primary) -> None:
        """A request opened this primary: the least recently used are evicted first."""
        if self.lru_primaries and record.sid in self.lru_primaries:
            self.lru_primaries.move_to_end(record.sid)

    def committed(self, record: Primary, *, stored: bool) -> None:
        """After a commit: its new size counted; `stored` — the store holds this version."""
        if self.primaries is not None:
            self.primaries.resized(record)
        if stored:
            self.clean.add(record.sid)
        else:
            self.clean.discard(record.sid)

    def replicated(self, replica: Replica) -> None:
        """A delta changed this replica: counted again."""
        if self.replicas is not None:
            self.replicas.resized(replica)

    async def room(self, timeout: float) -> bool:
        """Wait (bounded) for the evictor to bring the server under its budget."""
        if not self.over() or self.persister is None:
            return not self.over()
        self._over.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.over():
                    self._room.clear()
                    await self._room.wait()
        return not self.over()

    # --- stubs --------------------------------------------------------------------------

    def stub_replica(self, peer: str, msg: dict[str, Any]) -> None:
        """A primary's replication of a version the store holds (offload): a replica stub
        in place of any copy held of it."""
        sid = msg["sid"]
        self.store.replicas.pop(sid, None)
        stub = Stub(sid, version=int(msg["v"]), epoch=int(msg.get("e", 0)), peer=peer,
                    primary=False, last_access=float(msg["last_access"]),
                    max_inactive_s=float(msg["max_inactive_s"]), rid=msg.get("rid"),
                    undo=msg.get("undo") or {})
        self.stubs[sid] = stub

    def drop(self, sid: str, *, peer: str | None = None,
             older_than: int | None = None) -> Stub | None:
        """Forget a stub — with `peer`, only a replica stub of that primary's; with
        `older_than`, only one of an older epoch. The stub forgotten."""
        stub = self.stubs.get(sid)
        if stub is None or (peer is not None and (stub.primary or stub.peer != peer)) or (
                older_than is not None and stub.epoch >= older_than):
            return None
        del self.stubs[sid]
        return stub

    def ended(self, sid: str, stub: Stub | None) -> bool:
        """The session was invalidated or expired by its primary (`stub`: the replica stub
        it had here). True when it must be deleted from the store now: an eviction here
        may have written it back after its primary deleted it. (A write still in flight:
        deleted by the evictor once it lands.)"""
        if sid in self._writing:
            self._ended.add(sid)
            return False
        return stub is not None and not stub.primary

    def touched(self, sid: str, peer: str, last_access: float) -> None:
        stub = self.stubs.get(sid)
        if stub is not None and not stub.primary and stub.peer == peer:
            stub.last_access = max(stub.last_access, last_access)
            stub.heard = time.monotonic()

    def promote_stubs(self, peer: str, *, epoch_of: Callable[[int], int]) -> dict[str, int]:
        """The view ended `peer`: its replica stubs here become primary stubs (the store
        holds their state; the next request loads it). sid -> the new epoch."""
        promoted: dict[str, int] = {}
        now = time.time()
        for stub in [s for s in self.stubs.values() if not s.primary and s.peer == peer]:
            if now - stub.last_access > stub.max_inactive_s or (
                    stub.sid in self.store.primaries):  # (handed to us since: stale)
                del self.stubs[stub.sid]
                continue
            stub.primary, stub.peer, stub.epoch = True, None, epoch_of(stub.epoch)
            promoted[stub.sid] = stub.epoch
        return promoted

    def clear(self) -> None:
        """Fenced: nothing held here is ours to serve any more."""
        self.stubs.clear()
        self.clean.clear()

    async def reinstate(self, sid: str) -> Primary | None:
        """The primary of a primary stub, loaded back from the store (None: not a primary
        stub here, or the store no longer has this session or has a newer owner's)."""
        stub = self.stubs.get(sid)
        if stub is None or not stub.primary or self.persister is None:
            return None
        state = await self.persister.load(sid)
        if state is None and self.persister.failing:
            # The store cannot be read now: the session is there still. 503, the stub kept.
            raise NotServing("the session is in the store, which fails", peer=self.me,
                             state="store-unavailable")
        if self.stubs.get(sid) is not stub:  # a concurrent request loaded it meanwhile
            return self.store.primaries.get(sid)
        del self.stubs[sid]
        if state is None or int(state.get("e", 0)) > stub.epoch or int(state["v"]) < stub.version:
            # expired, lost by the store, or taken over by another server since
            log.warning("stub_not_loaded", sid=short(sid), version=stub.version,
                        stored=None if state is None else state["v"])
            return None
        record = Primary(sid, data=state["data"], version=int(state["v"]), epoch=stub.epoch,
                         max_inactive_s=stub.max_inactive_s, created=float(state["created"]),
                         last_access=max(stub.last_access, float(state["last_access"])),
                         last_rid=stub.rid, undo=stub.undo)
        self.store.primaries[sid] = record
        if stub.peer is not None:
            # the secondary holds this version (a copy or a stub: a later delta to a stub
            # is answered need_full, and the whole state is sent)
            self.store.assign_secondary(record, stub.peer)
            record.sent_version = record.acked_version = record.version
        self.clean.add(sid)
        self.stats["stub_loaded"] += 1
        log.info("stub_loaded", sid=short(sid), version=record.version)
        return record

    def revive(self, record: Primary) -> bool:
        """A request held this primary while it was evicted: it is served from memory again
        (True), if its stub is still the one made of it."""
        stub = self.stubs.get(record.sid)
        if stub is None or not stub.primary or (stub.epoch, stub.version) != (
                record.epoch, record.version) or record.sid in self.store.primaries:
            return False
        del self.stubs[record.sid]
        self.store.primaries[record.sid] = record
        if stub.peer is not None:
            self.store.assign_secondary(record, stub.peer)
            record.sent_version = record.acked_version = record.version
        return True

    # --- eviction -----------------------------------------------------------------------

    def start(self) -> None:
        if self.limit and self.persister is not None:
            self._tasks.append(asyncio.create_task(self._evict_loop(), name="session-evictor"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="stub-sweeper"))

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)

    async def _evict_loop(self) -> None:
        while True:
            await self._over.wait()
            self._over.clear()
            while self.used + STUB_BYTES * len(self.stubs) > self.limit * LOW_WATER:
                if not await self._evict_round():
                    await asyncio.sleep(1.0)  # the store is failing: try again later
                    break
                self._room.set()
            self._room.set()

    async def _evict_round(self) -> bool:
        """Write a batch of the least recently used records to the store and stub them;
        False when nothing could be evicted."""
        assert self.persister is not None
        victims: list[Primary | Replica] = []
        # as many as bring the server under the low-water mark (large sessions: a few)
        excess = self.used + STUB_BYTES * len(self.stubs) - int(self.limit * LOW_WATER)
        for lru, held in ((self.lru_replicas, self.store.replicas),
                          (self.lru_primaries, self.store.primaries)):
            for sid, size in lru.items():
                if len(victims) >= EVICT_BATCH or excess <= 0:
                    break
                record = held.get(sid)
                # (application sessions stay: they are read and written in place at their
                # primary by the members' servers, which know no stubs; there are few)
                if record is not None and not sid.startswith(APP_PREFIX):
                    victims.append(record)
                    excess -= size - STUB_BYTES
        if not victims:
            return False
        ages = {r.sid: (r.epoch, r.version) for r in victims}
        to_write = [r for r in victims if not (isinstance(r, Primary) and r.sid in self.clean
                                               and not self.persister.pending(r.sid))]
        self._writing = {r.sid for r in to_write}
        try:
            saved = not to_write or await self.persister.save_states(
                [_state(r) for r in to_write])
        finally:
            self._writing, ended, self._ended = set(), self._ended, set()
        for sid in ended:  # (a replica's primary ended it while its write was in flight)
            await self.persister.invalidated(sid)
        if not saved:
            return False
        evicted = 0
        for record in victims:
            if (record.epoch, record.version) != ages[record.sid]:
                continue  # changed while it was written: it stays (and is used now)
            if isinstance(record, Primary):
                if self.store.primaries.get(record.sid) is not record:
                    continue
                self.store.remove(record.sid)
                self.clean.discard(record.sid)
                self.stubs[record.sid] = Stub.of(record, primary=True)
            else:
                if self.store.replicas.get(record.sid) is not record:
                    continue
                del self.store.replicas[record.sid]
                self.stubs[record.sid] = Stub.of(record, primary=False)
            evicted += 1
        self.stats["evicted"] += evicted
        if evicted:
            log.info("sessions_evicted", sessions=evicted, used=self.used, limit=self.limit)
        return evicted > 0

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            now, mono = time.time(), time.monotonic()
            dead = 0
            async for stubs in chunks(self.stubs.walk_values()):  # (a million: in slices)
                for stub in stubs:
                    if stub.expired(now, mono) and self.stubs.get(stub.sid) is stub:
                        del self.stubs[stub.sid]
                        dead += 1
            if dead:
                log.info("stubs_expired", stubs=dead)


def _state(record: Primary | Replica) -> dict[str, Any]:
    """What the store keeps of a record (`Primary.state()`'s shape, for either kind)."""
    return {"sid": record.sid, "v": record.version, "e": record.epoch, "data": record.data,
            "max_inactive_s": record.max_inactive_s, "created": record.created,
            "last_access": record.last_access}
