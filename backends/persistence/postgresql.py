"""Sessions in PostgreSQL through asyncpg, over a list of DSNs tried in order.

`persistence.dsns` is a multi data source with the failover algorithm: every operation goes
to the first DSN that is not marked failed; a DSN whose connection fails is marked failed
and the next one is tried within the same operation, so losing one database costs no
write. A failed DSN is probed in the background every `_PROBE_S` (never on a request's
path); once it answers again, writes go back to it. Loads try every
reachable DSN in order (a session written during a failover lives on a later one) and copy
what they find to the current one; deletes go to every reachable DSN so an invalidated
session cannot be found again on another. The table is created if missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import structlog

from .base import StoredSession, map_errors, mask
from .errors import StoreError, StoreUnavailable

__all__ = ["PostgresStore"]

log = structlog.get_logger("tandem.persistence")

T = TypeVar("T")

_PROBE_S = 2.0         # how often a failed DSN is probed
_POOL_MAX = 4          # connections per DSN: the persister writes in groups, one at a time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tandem_sessions (
    sid            text PRIMARY KEY,
    version        bigint NOT NULL,
    body           text NOT NULL,
    last_access    double precision NOT NULL,
    max_inactive_s double precision NOT NULL,
    expires_at     double precision NOT NULL,
    epoch          bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tandem_sessions_expires_at ON tandem_sessions (expires_at);
"""

_UPSERT = """
INSERT INTO tandem_sessions AS t
    (sid, version, body, last_access, max_inactive_s, epoch, expires_at)
VALUES ($1, $2, $3, $4::float8, $5::float8, $6, $4::float8 + $5::float8)
ON CONFLICT (sid) DO UPDATE SET
    version = EXCLUDED.version,
    epoch = EXCLUDED.epoch,
    body = EXCLUDED.body,
    last_access = GREATEST(t.last_access, EXCLUDED.last_access),
    max_inactive_s = EXCLUDED.max_inactive_s,
    expires_at = GREATEST(t.last_access, EXCLUDED.last_access) + EXCLUDED.max_inactive_s
WHERE (t.epoch, t.version) <= (EXCLUDED.epoch, EXCLUDED.version)
"""

_TOUCH = """
UPDATE tandem_sessions AS t SET last_access = u.a, expires_at = u.a + t.max_inactive_s
FROM unnest($1::text[], $2::float8[]) AS u(sid, a)
WHERE t.sid = u.sid AND t.last_access < u.a
"""

_LOAD = """
SELECT sid, version, body, last_access, max_inactive_s, epoch FROM tandem_sessions
WHERE sid = $1 AND expires_at >= $2
"""

# A connection that fails like this says nothing about the SQL: try the next DSN.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


