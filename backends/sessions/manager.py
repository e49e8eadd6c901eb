"""The sessions of one backend server, as the rest of the server sees them.

`SessionManager` composes components with one job each, sharing a `Context`
(docs/architecture.md, "Sessions"):

| component | file | its job |
|---|---|---|
| `Opener` | opening.py | a request's token → the primary record, taken over if need be |
| `Committer` | committing.py | a request's changes → the primary and its secondary |
| `ReplicaSide` | replica.py | the peers' messages (replicate, fetch, release, ...) |
| `Handover` | handover.py | drain, take-over by a peer, rebalancing |
| `Failover` | failover.py | membership changes → promotions, re-protection |
| `Expiry` | expiry.py | touch and expiry loops |
| `AppSessions` | app_sessions.py | application sessions, read and written at their primary |

Changes are committed when the handler has completed: applied to the primary and, with
`session.replication = "sync"`, acknowledged by the secondary before the response leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.logs import short

from ..cluster.membership import Membership
from ..errors import SessionMoved
from ..persistence.persister import Persister
from ..serve.looplag import LoopLag
from ..tasks import cancel_and_wait
from .app_sessions import AppSessions
from .committing import CommitResult, Committer
from .context import Context
from .expiry import Expiry
from .failover import Failover
from .handover import Handover
from .opening import Opener
from .promotion import Promotion
from .replica import ReplicaSide
from .session import Session
from .store import LocalStore, Primary

__all__ = ["SessionManager", "CommitResult", "SessionMoved"]

log = structlog.get_logger("tandem.sessions")


class SessionManager:
    """Sessions of one server: resolve tokens, commit changes, replicate, expire."""

    def __init__(self, *, config: Config, me: str, membership: Membership) -> None:
        self.ctx = ctx = Context(config=config, me=me, membership=membership)
        self.committer = Committer(ctx)
        ctx.promotion = Promotion(ctx, self.committer)
        self.expiry = Expiry(ctx)
        self.opener = Opener(ctx, self.committer, self.expiry)
        self.handover = Handover(ctx, self.committer)
        self.replica_side = ReplicaSide(ctx, self.handover)
        self.failover = Failover(ctx, self.committer)
        # application sessions: records of the same store, read and written at their primary
        self.app_sessions = ctx.apps = AppSessions(ctx, self.committer, self.expiry)
        if config.sites:
            from ..sites import Sites  # (builds on this package)
            ctx.sites = Sites(ctx, self.committer)
        self.sites = ctx.sites
        self._tasks: list[asyncio.Task[None]] = []
        self.loop_lag = LoopLag()  # how long the loop is held (GET /__tandem/health)
        membership.on_change(self.failover.peer_changed)
        membership.on_view_change(self.failover.view_changed)
        # What the server reads, fixed for the server's life. The per-request and
        # per-message calls go straight to their component (no facade call on the path).
        self.config: Config = ctx.config
        self.me: ServerConfig = ctx.me
        self.mode: str = ctx.mode
        self.membership: Membership = ctx.membership
        self.store: LocalStore = ctx.store
        self.stats: dict[str, int] = ctx.stats
        self.persister: Persister | None = ctx.persister
        self.new_session: Callable[[], Primary] = self.opener.new_session
        self.open: Callable[..., Awaitable[Primary | None]] = self.opener.open
        self.planned_secondary: Callable[[Primary], str | None] = (
            self.committer.planned_secondary)
        self.handle: Callable[[str, dict[str, Any]], Any] = self.replica_side.handle

    @property
    def draining(self) -> bool:
        return self.ctx.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.ctx.draining = value

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.app_sessions.start()
        self._tasks.append(asyncio.create_task(self.loop_lag.run(), name="loop-lag"))
        self._tasks.append(asyncio.create_task(self.expiry.sweep_loop(), name="session-sweeper"))
        self._tasks.append(asyncio.create_task(self.expiry.touch_loop(), name="session-touch"))
        if self.ctx.mode == "async":
            self._tasks.append(asyncio.create_task(self.committer.async_loop(),
                                                   name="async-replication"))
        if self.ctx.persister is not None:
            self.ctx.persister.start()
        if self.ctx.budget is not None:
            self.ctx.budget.start()

    async def close(self) -> None:
        if self.ctx.mode == "async":
            await self.committer.flush_async()  # what was acknowledged goes out before we stop
        await self.ctx.promotion.close()
        await cancel_and_wait(self._tasks)
        if self.ctx.budget is not None:
            await self.ctx.budget.close()
        if self.ctx.persister is not None:  # batched writes flushed, then the store closed
            await self.ctx.persister.close()

    async def drain(self, *, timeout: float) -> None:
        """Hand every primary to its secondary and let the primaries re-home our replicas."""
        await self.handover.drain(timeout=timeout)

    # --- per request --------------------------------------------------------------------

    async def commit(self, session: Session, *, discard: bool = False,
                     rid: str | None = None, migrate: bool = False) -> CommitResult:
        """Apply the request's changes and replicate them (sync: acknowledged first); with
        `migrate`, an overloaded server may hand the session on (the new token says where).
        Its application sessions' writes are committed first, each at its primary: a request
        whose session commit fails is retried with them applied once (app_sessions.py)."""
        apps = session.app_sessions_open
        if apps and not discard:
            await self.app_sessions.commit(list(apps.values()), rid=rid)
        result = await self.committer.commit(session, discard=discard, rid=rid)
        record = session.record
        if migrate and result.route is not None and record is not None:
            peer = self.handover.migration_target(record)
            if peer is not None:
                moved = await self.handover.hand_over(record, peer, timeout=self.ctx.timeout)
                if moved is not None:
                    self.ctx.stats["migrated"] += 1
                    log.info("session_migrated", sid=short(record.sid), to=peer)
                    return CommitResult(moved)
        return result
