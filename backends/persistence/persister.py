"""What the session manager calls: write modes, touches, expiry sweeps and store failures.

The manager hands over records at four points — load on a miss, commit, invalidation,
expiry — and the persister decides when the store sees them:

- `sync`: a commit that changed the session is written before `commit()` returns, so the
  response leaves only once the write is in the store. Concurrent commits are written
  together (group commit: one transaction, one pipeline).
- `batched`: changed sessions are queued and written every `flush_interval_s`, or as soon
  as `flush_threshold` of them wait.
- `offload`: written as in `sync`, but before replication: the store is the home of the
  state, and the secondary is sent only a stub of what the store holds (docs/memory.md).
- Read-only requests never write the session: their last-access times are batched and sent
  as touches with the next flush, in both modes.

A store that fails at run time never fails a request: the error is logged (`store_error`),
counted (`stats["store_errors"]`, shown in the health JSON), and what was not written is
kept and retried by the next flush. While the store is known to be failing, sync commits
queue their write instead of waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from tandem.logs import short

from ..tasks import cancel_and_wait
from . import open_store
from .base import SessionStore, State, StoredSession
from .errors import StoreError, StoreTimeout

if TYPE_CHECKING:
    from tandem.config import Config

    from ..sessions.store import Primary

__all__ = ["Persister", "make_persister"]

log = structlog.get_logger("tandem.persistence")

_FAILED: Any = object()
_STATS = ("store_loaded", "store_saved", "store_touched", "store_deleted", "store_swept",
          "store_errors")


def make_persister(config: Config, *, stats: dict[str, int]) -> Persister | None:
    """The persister for `session.persistence`, or None when it is "none"."""
    store = open_store(config)
    if store is None:
        return None
    p = config.persistence
    return Persister(store=store, mode=p.mode, flush_interval_s=p.flush_interval_s,
                     flush_threshold=p.flush_threshold, timeout_s=p.timeout_s,
                     sweep_interval_s=max(0.5, min(60.0, config.session.max_inactive_s / 10)),
                     stats=stats)


class Persister:
    """Writes a server's sessions to its `SessionStore` in the configured mode."""

    def __init__(self, *, store: SessionStore, mode: str, flush_interval_s: float,
                 flush_threshold: int, timeout_s: float, sweep_interval_s: float,
                 stats: dict[str, int]) -> None:
        if mode not in ("sync", "batched", "offload"):
            raise ValueError(f"mode must be sync, batched or offload, got {mode!r}")
        # configuration
        self.store = store
        self.mode = mode
        self._interval = flush_interval_s
        self._threshold = flush_threshold
        self._timeout = timeout_s
        self._sweep_interval = sweep_interval_s
        # queued work, flushed by `_flush_loop`
        self._writes: dict[str, Primary] = {}               # sid -> record to write
        self._touches: dict[str, tuple[float, float]] = {}  # sid -> (last_access, max_inactive)
        self._deletes: set[str] = set()
        # sync writes waiting for the group writer
        self._group: dict[str, Primary] = {}
        self._waiters: list[asyncio.Future[bool]] = []
        self._writer: asyncio.Task[None] | None = None
        # health
        self._down_until = 0.0   # monotonic: until then sync commits queue instead of waiting
        self.stats = stats
        for key in _STATS:
            stats.setdefault(key, 0)
        self._flush_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the store; StoreError (naming the masked DSN and the cause) if it cannot."""
        # a connection attempt per DSN (PostgreSQL tries them all), plus the schema
        budget = self._timeout * (1 + len(getattr(self.store, "dsns", ())))
        try:
            async with asyncio.timeout(budget):
                await self.store.open()
        except TimeoutError as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreTimeout(f"no answer within {budget:g}s",
                               store=self.store.kind, where=self.store.where) from exc
        log.info("store_opened", store=self.store.kind, where=self.store.where, mode=self.mode)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="store-flush"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="store-sweep"))

    async def close(self) -> None:
        """Stop the loops, write what is queued (bounded by the timeout), close the store."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._writer is not None:
            await asyncio.wait([self._writer])
        await self._flush()
        pending = len(self._writes) + len(self._deletes)
        if pending:
            log.error("store_unflushed", store=self.store.kind, sessions=pending)
        try:
            await self.store.close()
        except StoreError as exc:
            log.warning("store_close_failed", store=self.store.kind, error=str(exc))
        log.info("store_closed", store=self.store.kind)

    # --- called by the session manager --------------------------------------------------

    async def load(self, sid: str) -> State | None:
        """The stored state of a session found nowhere in memory (None: absent or expired)."""
        row = await self._call("load", self.store.load, sid, now=time.time())
        if row is _FAILED or row is None:
            return None
        try:
            state: State = row.state(store=self.store.kind, where=self.store.where)
        except StoreError as exc:
            self._failed("load", exc)
            return None
        self.stats["store_loaded"] += 1
        log.info("session_loaded", sid=short(sid), version=state["v"], store=self.store.kind)
        return state

    async def committed(self, record: Primary, *, changed: bool) -> bool:
        """After a commit (offload: before its replication): write or touch per the mode.
        True when this version of the session is in the store now (a sync write landed)."""
        sid = record.sid
        if not changed:
            if sid not in self._writes and sid not in self._group:
                self._touches[sid] = (record.last_access, record.max_inactive_s)
                self._queued()
            return False
        self._touches.pop(sid, None)
        if self.mode == "batched" or time.monotonic() < self._down_until:
            self._writes[sid] = record
            self._queued()
            return False
        self._writes.pop(sid, None)
        return await self.write(record)

    async def write(self, record: Primary) -> bool:
        """Write this record now, in the next group (True: it is in the store)."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._group[record.sid] = record
        self._waiters.append(fut)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups(), name="store-group-write")
        return await fut

    async def save_states(self, states: list[State]) -> bool:
        """Write these states now, as one batch (evictions); False if the store failed."""
        rows = [StoredSession.of(state) for state in states]
        if await self._call("save", self.store.save, rows) is _FAILED:
            return False
        self.stats["store_saved"] += len(rows)
        return True

    @property
    def failing(self) -> bool:
        """Has the store failed within the last flush interval?"""
        return time.monotonic() < self._down_until

    def pending(self, sid: str) -> bool:
        """Is a write of this session queued, not yet in the store?"""
        return sid in self._writes or sid in self._group

    async def invalidated(self, sid: str) -> None:
        """The session was invalidated: remove it (sync: before the response leaves)."""
        self._forget(sid)
        if self.mode == "batched":  # (offload: deleted before the response, as sync)
            self._deletes.add(sid)
            self._queued()
            return
        if self._writer is not None:  # an in-flight write of it must land first
            await asyncio.wait([self._writer])
        if await self._call("delete", self.store.delete, [sid]) is _FAILED:
            self._deletes.add(sid)
        else:
            self.stats["store_deleted"] += 1

    def expired(self, sids: list[str]) -> None:
        """Sessions expired in memory: drop their queued writes; the store removes them too."""
        for sid in sids:
            self._forget(sid)
            self._deletes.add(sid)
        if sids:
            self._queued()

    # --- writing ------------------------------------------------------------------------

    def _forget(self, sid: str) -> None:
        self._writes.pop(sid, None)
        self._touches.pop(sid, None)
        self._group.pop(sid, None)

    def _queued(self) -> None:
        if len(self._writes) + len(self._touches) + len(self._deletes) >= self._threshold:
            self._flush_now.set()

    async def _write_groups(self) -> None:
        """Write every sync commit waiting, as one batch, until none is left."""
        try:
            while self._group:
                group, waiters = self._group, self._waiters
                self._group, self._waiters = {}, []
                rows = [StoredSession.of(r.state()) for r in group.values()]
                saved = await self._call("save", self.store.save, rows) is not _FAILED
                if not saved:
                    for sid, record in group.items():
                        self._writes.setdefault(sid, record)  # retried by the next flush
                else:
                    self.stats["store_saved"] += len(rows)
                del rows  # (offload: their bodies are the size of the sessions)
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(saved)
        finally:
            self._writer = None
            for fut in self._waiters:  # only when cancelled mid-way
                if not fut.done():
                    fut.set_result(False)

    async def _flush(self) -> None:
        """Write the queued sessions, touches and deletes; keep what failed for next time."""
        writes, self._writes = self._writes, {}
        if writes:
            rows = [StoredSession.of(r.state()) for r in writes.values()]
            if await self._call("save", self.store.save, rows) is _FAILED:
                for sid, record in writes.items():
                    self._writes.setdefault(sid, record)
            else:
                self.stats["store_saved"] += len(rows)
        touches, self._touches = self._touches, {}
        if touches:
            if await self._call("touch", self.store.touch, touches) is _FAILED:
                for sid, item in touches.items():
                    old = self._touches.get(sid)
                    if old is None or old[0] < item[0]:
                        self._touches[sid] = item
            else:
                self.stats["store_touched"] += len(touches)
        deletes, self._deletes = self._deletes, set()
        if deletes:
            if await self._call("delete", self.store.delete, deletes) is _FAILED:
                self._deletes |= deletes
            else:
                self.stats["store_deleted"] += len(deletes)

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self._interval)
            self._flush_now.clear()
            await self._flush()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            removed = await self._call("sweep", self.store.sweep, now=time.time())
            if removed is not _FAILED and removed:
                self.stats["store_swept"] += removed
                log.info("store_swept", store=self.store.kind, sessions=removed)

    # --- failures -----------------------------------------------------------------------

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any,
                    **kwargs: Any) -> Any:
        """Run one store operation within the timeout; `_FAILED` (logged, counted) if not."""
        try:
            async with asyncio.timeout(self._timeout):
                return await fn(*args, **kwargs)
        except StoreError as exc:
            self._failed(op, exc)
        except TimeoutError:
            self._failed(op, StoreTimeout(f"{op}: no answer within {self._timeout:g}s",
                                          store=self.store.kind, where=self.store.where))
        except Exception as exc:  # a driver error the store did not translate: still no 500
            self._failed(op, exc)
        return _FAILED

    def _failed(self, op: str, exc: Exception) -> None:
        self.stats["store_errors"] += 1
        self._down_until = time.monotonic() + self._interval
        log.error("store_error", store=self.store.kind, op=op, error=str(exc),
                  error_type=type(exc).__name__)
