"""What the session components of one server share: its configuration, the local store,
the membership, the counters, and the few channel helpers they all use.

The components (docs/architecture.md, "Sessions"): `Opener` (opening and taking over),
`Committer` (committing and replicating), `ReplicaSide` (the peers' messages),
`Handover` (drain, take-over, rebalancing), `Failover` (reacting to membership changes)
and `Expiry` (touch and expiry). `SessionManager` composes them.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from tandem.config import Config, ServerConfig

from ..cluster.membership import Membership
from ..cluster.ranking import choose_secondary
from ..errors import PeerTimeout, PeerUnavailable
from ..persistence.persister import Persister, make_persister
from .budget import Budget
from .store import LocalStore, Primary
from .taken_over import TakenOver

if TYPE_CHECKING:  # (backends.sites builds on the sessions package)
    from ..sites import Sites
    from .app_sessions import AppSessions
    from .promotion import Promotion

__all__ = ["Context", "age", "STAT_NAMES"]

_EPOCH_STRIDE = 1024  # epochs are unique per server: k * stride + the server's index

STAT_NAMES = ("created", "promoted", "fetched", "lost", "replicated", "replication_failures",
              "expired", "invalidated", "moved", "handed_over", "taken_over", "superseded",
              "retries_rolled_back", "migrated", "forwarded", "forward_fallbacks")


def age(state: dict[str, Any]) -> tuple[int, int]:
    """How recent a copy is: (epoch, version) — a newer epoch wins over any version."""
    return int(state.get("e", 0)), int(state["v"])


class Context:
    """State and helpers shared by the session components of one server."""

    def __init__(self, *, config: Config, me: str, membership: Membership) -> None:
        # configuration
        self.config = config
        self.me: ServerConfig = config.server(me)
        self.index = config.server_ids.index(me)
        self.debug = os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper() == "DEBUG"
        self.mode = config.session.replication
        self.timeout = config.cluster.replication_timeout_s
        # the server's sessions, and who it talks to
        self.membership = membership
        self.store = LocalStore(max_inactive_s=config.session.max_inactive_s)
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        # session.persistence: where sessions found nowhere in memory are loaded from
        self.persister: Persister | None = make_persister(config, stats=self.stats)
        # persistence.mode = "offload": the store is the home of the state, written before
        # replication; session.max_memory_mb: records past it evicted to stubs
        # (sessions/budget.py). None: neither (no accounting on the request path).
        self.offload = self.persister is not None and self.persister.mode == "offload"
        limit = config.session.max_memory_mb * 1024 * 1024
        self.budget: Budget | None = None
        if limit or self.offload:
            self.budget = Budget(limit_bytes=limit, store=self.store, persister=self.persister,
                                 offload=self.offload, stats=self.stats, me=me,
                                 sweep_interval_s=max(0.5, min(
                                     60.0, config.session.max_inactive_s / 10)))
        # requests taking a session over right now: sid -> the record they will produce
        self.opening: dict[str, asyncio.Future[Primary | None]] = {}
        # sessions taken over from a peer that was unreachable or ended: peer -> their ids
        # and our epochs (taken_over.py), told to that peer when it is back (made now for
        # the peers of the file: a list made at start-up is never walked by the cycle
        # collector's young runs, and a promotion puts a million items in one)
        self.superseded: dict[str, TakenOver] = {
            s.id: TakenOver() for s in config.servers if s.id != me}
        # where the sessions we handed on went (a stale token still finds them)
        self.moved_to: dict[str, str] = {}
        # the peers' primary counts, from their load reports (rebalancing)
        self.loads: dict[str, int] = {}
        # last accesses to tell each secondary about: secondary -> sid -> last_access
        self.touched: dict[str, dict[str, float]] = {}
        self.draining = False
        # the remote sites' copies ([[sites]], docs/sites.md): set by the manager
        self.sites: Sites | None = None
        # the application sessions (app_sessions.py): set by the manager
        self.apps: AppSessions | None = None
        # promotions and re-protections under way (promotion.py): set by the manager
        self.promotion: Promotion

    def taken_over(self, peer: str) -> TakenOver:
        """What we took over from `peer` (added to by promotions and take-overs)."""
        taken = self.superseded.get(peer)
        if taken is None:
            taken = self.superseded[peer] = TakenOver()
        return taken

    def next_epoch(self, after: int, *, view: int | None = None) -> int:
        """An epoch newer than `after` that no other server can produce (no ties), from
        the number of the view it is made in (current by default): a promotion in a later
        view orders after every copy of the views before it."""
        if view is None:
            view = self.membership.quorum.view.number
        return (max(after // _EPOCH_STRIDE + 1, view)) * _EPOCH_STRIDE + self.index

    def choose_secondary(self, *, besides: frozenset[str] = frozenset(),
                         peers: list[ServerConfig] | None = None) -> str | None:
        """The live peer to hold a new copy (by rank), other than those in `besides`
        (`peers`: the live peers, when the caller has them already)."""
        if peers is None:
            peers = self.membership.alive_peers()
        if besides:
            peers = [p for p in peers if p.id not in besides]
        chosen = choose_secondary(self.me, peers, self.store.replica_counts)
        return None if chosen is None else chosen.id

    # --- the replication channel --------------------------------------------------------

    def send(self, peer: str, msg: dict[str, Any]) -> None:
        link = self.membership.links.get(peer)
        if link is not None:
            link.send(msg)

    def peer_error(self, peer: str, exc: Exception) -> None:
        link = self.membership.links.get(peer)
        if link is not None:
            link.fail(str(exc))

    async def call_quietly(self, peer: str, msg: dict[str, Any]) -> None:
        link = self.membership.links.get(peer)
        if link is None:
            return
        try:
            await link.call(msg, timeout=self.timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            self.peer_error(peer, exc)