class PostgresStore:
    """`session.persistence = "postgresql"`."""

    kind = "postgresql"

    def __init__(self, *, dsns: Sequence[str], connect_timeout_s: float = 2.0) -> None:
        if not dsns:
            raise ValueError("at least one DSN is required")
        # configuration
        self.dsns = tuple(dsns)
        self.masked = tuple(mask(d) for d in self.dsns)
        self.where = ", ".join(self.masked)
        self._connect_timeout_s = connect_timeout_s
        # per-DSN state
        self._pools: dict[int, asyncpg.Pool] = {}
        self._failed: set[int] = set()     # marked failed: skipped until a probe succeeds
        self._prober: asyncio.Task[None] | None = None
        self._current: int | None = None   # the DSN writes went to last

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        causes: list[str] = []
        for i in range(len(self.dsns)):
            try:
                await self._pool(i)
            except StoreUnavailable as exc:
                causes.append(f"{self.masked[i]}: {exc.__cause__ or exc}")
                self._mark_failed(i, exc, op="open")
        if len(causes) == len(self.dsns):
            raise StoreUnavailable("no DSN reachable (" + "; ".join(causes) + ")",
                                   store=self.kind, where=self.where)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            try:
                await pool.close()
            except _CONNECTION_ERRORS:
                pool.terminate()

    async def _pool(self, i: int) -> asyncpg.Pool:
        pool = self._pools.get(i)
        if pool is not None:
            return pool
        with map_errors(self.kind, self.masked[i], unavailable=(Exception,)):
            pool = await asyncpg.create_pool(
                self.dsns[i], min_size=1, max_size=_POOL_MAX, timeout=self._connect_timeout_s,
                max_inactive_connection_lifetime=60.0)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    # servers starting together must not race on CREATE TABLE
                    await conn.execute("SELECT pg_advisory_xact_lock(7410431202)")
                    await conn.execute(_SCHEMA)
            except BaseException:
                pool.terminate()
                raise
        self._pools[i] = pool
        return pool

    # --- operations ---------------------------------------------------------------------

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        found: StoredSession | None = None
        reached: list[int] = []
        for i in self._order():
            row = await self._on(i, "load", lambda c: c.fetchrow(_LOAD, sid, now))
            if row is _FAILED:
                continue
            reached.append(i)
            if row is not None:
                found = StoredSession(*row)
                break
        if not reached:
            raise self._all_failed("load")
        if found is not None and reached[0] != reached[-1]:
            # found on a later DSN than the preferred one: bring it over (best effort)
            row = found
            await self._on(reached[0], "copy", lambda c: c.execute(_UPSERT, *row))
        return found

    async def save(self, rows: Sequence[StoredSession]) -> None:
        # sorted: concurrent writers lock rows in the same order (no deadlock)
        args = [tuple(r) for r in sorted(rows)]
        await self._first("save", lambda c: c.executemany(_UPSERT, args))

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        sids = sorted(items)
        times = [items[s][0] for s in sids]
        await self._first("touch", lambda c: c.execute(_TOUCH, sids, times))

    async def delete(self, sids: Collection[str]) -> None:
        keys = sorted(sids)
        done = 0
        for i in self._order():
            res = await self._on(i, "delete", lambda c: c.execute(
                "DELETE FROM tandem_sessions WHERE sid = ANY($1::text[])", keys))
            done += res is not _FAILED
        if not done:
            raise self._all_failed("delete")

    async def sweep(self, *, now: float) -> int:
        removed = 0
        for i in self._order():
            res = await self._on(i, "sweep", lambda c: c.execute(
                "DELETE FROM tandem_sessions WHERE expires_at < $1", now))
            if isinstance(res, str):  # "DELETE 12"
                removed += int(res.rsplit(" ", 1)[-1])
        return removed

    # --- DSN choice ---------------------------------------------------------------------

    def _order(self) -> list[int]:
        """DSN indexes to try: those not marked failed in configured order (all if none)."""
        good = [i for i in range(len(self.dsns)) if i not in self._failed]
        return good or list(range(len(self.dsns)))

    async def _first(self, op: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        for i in self._order():
            res = await self._on(i, op, fn)
            if res is not _FAILED:
                if self._current != i:
                    if self._current is not None:
                        log.warning("store_failover", store=self.kind, op=op,
                                    from_=self.masked[self._current], to=self.masked[i])
                    self._current = i
                return cast(T, res)
        raise self._all_failed(op)

    async def _on(self, i: int, op: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]]
                  ) -> Any:
        """Run `fn` on DSN `i`; `_FAILED` if its connection failed (it is marked failed)."""
        try:
            pool = await self._pool(i)
            with map_errors(self.kind, self.masked[i], unavailable=_CONNECTION_ERRORS,
                            other=(asyncpg.PostgresError,)):
                async with pool.acquire(timeout=self._connect_timeout_s) as conn:
                    result = await fn(conn)
            self._failed.discard(i)  # tried because every DSN was marked: it is back
            return result
        except StoreUnavailable as exc:
            self._mark_failed(i, exc, op=op)
            return _FAILED

    def _mark_failed(self, i: int, exc: StoreError, *, op: str) -> None:
        self._failed.add(i)
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_loop(), name="postgresql-probe")
        pool = self._pools.pop(i, None)
        if pool is not None:
            pool.terminate()
        log.warning("store_dsn_failed", store=self.kind, dsn=self.masked[i], op=op,
                    error=str(exc.__cause__ or exc))

    async def _probe_loop(self) -> None:
        """Bring failed DSNs back once they answer."""
        while self._failed:
            await asyncio.sleep(_PROBE_S)
            for i in sorted(self._failed):
                try:
                    pool = await self._pool(i)
                    with map_errors(self.kind, self.masked[i], unavailable=_CONNECTION_ERRORS,
                                    other=(asyncpg.PostgresError,)):
                        async with asyncio.timeout(self._connect_timeout_s):
                            await pool.fetchval("SELECT 1")
                except StoreError:
                    pool = self._pools.pop(i, None)
                    if pool is not None:
                        pool.terminate()
                    continue
                self._failed.discard(i)
                log.info("store_dsn_back", store=self.kind, dsn=self.masked[i])

    def _all_failed(self, op: str) -> StoreUnavailable:
        return StoreUnavailable(f"{op}: no DSN reachable", store=self.kind, where=self.where)


_FAILED: Any = object()
