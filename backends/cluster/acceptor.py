"""The acceptor side of the view consensus: promises, accepts, and the refusal rule (I2).

One `Acceptor` per `Quorum`, voting in instance `view + 1` only, and only while the view
binds our process (see `backends.cluster.quorum` for why). Its state is forgotten when a
view is adopted: every instance up to that view is decided.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from ..errors import ProtocolViolation
from .view import Ballot, Out, View, ballot_from_wire

if TYPE_CHECKING:
    from .quorum import Quorum

__all__ = ["Acceptor", "Refusal"]

log = structlog.get_logger("tandem.quorum")

# Why a value is refused, and the members it is about: ("not_suspected", ["s2"]).
Refusal = tuple[str, list[str]]


class Acceptor:
    """Our promise and accepted value for the next view."""

    def __init__(self, member: Quorum) -> None:
        self.member = member  # the server we vote for: its view, sightings, lease
        self.promised: Ballot | None = None
        self.accepted: tuple[Ballot, View] | None = None
        self.accepted_at = 0.0  # our clock: an undecided value is finished after a while

    def reset(self) -> None:
        """A view was adopted: the instance we voted in is decided."""
        self.promised = self.accepted = None

    def _open(self, n: int) -> bool:
        """Do we vote in instance `n`? (Other instances were answered by the view sync.)"""
        return n == self.member.view.number + 1 and self.member.voter

    # --- messages ---------------------------------------------------------------------------

    def on_prepare(self, src: str, inc: str, vn: int, m: dict[str, Any],
                   now: float) -> list[Out]:
        q = self.member
        n, b = int(m["n"]), ballot_from_wire(m["b"], peer=src)
        if not self._open(n):
            return [q.nack(src, n, b, "not_voter")] if n == q.view.number + 1 else []
        q.proposer.saw_round(b[0])
        if self.promised is not None and b < self.promised:
            return [q.nack(src, n, b, "promised", promised=list(self.promised))]
        self.promised = b
        acc = [list(self.accepted[0]), self.accepted[1].to_wire()] if self.accepted else None
        return [q.msg(src, "v_promise", n=n, b=list(b), acc=acc)]

    def on_accept(self, src: str, inc: str, vn: int, m: dict[str, Any],
                  now: float) -> list[Out]:
        q = self.member
        n, b = int(m["n"]), ballot_from_wire(m["b"], peer=src)
        value = View.from_wire(m["value"], peer=src)
        if value.number != n:
            raise ProtocolViolation(f"value of view {value.number} in instance {n}", peer=src)
        if not self._open(n):
            return [q.nack(src, n, b, "not_voter")] if n == q.view.number + 1 else []
        refusal = self.accept(b, value, now, recovered=bool(m.get("rec")))
        if refusal is not None:
            return [q.nack(src, n, b, refusal[0], members=refusal[1],
                           promised=list(self.promised) if self.promised else None)]
        return [q.msg(src, "v_accepted", n=n, b=list(b), value=value.to_wire())]

    # --- the rules --------------------------------------------------------------------------

    def accept(self, b: Ballot, value: View, now: float, *, recovered: bool) -> Refusal | None:
        """Accept (b, value) for the next view, or say why not.

        `recovered`: the proposer took the value from a promise, not from its own wishes.
        """
        if self.promised is not None and b < self.promised:
            return ("promised", [])
        refusal = self.refusal(value, now, recovered=recovered)
        if refusal is not None:
            log.debug("view_refused", n=value.number, reason=refusal[0], members=refusal[1])
            return refusal
        self.promised = b
        self.accepted = (b, value)
        self.accepted_at = now
        if self.member.on_accept is not None:
            self.member.on_accept(b, value)
        return None

    def refusal(self, value: View, now: float, *, recovered: bool) -> Refusal | None:
        """Why we refuse `value` for the next view (None: we accept it)."""
        q = self.member
        old, new = q.view.bindings(), value.bindings()
        mine = new.get(q.me)
        if mine is None or (mine != q.incarnation and q.view.bound):
            return ("drops_me", [q.me])
        if mine != q.incarnation and q.lease.holds_lease(now):
            # Only in view 1: an undecided first view binding an earlier process of our
            # server must stay decidable — once no lease of ours depends on the current one.
            return ("holds_lease", [q.me])
        bad = [m for m, inc in new.items() if m not in q.servers or not inc]
        if bad:
            return ("malformed", bad)
        if not q.view.bound and len(new) != len(old):
            # Instance 2 needs every member: a removal could never be decided, and once
            # accepted anywhere it would have to be proposed again and again.
            return ("first_view_keeps_all", [m for m in old if m not in new])
        if not recovered:
            # Liveness only (a dead joiner costs a removal later): a value some acceptor
            # already accepted may have been decided, and must stay acceptable.
            unreachable = [m for m, inc in new.items() if m != q.me and old.get(m) != inc
                           and not q.sightings.reachable(m, inc, now)]
            if unreachable:
                return ("unreachable", unreachable)
        objections: dict[str, list[str]] = {}
        for m, inc in old.items():
            reason: str | None = None
            if m == q.me:
                continue
            if inc and new.get(m) != inc:
                reason = self.why_keep(m, inc, now)
            elif not inc and any(until > now and x != new[m] and not q.sightings.is_dead(m, x)
                                 for x, until in q.lease.grants_to(m).items()):
                reason = "lease_granted"  # view 1 binds m to a process other than one we vouch for
            if reason is not None:
                objections.setdefault(reason, []).append(m)
        return next(iter(objections.items()), None)

    def why_keep(self, member: str, inc: str, now: float) -> str | None:
        """Why we may not vote that process out now (None: we may)."""
        q = self.member
        if q.sightings.is_dead(member, inc):
            return None  # a dead process holds no lease
        if not q.sightings.suspects(member, now, inc):
            return "not_suspected"
        if q.lease.granted_until(member, inc) > now:
            return "lease_granted"
        if now - q.learned_at < q.lease.grant_s:
            return "view_too_recent"  # a lease of the previous view may still run
        return None
