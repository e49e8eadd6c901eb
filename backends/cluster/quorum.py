"""The view consensus (docs/consistency.md, I2): single-decree Paxos per view number.

Sans-IO: no sockets, no tasks, no clock. The host feeds `receive(src, msg, now)` with every
`v_*`/`l_*` message a peer sent on its current authenticated connection, calls `tick(now)`
often (every `heartbeat_interval_s / 5` or so), and sends what each call returns: a list of
`(server id, JSON-able dict)`. `now` is the host's monotonic clock, in seconds. The host
drains `take_events()` after each call and, for each `ViewChanged`, fences, promotes and
re-protects (removed members, restarted members), before it handles anything else.

**Instances.** View `n + 1` is decided by Paxos among the members of view `n`: a member that
wants a change (`desired`) picks ballot `(round, its index in the cluster file, its
incarnation)`, gathers promises from enough members of view `n` (`View.votes_needed`: a
majority, or all of view 1), proposes the value of the highest ballot any of them accepted
— or its own if enough of them accepted nothing — and the value is decided when that many
accepted the same ballot. The decider broadcasts `v_decided`; a member answers any message
of an older view with the views it lacks, and asks a sender of a newer view (`v_learn`).
An acceptor votes only in instance `view + 1`.

**Refusals** (I2; they cost liveness, never agreement: an acceptor that refuses a value only
answers fewer messages than a Paxos acceptor may). An acceptor refuses a value that removes
or re-binds a member's process unless that process is proven dead (`Sightings`), or it
suspects it, has no lease grant to it still running, and has known its current view for at
least the grant length (see the lease argument below); a value that adds or binds a process
it has not heard from recently; a value that drops itself.

**Who votes: bound incarnations.** Memory is lost at a restart, and with it every promise.
A process votes (and grants leases, and holds one) only where the view binds its server to
*its* incarnation, so every vote counted for view `n + 1` comes from a process that has
run without interruption since view `n` was decided with it in — standard Paxos, whose
safety needs nothing else. A restarted process learns the views, asks to join (`v_join`,
naming the process it replaces, which proves that one gone), and a member re-binds it.

Why not "abstain up to instance H + 1, H reported by a majority of the configured servers":
the members of a shrunken view may be a minority of the cluster file. With 7 servers and
view `k − 1 = {A, E, P}` decided by `{A, E, P}` out of `{A, B, E, P}`, a restarted P can hear
only from B, C, D, F, all at view `k − 2` or older, and vote again in instance `k`, where
its old self promised a higher ballot to E: A's ballot is then accepted by A and P, E's by E
and P — two values.

View 1 binds nobody (no process can tell its first start from a restart), so instance 2
needs every configured server: any two unanimous sets share every member that did not
restart between them, which is all but one under a single failure — and safety fails only
if every server lost its memory, after which nothing distinguishes the cluster from a new
one. The price: the first view change waits until every configured server has been up at
once; until then members hold leases (a majority grants them) but nobody is removed.
With two servers (`votes_needed` 2 of 2) a server alone never decides anything: removals
need a third voter (a witness).

**Leases** (`backends.cluster.lease`; I1). A grantor grants an ask made in its own current
view `n` by a bound member, unless it has accepted a value for instance `n + 1`; an asker
counts itself only if it had accepted none when it asked. Claim: if X holds a lease granted
in view `n` at time t, no view `m > n` excluding X's process is decided by t.
- `m = n + 1`: the deciding set and the granting majority share a member g, which granted
  before it accepted anything for `n + 1`; so it accepted the removal only after its grant
  ran out, which is after X's lease ended (grant `L·(1+ρ)/(1−ρ)` against lease `L`).
- `m ≥ n + 2`: that g's grant came before view `n + 1` was decided, so X's ask did too and
  the lease ends by `D(n+1) + L` (real time, slow clock). Every voter for a removal in
  instance `m` has known view `m − 1` for the grant length, so `D(m) ≥ D(m−1) + L ≥
  D(n+1) + L`.
Removals of proven-dead processes skip both checks: a dead process holds no lease.
A process that restarted is no voter, so the grants it forgot constrain nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from tandem.errors import ConfigError

from ..errors import ProtocolViolation
from .lease import Lease, Out, lease_duration
from .sightings import Sightings
from .view import RHO, Ballot, View, ViewChanged, ballot_from_wire

__all__ = ["Quorum", "Standing", "View", "ViewChanged", "Out"]

log = structlog.get_logger("tandem.quorum")

# An attempt that has not decided within this many heartbeats is abandoned and retried.
_ATTEMPT_HEARTBEATS = 2.0
# An accepted value not decided within this many heartbeats is finished by its acceptor.
_FINISH_HEARTBEATS = 2.0


class Standing(enum.Enum):
    MEMBER = "member"      # bound in the view we know: votes, grants, may hold a lease
    STARTING = "starting"  # our server is a member, bound to an earlier process: asking to join
    FENCED = "fenced"      # our server is not in the view: removed; asking to join


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


class Quorum:
    """One server's part in the view consensus and the leases (sans-IO)."""

    def __init__(self, *, me: str, servers: Sequence[str], incarnation: str,
                 heartbeat_interval_s: float, missed_heartbeats: int, now: float,
                 rho: float = RHO, auto: bool = True,
                 on_accept: Callable[[Ballot, View], None] | None = None) -> None:
        if me not in servers or len(set(servers)) != len(servers):
            raise ConfigError("must list this server once", key="servers", value=servers)
        if missed_heartbeats < 2:
            raise ConfigError("must be at least 2 (a lease lasts one heartbeat less)",
                              key="cluster.missed_heartbeats", value=missed_heartbeats)
        if not incarnation:
            raise ConfigError("must not be empty", key="incarnation", value=incarnation)
        # configuration
        self.me = me
        self.incarnation = incarnation
        self.servers = tuple(servers)  # cluster-file order: ballot index, proposing rank
        self.index = self.servers.index(me)
        self.heartbeat_s = heartbeat_interval_s
        self.auto = auto  # propose removals of suspected members by ourselves
        self.on_accept = on_accept  # observes every acceptance (metrics, the model test)
        self.lease = Lease(me=me, incarnation=incarnation, rho=rho,
                           duration_s=lease_duration(heartbeat_interval_s, missed_heartbeats))
        self.sightings = Sightings(suspect_after_s=heartbeat_interval_s * missed_heartbeats,
                                   now=now)
        # views
        self.view = View.first(servers)
        self._history: dict[int, View] = {1: self.view}
        self.learned_at = now  # when we adopted self.view, our clock
        self._events: list[ViewChanged] = []
        # acceptor, for instance self.view.number + 1
        self._promised: Ballot | None = None
        self._accepted: tuple[Ballot, View] | None = None
        self._accepted_at = 0.0
        # proposer
        self._attempt: _Attempt | None = None
        self._round = 0
        self._forced_out: set[str] = set()
        self._forced_in: set[str] = set()
        self._contested: dict[str, float] = {}  # member -> until: a change of it was refused
        self._wanted_since: float | None = None
        self._retry_at = float("-inf")
        self._next_beat = now

    # --- what the host reads ----------------------------------------------------------------

    @property
    def voter(self) -> bool:
        return self.view.binds(self.me, self.incarnation)

    @property
    def standing(self) -> Standing:
        if self.voter:
            return Standing.MEMBER
        return Standing.STARTING if self.me in self.view.members else Standing.FENCED

    @property
    def accepted(self) -> tuple[Ballot, View] | None:
        """The (ballot, value) we accepted for the next view, if it is not decided yet."""
        return self._accepted

    def holds_lease(self, now: float) -> bool:
        """May this server acknowledge a write now? (I1b)"""
        return self.voter and self.lease.holds_lease(now)

    def suspects(self, peer: str, now: float) -> bool:
        return self.sightings.suspects(peer, now, self.view.incarnation_of(peer) or "")

    def history(self) -> dict[int, View]:
        return dict(self._history)

    def take_events(self) -> list[ViewChanged]:
        events, self._events = self._events, []
        return events

    # --- inputs from the host ---------------------------------------------------------------

    def heard(self, peer: str, incarnation: str, now: float) -> None:
        """Any frame from that process on its current connection (pings included)."""
        self.sightings.heard(peer, incarnation, now)

    def refused(self, peer: str, now: float) -> list[Out]:
        """The peer's replication port refused a connection: no process is listening.

        Only for a refusal that proves no process (ECONNREFUSED from the peer's own host),
        never for a timeout or a reset: it lets the majority remove the peer at once.
        """
        self.sightings.refused(peer, now)
        return self._propose(now, forced=False)

    def propose_remove(self, peer: str, now: float) -> list[Out]:
        """Ask for a view without `peer` (an operator's command); acceptors still judge it."""
        self._forced_out.add(peer)
        self._retry_at = float("-inf")
        return self._propose(now, forced=True)

    def propose_join(self, peer: str, now: float) -> list[Out]:
        """Ask for a view binding `peer`'s process heard most recently."""
        self._forced_in.add(peer)
        self._retry_at = float("-inf")
        return self._propose(now, forced=True)

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            out += self._beat(now)
        out += self._propose(now, forced=False)
        return out

    def receive(self, src: str, msg: dict[str, Any], now: float) -> list[Out]:
        """Handle one message from server `src` (authenticated by the host)."""
        op, inc, vn = msg.get("op"), msg.get("inc"), msg.get("vn")
        if (src == self.me or src not in self.servers or not isinstance(op, str)
                or not isinstance(inc, str) or not inc or not isinstance(vn, int)):
            raise ProtocolViolation(f"not a quorum message: {msg!r}", peer=src)
        handler = self._handlers.get(op)
        if handler is None:
            raise ProtocolViolation(f"unknown quorum op {op!r}", peer=src)
        self.sightings.heard(src, inc, now)
        out: list[Out] = []
        if op not in ("v_decided", "v_learn"):
            if vn > self.view.number:
                out.append(self._msg(src, "v_learn", after=self.view.number))
            elif vn < self.view.number:
                out.append(self._decided_msg(src, after=vn))
        try:
            return out + handler(self, src, inc, vn, msg, now)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolViolation(f"malformed {op}: {msg!r}", peer=src) from exc

    # --- messages ---------------------------------------------------------------------------

    def _msg(self, dst: str, op: str, **fields: Any) -> Out:
        return (dst, {"op": op, "inc": self.incarnation, "vn": self.view.number, **fields})

    def _decided_msg(self, dst: str, *, after: int) -> Out:
        views = [v.to_wire() for n, v in sorted(self._history.items()) if n > after]
        return self._msg(dst, "v_decided", views=views[-8:])  # the newest suffice to catch up

    def _nack(self, dst: str, n: int, b: Ballot, reason: str, **fields: Any) -> Out:
        return self._msg(dst, "v_nack", n=n, b=list(b), reason=reason, **fields)

    # --- acceptor ---------------------------------------------------------------------------

    def _instance_open(self, n: int) -> bool:
        """Do we vote in instance `n`? (Other instances were answered by the view sync.)"""
        return n == self.view.number + 1 and self.voter

    def _on_prepare(self, src: str, inc: str, vn: int, m: dict[str, Any],
                    now: float) -> list[Out]:
        n, b = int(m["n"]), ballot_from_wire(m["b"], peer=src)
        if not self._instance_open(n):
            return [self._nack(src, n, b, "not_voter")] if n == self.view.number + 1 else []
        self._round = max(self._round, b[0])
        if self._promised is not None and b < self._promised:
            return [self._nack(src, n, b, "promised", promised=list(self._promised))]
        self._promised = b
        acc = [list(self._accepted[0]), self._accepted[1].to_wire()] if self._accepted else None
        return [self._msg(src, "v_promise", n=n, b=list(b), acc=acc)]

    def _on_accept(self, src: str, inc: str, vn: int, m: dict[str, Any],
                   now: float) -> list[Out]:
        n, b = int(m["n"]), ballot_from_wire(m["b"], peer=src)
        value = View.from_wire(m["value"], peer=src)
        if value.number != n:
            raise ProtocolViolation(f"value of view {value.number} in instance {n}", peer=src)
        if not self._instance_open(n):
            return [self._nack(src, n, b, "not_voter")] if n == self.view.number + 1 else []
        refusal = self._accept(b, value, now, recovered=bool(m.get("rec")))
        if refusal is not None:
            return [self._nack(src, n, b, refusal[0], members=refusal[1],
                               promised=list(self._promised) if self._promised else None)]
        return [self._msg(src, "v_accepted", n=n, b=list(b), value=value.to_wire())]

    def _accept(self, b: Ballot, value: View, now: float, *,
                recovered: bool) -> tuple[str, list[str]] | None:
        """Accept (b, value) for instance view + 1, or say why not."""
        if self._promised is not None and b < self._promised:
            return ("promised", [])
        refusal = self._refusal(value, now, recovered=recovered)
        if refusal is not None:
            log.debug("view_refused", n=value.number, reason=refusal[0], members=refusal[1])
            return refusal
        self._promised = b
        self._accepted = (b, value)
        self._accepted_at = now
        if self.on_accept is not None:
            self.on_accept(b, value)
        return None

    def _refusal(self, value: View, now: float, *,
                 recovered: bool) -> tuple[str, list[str]] | None:
        """Why we refuse `value` for the next view (None: we accept it)."""
        old, new = self.view.bindings(), value.bindings()
        mine = new.get(self.me)
        if mine is None:
            return ("drops_me", [self.me])
        if mine != self.incarnation and self.lease.holds_lease(now):
            return ("holds_lease", [self.me])  # binds an older process of ours: not yet
        bad = [m for m, inc in new.items() if m not in self.servers or not inc]
        if bad:
            return ("malformed", bad)
        if not self.view.bound and len(new) != len(old):
            # Instance 2 needs every member: a removal could never be decided, and once
            # accepted anywhere it would have to be proposed again and again.
            return ("first_view_keeps_all", [m for m in old if m not in new])
        if not recovered:
            # Liveness only (a dead joiner costs a removal later): a value some acceptor
            # already accepted may have been decided, and must stay acceptable.
            unreachable = [m for m, inc in new.items() if m != self.me and old.get(m) != inc
                           and not self.sightings.reachable(m, inc, now)]
            if unreachable:
                return ("unreachable", unreachable)
        objections: dict[str, list[str]] = {}
        for m, inc in old.items():
            if m == self.me:
                continue
            reason: str | None = None
            if inc:
                if new.get(m) != inc:
                    reason = self._why_keep(m, inc, now)
            else:
                # View 1 binds m to new[m]: any other process of m we vouch for loses out.
                if any(until > now and x != new[m] and not self.sightings.is_dead(m, x)
                       for x, until in self.lease.grants_to(m).items()):
                    reason = "lease_granted"
            if reason is not None:
                objections.setdefault(reason, []).append(m)
        for reason, members in objections.items():
            return (reason, members)
        return None

    def _why_keep(self, member: str, inc: str, now: float) -> str | None:
        """Why we may not vote that process out now (None: we may)."""
        if self.sightings.is_dead(member, inc):
            return None  # a dead process holds no lease
        if not self.sightings.suspects(member, now, inc):
            return "not_suspected"
        if self.lease.granted_until(member, inc) > now:
            return "lease_granted"
        if now - self.learned_at < self.lease.grant_s:
            return "view_too_recent"  # a lease of the previous view may still run
        return None

    # --- learning ---------------------------------------------------------------------------

    def _on_decided(self, src: str, inc: str, vn: int, m: dict[str, Any],
                    now: float) -> list[Out]:
        views = [View.from_wire(v, peer=src) for v in m["views"]]
        self._adopt(views, now)
        return []

    def _on_learn(self, src: str, inc: str, vn: int, m: dict[str, Any],
                  now: float) -> list[Out]:
        after = int(m["after"])
        return [self._decided_msg(src, after=after)] if self.view.number > after else []

    def _adopt(self, views: list[View], now: float) -> None:
        for view in sorted(views, key=lambda v: v.number):
            known = self._history.get(view.number)
            if known is not None and known != view:
                log.error("views_disagree", n=view.number, ours=known, theirs=view)
            if view.number <= self.view.number:
                continue
            old, self.view = self.view, view
            self._history[view.number] = view
            self.learned_at = now
            self._promised = self._accepted = None
            if self._attempt is not None and self._attempt.n <= view.number:
                self._attempt = None
            self._wanted_since = None
            self._retry_at = float("-inf")
            self._forced_out.clear()
            self._forced_in.clear()
            self._contested.clear()
            self.lease.view_changed(view)
            self._next_beat = now  # ask for leases in the new view at the next tick
            self._events.append(ViewChanged(old, view))
            log.info("view_adopted", n=view.number, members=view.members, me=self.me)

    # --- leases -----------------------------------------------------------------------------

    def _beat(self, now: float) -> list[Out]:
        self.lease.forget_grants_before(now)
        if self.voter:
            asks = self.lease.ask(self.view, now, self_grant=self._accepted is None)
            return [self._msg(dst, m.pop("op"), **m) for dst, m in asks]
        # Not a voter: catch up, and ask a member to bind us.
        out = [self._msg(s, "v_learn", after=self.view.number)
               for s in self.servers if s != self.me]
        sup = self.view.incarnation_of(self.me) or None
        out += [self._msg(s, "v_join", sup=sup) for s in self.view.members if s != self.me]
        return out

    def _on_ask(self, src: str, inc: str, vn: int, m: dict[str, Any],
                now: float) -> list[Out]:
        if (vn != self.view.number or not self.voter or not self.view.binds(src, inc)
                or self._accepted is not None or self.sightings.is_dead(src, inc)):
            return []
        grants = self.lease.grant(src, inc, int(m["seq"]), self.view, now)
        return [self._msg(dst, g.pop("op"), **g) for dst, g in grants]

    def _on_grant(self, src: str, inc: str, vn: int, m: dict[str, Any],
                  now: float) -> list[Out]:
        self.lease.on_grant(src, inc, int(m["seq"]), vn)
        return []

    def _on_join(self, src: str, inc: str, vn: int, m: dict[str, Any],
                 now: float) -> list[Out]:
        sup = m.get("sup")
        if vn == self.view.number and self.view.bound:
            if isinstance(sup, str) and sup != inc and self.view.incarnation_of(src) == sup:
                self.sightings.superseded(src, sup)  # it knows a view binding sup: sup ended
            if not self.view.binds(src, inc):
                self.sightings.asked_to_join(src, inc, now)
        return []

    # --- proposer ---------------------------------------------------------------------------

    def _desired(self, now: float) -> View | None:
        """The view we would propose now, or None if we want no change."""
        old = self.view.bindings()
        new = dict(old)
        if not self.view.bound:
            # The first change binds every member to its process; it needs all of them.
            for m in old:
                latest = self.incarnation if m == self.me else self.sightings.latest(m, now)
                if latest is None:
                    return None
                new[m] = latest
            return self.view.successor(new)
        for m, inc in old.items():
            if m == self.me or self._contested.get(m, float("-inf")) > now:
                continue
            forced_in = m in self._forced_in
            joiner = self.sightings.latest(m, now) if forced_in else self.sightings.joiner(m, now)
            replaceable = self._why_keep(m, inc, now) is None
            if joiner is not None and joiner != inc and (replaceable or forced_in):
                new[m] = joiner  # a restarted server: bind its new process
            elif m in self._forced_out or (self.auto and replaceable):
                del new[m]
        for m in self.servers:
            if m in old or self._contested.get(m, float("-inf")) > now:
                continue
            joiner = self.sightings.latest(m, now) if m in self._forced_in else (
                self.sightings.joiner(m, now))
            if joiner is not None:
                new[m] = joiner
        return self.view.successor(new) if new != old else None

    def _rank(self, now: float) -> int:
        """Our place among the members that would propose: the lowest index goes first."""
        live = [s for s in self.servers if s in self.view.members
                and (s == self.me or not self.suspects(s, now))]
        return live.index(self.me)

    def _propose(self, now: float, *, forced: bool) -> list[Out]:
        if not self.voter:
            return []
        a = self._attempt
        if a is not None:
            if now < a.deadline:
                return []
            log.debug("view_attempt_timed_out", n=a.n, ballot=a.ballot)
            self._abandon(now)
        if now < self._retry_at:
            return []
        own = self._desired(now)
        if own is None and self._accepted is not None and (
                now - self._accepted_at >= _FINISH_HEARTBEATS * self.heartbeat_s):
            # We accepted a value that was never decided: while it is open we grant no
            # leases, so finish the instance (with no change, if the promises allow).
            own = (self.view.successor(self.view.bindings()) if self.view.bound
                   else self._accepted[1])
        if own is None:
            self._wanted_since = None
            return []
        if self._wanted_since is None:
            self._wanted_since = now
        if not forced and now < self._wanted_since + self._rank(now) * self.heartbeat_s:
            return []
        return self._start(own, now)

    def _abandon(self, now: float) -> None:
        self._attempt = None
        self._retry_at = now + (1 + self._rank(now)) * self.heartbeat_s / 2

    def _start(self, own: View, now: float) -> list[Out]:
        if self._promised is not None:
            self._round = max(self._round, self._promised[0])
        self._round += 1
        b: Ballot = (self._round, self.index, self.incarnation)
        a = _Attempt(n=own.number, ballot=b, own=own,
                     deadline=now + _ATTEMPT_HEARTBEATS * self.heartbeat_s)
        self._attempt = a
        self._promised = b
        a.promises[self.me] = self._accepted
        log.debug("view_proposing", n=a.n, ballot=b, members=own.members)
        out = [self._msg(s, "v_prepare", n=a.n, b=list(b))
               for s in self.view.members if s != self.me]
        return out + self._phase2(now)

    def _current(self, n: Any, b: Any, src: str, inc: str) -> _Attempt | None:
        a = self._attempt
        if (a is None or n != a.n or ballot_from_wire(b, peer=src) != a.ballot
                or not self.view.binds(src, inc)):
            return None
        return a

    def _on_promise(self, src: str, inc: str, vn: int, m: dict[str, Any],
                    now: float) -> list[Out]:
        a = self._current(m["n"], m["b"], src, inc)
        if a is None or a.value is not None:
            return []
        acc = m["acc"]
        a.promises[src] = None if acc is None else (
            ballot_from_wire(acc[0], peer=src), View.from_wire(acc[1], peer=src))
        return self._phase2(now)

    def _phase2(self, now: float) -> list[Out]:
        a = self._attempt
        assert a is not None
        needed = self.view.votes_needed
        if a.value is not None or len(a.promises) < needed:
            return []
        accepted = [acc for acc in a.promises.values() if acc is not None]
        # Paxos asks for the value of the highest ballot accepted within *some* set of
        # promisers large enough to decide; if such a set accepted nothing, we are free.
        a.recovered = len(a.promises) - len(accepted) < needed
        a.value = max(accepted, key=lambda acc: acc[0])[1] if a.recovered else a.own
        out = [self._msg(s, "v_accept", n=a.n, b=list(a.ballot), value=a.value.to_wire(),
                         rec=a.recovered)
               for s in self.view.members if s != self.me]
        return out + self._decide_if_done(now)

    def _on_accepted(self, src: str, inc: str, vn: int, m: dict[str, Any],
                     now: float) -> list[Out]:
        a = self._current(m["n"], m["b"], src, inc)
        if a is None or a.value is None or View.from_wire(m["value"], peer=src) != a.value:
            return []
        a.accepts.add(src)
        return self._decide_if_done(now)

    def _decide_if_done(self, now: float) -> list[Out]:
        a = self._attempt
        if a is None or a.value is None:
            return []
        needed = self.view.votes_needed
        if self.me not in a.accepts | a.refusals and len(a.accepts) + 1 >= needed:
            # We accept our own value last, when that decides it: an acceptor with an
            # undecided value grants no leases, and a refused proposal must not cost us ours.
            if self._accept(a.ballot, a.value, now, recovered=a.recovered) is None:
                a.accepts.add(self.me)
            else:
                a.refusals.add(self.me)
        if len(a.accepts) < needed:
            return []
        decided = a.value
        self._adopt([decided], now)
        log.info("view_decided", n=decided.number, members=decided.members, ballot=a.ballot)
        return [self._decided_msg(s, after=decided.number - 1)
                for s in self.servers if s != self.me]

    def _on_nack(self, src: str, inc: str, vn: int, m: dict[str, Any],
                 now: float) -> list[Out]:
        a = self._current(m["n"], m["b"], src, inc)
        promised = m.get("promised")
        if promised is not None:
            self._round = max(self._round, ballot_from_wire(promised, peer=src)[0])
        if a is None:
            return []
        reason = m["reason"]
        if reason == "promised":
            log.debug("view_attempt_outbid", n=a.n, ballot=a.ballot, by=src)
            self._abandon(now)
            return []
        a.refusals.add(src)
        if a.value is not None and a.value == a.own:
            for member in m.get("members") or []:
                if isinstance(member, str):
                    self._contested[member] = now + self.sightings.suspect_after_s
        if len(self.view.members) - len(a.refusals) < self.view.votes_needed:
            log.debug("view_attempt_refused", n=a.n, ballot=a.ballot, reason=reason)
            self._abandon(now)
        return []

    _handlers: ClassVar[dict[str, Callable[[Quorum, str, str, int, dict[str, Any], float],
                                           list[Out]]]] = {
        "v_prepare": _on_prepare,
        "v_promise": _on_promise,
        "v_accept": _on_accept,
        "v_accepted": _on_accepted,
        "v_nack": _on_nack,
        "v_decided": _on_decided,
        "v_learn": _on_learn,
        "v_join": _on_join,
        "l_ask": _on_ask,
        "l_grant": _on_grant,
    }
