"""The proposer side of the view consensus: what to propose, when, and driving a ballot.

A member wants a change (`desired`) when it may vote a bound process out (suspected, no
lease of ours running, our view old enough — or proven dead), when a restarted or removed
server asked to join and is reachable, when the operator asked, or when an instance it
accepted a value in stays undecided (it then finishes it, with no change if the promises
allow). The lowest-indexed member that is not suspected proposes first; each other waits
one heartbeat per rank, so that members that all saw the same failure do not duel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from .view import Ballot, Out, View, ballot_from_wire

if TYPE_CHECKING:
    from .quorum import Quorum

__all__ = ["Proposer"]

log = structlog.get_logger("tandem.quorum")

# An attempt that has not decided within this many heartbeats is abandoned and retried.
_ATTEMPT_HEARTBEATS = 2.0
# An accepted value not decided within this many heartbeats is finished by its acceptor.
_FINISH_HEARTBEATS = 2.0
# Retry after acceptors refused to remove a process we have proof of death for (seconds).
_PROVEN_RETRY_S = 0.005


@dataclass(slots=True)
class _Attempt:
    """One ballot of ours for instance `n`."""

    n: int
    ballot: Ballot
    own: View                        # the value we want, used if the promises leave us free
    deadline: float
    value: View | None = None        # phase 2: the value we asked to be accepted
    recovered: bool = False          # ... taken from a promise, not our own
    promises: dict[str, tuple[Ballot, View] | None] = field(default_factory=dict)
    accepts: set[str] = field(default_factory=set)
    refusals: set[str] = field(default_factory=set)


class Proposer:
    """Our ballots for the next view."""

    def __init__(self, member: Quorum) -> None:
        self.member = member
        self.attempt: _Attempt | None = None
        self.round = 0  # the highest round seen: our next ballot goes above it
        self.forced_out: set[str] = set()  # the operator's requests, until the next view
        self.forced_in: set[str] = set()
        self.contested: dict[str, float] = {}  # member -> until: a change of it was refused
        self.wanted_since: float | None = None
        self.retry_at = float("-inf")

    def reset(self, view: View) -> None:
        """`view` was adopted: start afresh for the next one."""
        if self.attempt is not None and self.attempt.n <= view.number:
            self.attempt = None
        self.wanted_since = None
        self.retry_at = float("-inf")
        self.forced_out.clear()
        self.forced_in.clear()
        self.contested.clear()

    def saw_round(self, round_: int) -> None:
        self.round = max(self.round, round_)

    # --- what and when ----------------------------------------------------------------------

    def desired(self, now: float) -> View | None:
        """The view we would propose now, or None if we want no change."""
        q = self.member
        old = q.view.bindings()
        new = dict(old)
        if not q.view.bound:
            # The first change binds every member to its process; it needs all of them.
            for m in old:
                latest = q.incarnation if m == q.me else q.sightings.latest(m, now)
                if latest is None:
                    return None
                new[m] = latest
            return q.view.successor(new)
        for m in q.servers:
            if m == q.me or self.contested.get(m, float("-inf")) > now:
                continue
            forced_in = m in self.forced_in
            joiner = q.sightings.latest(m, now) if forced_in else q.sightings.joiner(m, now)
            inc = old.get(m)
            if inc is None:
                if joiner is not None:
                    new[m] = joiner  # a removed server asks to come back
                continue
            replaceable = q.acceptor.why_keep(m, inc, now) is None
            if joiner is not None and joiner != inc and (replaceable or forced_in):
                new[m] = joiner  # a restarted server: bind its new process
            elif m in self.forced_out or (q.auto and replaceable):
                del new[m]
        return q.view.successor(new) if new != old else None

    def _rank(self, now: float) -> int:
        """Our place among the members that would propose: the lowest index goes first."""
        q = self.member
        # (a member proven dead — its port refused us — proposes nothing either: counting
        # it made the first live proposer wait a heartbeat after a kill -9)
        live = [s for s in q.servers if s in q.view.members
                and (s == q.me or not (q.suspects(s, now) or q.sightings.is_dead(
                    s, q.view.incarnation_of(s) or "")))]
        return live.index(q.me)

    def propose(self, now: float, *, forced: bool) -> list[Out]:
        """Start a ballot if we want a change and it is our turn (`forced`: at once)."""
        q = self.member
        if not q.voter:
            return []
        a = self.attempt
        if a is not None:
            if now < a.deadline:
                return []
            log.debug("view_attempt_timed_out", n=a.n, ballot=a.ballot)
            self._abandon(now)
        if now < self.retry_at and not forced:
            return []
        own = self.desired(now)
        acc = q.acceptor
        if own is None and acc.accepted is not None and (
                now - acc.accepted_at >= _FINISH_HEARTBEATS * q.heartbeat_s):
            # We accepted a value that was never decided: while it is open we grant no
            # leases, so finish the instance (with no change, if the promises allow).
            own = q.view.successor(q.view.bindings()) if q.view.bound else acc.accepted[1]
        if own is None:
            self.wanted_since = None
            return []
        if self.wanted_since is None:
            self.wanted_since = now
        if not forced and now < self.wanted_since + self._rank(now) * q.heartbeat_s:
            return []
        return self._start(own, now)

    def _abandon(self, now: float) -> None:
        self.attempt = None
        self.retry_at = now + (1 + self._rank(now)) * self.member.heartbeat_s / 2

    # --- a ballot ---------------------------------------------------------------------------

    def _start(self, own: View, now: float) -> list[Out]:
        q, acc = self.member, self.member.acceptor
        if acc.promised is not None:
            self.saw_round(acc.promised[0])
        self.round += 1
        b: Ballot = (self.round, q.index, q.incarnation)
        a = _Attempt(n=own.number, ballot=b, own=own,
                     deadline=now + _ATTEMPT_HEARTBEATS * q.heartbeat_s)
        self.attempt = a
        acc.promised = b  # above anything we promised: our round is higher
        a.promises[q.me] = acc.accepted
        log.debug("view_proposing", n=a.n, ballot=b, members=own.members)
        out = [q.msg(s, "v_prepare", n=a.n, b=list(b)) for s in q.view.members if s != q.me]
        return out + self._phase2(now)

    def _current(self, n: Any, b: Any, src: str, inc: str) -> _Attempt | None:
        a = self.attempt
        if (a is None or n != a.n or ballot_from_wire(b, peer=src) != a.ballot
                or not self.member.view.binds(src, inc)):
            return None
        return a

    def on_promise(self, src: str, inc: str, vn: int, m: dict[str, Any],
                   now: float) -> list[Out]:
        a = self._current(m["n"], m["b"], src, inc)
        if a is None or a.value is not None:
            return []
        acc = m["acc"]
        a.promises[src] = None if acc is None else (
            ballot_from_wire(acc[0], peer=src), View.from_wire(acc[1], peer=src))
        return self._phase2(now)

    def _phase2(self, now: float) -> list[Out]:
        q, a = self.member, self.attempt
        assert a is not None
        needed = q.view.votes_needed
        if a.value is not None or len(a.promises) < needed:
            return []
        accepted = [acc for acc in a.promises.values() if acc is not None]
        # Paxos asks for the value of the highest ballot accepted within *some* set of
        # promisers large enough to decide; if such a set accepted nothing, we are free.
        a.recovered = len(a.promises) - len(accepted) < needed
        a.value = max(accepted, key=lambda acc: acc[0])[1] if a.recovered else a.own
        out = [q.msg(s, "v_accept", n=a.n, b=list(a.ballot), value=a.value.to_wire(),
                     rec=a.recovered)
               for s in q.view.members if s != q.me]
        return out + self._decide_if_done(now)

    def on_accepted(self, src: str, inc: str, vn: int, m: dict[str, Any],
                    now: float) -> list[Out]:
        a = self._current(m["n"], m["b"], src, inc)
        if a is None or a.value is None or View.from_wire(m["value"], peer=src) != a.value:
            return []
        a.accepts.add(src)
        return self._decide_if_done(now)

    def _decide_if_done(self, now: float) -> list[Out]:
        q, a = self.member, self.attempt
        if a is None or a.value is None:
            return []
        needed = q.view.votes_needed
        if q.me not in a.accepts | a.refusals and len(a.accepts) + 1 >= needed:
            # We accept our own value last, when that decides it: an acceptor with an
            # undecided value grants no leases, and a refused proposal must not cost us ours.
            if q.acceptor.accept(a.ballot, a.value, now, recovered=a.recovered) is None:
                a.accepts.add(q.me)
            else:
                a.refusals.add(q.me)
        if len(a.accepts) < needed:
            return []
        decided = a.value
        log.info("view_decided", n=decided.number, members=decided.members, ballot=a.ballot)
        q.adopt([decided], now)
        return [q.decided_msg(s, after=decided.number - 1) for s in q.servers if s != q.me]

    def on_nack(self, src: str, inc: str, vn: int, m: dict[str, Any],
                now: float) -> list[Out]:
        q = self.member
        a = self._current(m["n"], m["b"], src, inc)
        promised = m.get("promised")
        if promised is not None:
            self.saw_round(ballot_from_wire(promised, peer=src)[0])
        if a is None:
            return []
        reason = m["reason"]
        if reason == "promised":
            log.debug("view_attempt_outbid", n=a.n, ballot=a.ballot, by=src)
            self._abandon(now)
            return []
        a.refusals.add(src)
        members = [x for x in m.get("members") or [] if isinstance(x, str)]
        # Members we hold proof of death for: the refusing acceptor lacks that proof yet
        # (its own dial of the dead port is a few milliseconds behind ours), so try again
        # soon rather than back off (liveness only: the first good response after a kill -9
        # waits for this removal).
        proven = bool(members) and all(
            q.sightings.is_dead(x, q.view.incarnation_of(x) or "") for x in members)
        if a.value is not None and a.value == a.own and not proven:
            for member in members:
                self.contested[member] = now + q.sightings.suspect_after_s
        # A member proven dead accepts nothing either: with it and the refusals, this
        # attempt cannot decide — retry soon (the acceptor that refused is about to see
        # the proof too) rather than wait for the attempt's deadline.
        dead = {x for x in q.view.members if x != q.me
                and q.sightings.is_dead(x, q.view.incarnation_of(x) or "")}
        if len(q.view.members) - len(a.refusals | dead) < q.view.votes_needed:
            log.debug("view_attempt_refused", n=a.n, ballot=a.ballot, reason=reason)
            self._abandon(now)
            if proven:
                self.retry_at = now + _PROVEN_RETRY_S
        return []
