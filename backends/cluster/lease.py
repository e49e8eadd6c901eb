"""Leases: a member may acknowledge writes only while a majority of its view vouches for it.

Sans-IO bookkeeping, driven by `backends.cluster.quorum.Quorum`, which decides *whether* a
member may count itself or grant from its Paxos state (neither while it has accepted a value
for the next view that is not decided yet; the lease argument is in quorum.py). The host
reads `Quorum.holds_lease`.

Asker: every heartbeat a member sends `l_ask(seq, vn)` to every other member of its view `vn`
and remembers when (`sent`, its own clock). It holds a lease until `sent + L` for the latest
ask whose grants, itself included, reach a majority of view `vn` — all of it in view 1, the
cluster's start, where a process cannot tell a first start from a restart: two restarted
processes of three would otherwise vouch for each other in a view 1 the others have left.

Grantor: grants (`l_grant(seq)`) an ask made in its own current view by a member bound in it,
and records `grant_until[asker] = received + L·(1+ρ)/(1−ρ)`. While that runs it refuses to
vote for the asker's removal (`backends.cluster.acceptor`). The factor is the exact form
of the design's `1 + 2ρ`: the asker's `L` may last `L/(1−ρ)` of real time on a slow clock,
and the grantor's interval at least `grant/(1+ρ)` on a fast one.

`L = heartbeat_interval_s × (missed_heartbeats − 1)`: shorter than the silence after which a
peer is suspected (`heartbeat_interval_s × missed_heartbeats`), so a member cut off from the
majority stops acknowledging before the majority may remove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .view import RHO, Out, View

__all__ = ["Lease", "lease_duration", "grant_factor"]

# Asks older than this many lease durations can no longer extend the lease: forgotten.
_KEEP_ASKS = 1.0


def lease_duration(heartbeat_interval_s: float, missed_heartbeats: int) -> float:
    """L: how long a majority's grants let a member acknowledge, by its own clock."""
    return heartbeat_interval_s * (missed_heartbeats - 1)


def grant_factor(rho: float = RHO) -> float:
    """How much longer a grantor honours a grant than the asker relies on it."""
    return (1 + rho) / (1 - rho)


@dataclass(slots=True)
class _Ask:
    sent: float
    view: View  # the asker's view when it asked: grants count against its members
    granted: set[str] = field(default_factory=set)


class Lease:
    """One server's side of the leases: what it asked and holds, what it granted."""

    def __init__(self, *, me: str, incarnation: str, duration_s: float,
                 rho: float = RHO) -> None:
        # configuration
        self.me = me
        self.incarnation = incarnation
        self.duration_s = duration_s
        self.grant_s = duration_s * grant_factor(rho)
        # asker side
        self._seq = 0
        self._asks: dict[int, _Ask] = {}
        self._until = float("-inf")
        self._lease_view = 0  # the view number the lease held now was granted in
        # grantor side: (asker, its incarnation) -> end of our grant, our clock
        self._grants: dict[tuple[str, str], float] = {}

    # --- asker ------------------------------------------------------------------------------

    def ask(self, view: View, now: float, *, self_grant: bool) -> list[Out]:
        """A new round of asks to every other member of `view`.

        `self_grant` is False while this member has accepted a value for the next view that
        is not decided yet: its own vote then no longer vouches for it (see quorum.py).
        """
        if not view.binds(self.me, self.incarnation):
            return []
        self._seq += 1
        ask = _Ask(sent=now, view=view)
        if self_grant:
            ask.granted.add(self.me)
        self._asks[self._seq] = ask
        horizon = now - self.duration_s * _KEEP_ASKS
        for seq in [s for s, a in self._asks.items() if a.sent < horizon]:
            del self._asks[seq]
        self._count(ask)
        msg = {"op": "l_ask", "seq": self._seq}
        return [(m, dict(msg)) for m in view.members if m != self.me]

    def on_grant(self, src: str, src_incarnation: str, seq: int, view_number: int) -> None:
        ask = self._asks.get(seq)
        if (ask is None or ask.view.number != view_number
                or not ask.view.binds(src, src_incarnation)):
            return  # too old, or not an answer to this ask from a member of its view
        ask.granted.add(src)
        self._count(ask)

    def _count(self, ask: _Ask) -> None:
        # A majority of a bound view; all of view 1, where processes that restarted cannot
        # tell themselves from a cluster's first start (two of them would make a majority).
        if len(ask.granted) >= ask.view.votes_needed:
            if ask.sent + self.duration_s > self._until:
                self._until = ask.sent + self.duration_s
                self._lease_view = ask.view.number

    def holds_lease(self, now: float) -> bool:
        """May this member acknowledge a write now (by its own clock)?"""
        return now < self._until

    @property
    def lease_view(self) -> int:
        """The number of the view whose majority granted the lease held (0: none yet)."""
        return self._lease_view

    @property
    def lease_until(self) -> float:
        return self._until

    def view_changed(self, view: View) -> None:
        """A lease ends when its holder leaves the view (removed, or another process bound)."""
        if not view.binds(self.me, self.incarnation):
            self._until = float("-inf")
            self._asks.clear()

    # --- grantor ----------------------------------------------------------------------------

    def grant(self, src: str, src_incarnation: str, seq: int, view: View,
              now: float) -> list[Out]:
        """Grant `src`'s ask; the caller checked that it may (same view, both bound)."""
        key = (src, src_incarnation)
        self._grants[key] = max(self._grants.get(key, float("-inf")), now + self.grant_s)
        return [(src, {"op": "l_grant", "seq": seq})]

    def granted_until(self, peer: str, incarnation: str = "") -> float:
        """When our grant to `peer` ends ("" = to any process of it): the removal check."""
        ends = [until for (p, inc), until in self._grants.items()
                if p == peer and incarnation in ("", inc)]
        return max(ends, default=float("-inf"))

    def grants_to(self, peer: str) -> dict[str, float]:
        """Our grants to each process of `peer`: incarnation -> end."""
        return {inc: until for (p, inc), until in self._grants.items() if p == peer}

    def forget_grants_before(self, now: float) -> None:
        for key in [k for k, until in self._grants.items() if until <= now]:
            del self._grants[key]
