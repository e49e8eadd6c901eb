"""Store-backed membership: the view and the leases kept in an external store
(`cluster.membership = "redis"` or `"postgresql"`; docs/consistency.md, "Store-backed views").

The same surface `Membership` uses from `Quorum` (view, standing, voter, lease.lease_until,
take_events, tick/receive/heard/refused), with the store as the agreement and the clock. This
module holds what every store shares — the bookkeeping of the view, the events and the lease;
a subclass holds only the store calls (`store_redis.RedisView`, `store_postgres.PostgresView`).

Every heartbeat one atomic step in the store (`_exchange`) does, from the view it reads:

- removes the members whose lease is absent, expired by the store's clock, or names another
  process — only if this process's own run of renewals has lasted a whole grant;
- binds this process when it may (see below);
- writes the result as `n + 1` if anything changed (a compare-and-set on the number);
- renews this process's lease for a grant, `L·(1+ρ)/(1−ρ)` on the store's clock, only if the
  resulting view binds it; a lease records `since`, the store's time at which this process's
  unbroken run of renewals began.

Why a removal is safe: this process holds its lease until `sent + L` (its own clock, `sent`
taken before the renewal left) only if the store acknowledged the renewal; the store's lease
lasts a grant on its clock from a moment after `sent`, so when another member finds it ended,
the lease has ended whatever the two clock rates (within ρ). The remover must itself have
renewed without a gap for a whole grant: after an outage of the store (or of the remover's
own link to it) every server gets a grant's time to renew before anyone is removed.

A process binds itself (joins, or replaces its server's earlier process) only when no live
lease of its server exists — an earlier process's lease has ended — and only once it has
adopted a view that does not bind it (a process removed while stalled first sees its removal,
fences itself and drops its sessions, and joins in a later beat).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import structlog

from ..errors import ProtocolViolation
from .lease import grant_factor, lease_duration
from .quorum import Standing
from .view import RHO, Out, View, ViewChanged

__all__ = ["StoreView", "open_store_view"]

log = structlog.get_logger("tandem.quorum")


class _Held:
    """What `Membership` reads of the lease: until when (monotonic) it is held."""

    __slots__ = ("lease_until",)

    def __init__(self) -> None:
        self.lease_until = float("-inf")


class StoreView:
    """One server process's view and lease, kept in a store (a subclass per store)."""

    kind: ClassVar[str] = ""
    # Any failure of a store call (unreachable, a timeout, a refusal): no renewal.
    unavailable: ClassVar[tuple[type[BaseException], ...]] = (OSError, TimeoutError)

    def __init__(self, *, me: str, servers: Sequence[str], incarnation: str, cluster: str,
                 heartbeat_interval_s: float, missed_heartbeats: int,
                 rho: float = RHO) -> None:
        # configuration
        self.me = me
        self.incarnation = incarnation
        self.servers = tuple(servers)
        self.cluster = cluster
        self.heartbeat_s = heartbeat_interval_s
        self.duration_s = lease_duration(heartbeat_interval_s, missed_heartbeats)
        self.grant_ms = math.ceil(self.duration_s * grant_factor(rho) * 1000)
        # state
        # View 1 binds nobody (as in the embedded consensus): a placeholder until the store's
        # view is read; the first view the store holds is 2.
        self.view = View(1, (), ())
        self.learned = False
        self.lease = _Held()
        self._events: list[ViewChanged] = []
        self._next_beat = float("-inf")
        self._reachable = True

    # --- the store: what a subclass implements ------------------------------------------------

    async def _exchange(self, *, known: dict[str, Any] | None, may_join: bool
                        ) -> tuple[str | bytes | None, bool]:
        """The heartbeat's one atomic step (module docstring): (the view as JSON after it,
        None if the store holds none; whether our lease was renewed). `known`: the view we
        adopted (written again as `n + 1` if the store lost its view)."""
        raise NotImplementedError

    async def _release(self) -> None:
        """End our lease in the store now, only if it names our incarnation."""
        raise NotImplementedError

    async def _close_client(self) -> None:
        raise NotImplementedError

    # --- what the host reads (as from Quorum) ------------------------------------------------

    @property
    def voter(self) -> bool:
        return self.learned and self.view.binds(self.me, self.incarnation)

    @property
    def standing(self) -> Standing:
        if self.voter:
            return Standing.MEMBER
        if not self.learned or self.me in self.view.members:
            return Standing.STARTING
        return Standing.FENCED

    def holds_lease(self, now: float) -> bool:
        return self.voter and now < self.lease.lease_until

    def take_events(self) -> list[ViewChanged]:
        events, self._events = self._events, []
        return events

    # --- inputs (as to Quorum): peers' frames do not decide anything here -------------------

    def heard(self, peer: str, incarnation: str, now: float) -> list[Out]:
        return []

    def refused(self, peer: str, now: float) -> list[Out]:
        return []  # only the store's expiry proves a lease ended

    def receive(self, src: str, msg: dict[str, Any], now: float) -> list[Out]:
        return []  # no peer runs the embedded consensus in a store-backed cluster

    def tick(self, now: float) -> list[Out]:
        return []  # the store is asked in `beat`, awaited by the host

    # --- the heartbeat -------------------------------------------------------------------------

    async def beat(self, now: float) -> None:
        """Once per heartbeat: renew, remove the ended, bind ourselves; adopt the result."""
        if now < self._next_beat:
            return
        self._next_beat = now + self.heartbeat_s
        sent = now  # before the renewal leaves: the lease counts from here
        known = self.view.to_wire() if self.learned else None
        try:
            raw, renewed = await asyncio.wait_for(
                self._exchange(known=known, may_join=not self.voter), timeout=self.heartbeat_s)
        except self.unavailable as exc:
            if self._reachable:
                log.warning("membership_store_unreachable", store=self.kind,
                            error=type(exc).__name__, detail=str(exc)[:200])
            self._reachable = False
            return
        if not self._reachable:
            log.info("membership_store_reachable", store=self.kind)
        self._reachable = True
        if isinstance(raw, bytes):
            raw = raw.decode()
        if not raw:
            return  # no view yet and we may not create it (we are bound in one we know)
        try:
            view = View.from_wire(json.loads(raw), peer="store")
        except (ValueError, ProtocolViolation):
            log.error("membership_store_malformed_view", store=self.kind, view=raw[:200])
            return  # no lease on a view we cannot read
        if self.learned and view.number < self.view.number:
            # The store lost acknowledged writes (a flushed or failed-over store): no lease
            # on a view older than one we adopted.
            log.error("membership_store_behind", store=self.kind, stored=view.number,
                      ours=self.view.number)
            return
        self._adopt(view)
        if renewed and view.binds(self.me, self.incarnation):
            self.lease.lease_until = max(self.lease.lease_until, sent + self.duration_s)

    def _adopt(self, view: View) -> None:
        if self.learned and view.number <= self.view.number:
            return
        old, self.view, self.learned = self.view, view, True
        if not view.binds(self.me, self.incarnation):
            self.lease.lease_until = float("-inf")
        self._events.append(ViewChanged(old, view))
        log.info("view_adopted", n=view.number, members=view.members, me=self.me)

    async def close(self) -> None:
        """We stopped acknowledging (the host's `start_leaving`): end our lease in the store
        at once, so the others remove us without waiting for its expiry."""
        try:
            if self.voter:
                await asyncio.wait_for(self._release(), timeout=self.heartbeat_s)
        except self.unavailable:
            pass  # it expires by itself
        finally:
            await self._close_client()


def open_store_view(kind: str, *, url: str, **options: Any) -> StoreView:
    """The store-backed view for `cluster.membership = kind`; its driver is imported only
    here (redis and asyncpg are optional dependencies)."""
    if kind == "redis":
        from .store_redis import RedisView
        return RedisView(url=url, **options)
    if kind == "postgresql":
        from .store_postgres import PostgresView
        return PostgresView(dsn=url, **options)
    raise ValueError(f"no store-backed membership {kind!r}")
