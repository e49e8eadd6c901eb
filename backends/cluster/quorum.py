"""The view consensus (docs/consistency.md, I2) and the leases (I1b), sans-IO.

No sockets, no tasks, no clock: `now` is the host's monotonic clock, in seconds.

**Wiring.** One `Quorum` per server process, built at start with a fresh random
`incarnation`. The host
- passes every `v_*`/`l_*` frame a peer sent on its current authenticated connection to
  `receive(src, msg, now)`, and calls `heard(peer, incarnation, now)` for its other frames
  (pings) — silence on the current connection is the evidence of failure (I8);
- calls `tick(now)` often (every `heartbeat_interval_s / 5` or so): it sends the lease asks
  every heartbeat and starts or retries proposals;
- calls `refused(peer, now)` when the peer's replication port refused a connection (no
  process listening) — never for a timeout or a reset;
- sends every `(server id, dict)` any call returns (JSON-able; `op` starts with `v_`/`l_`);
  lost messages are retried by the protocol itself;
- after each call drains `take_events()` and, for each `ViewChanged`, fences its removed
  and restarted servers, promotes the replicas whose primary they were and re-protects,
  before it serves anything else; if this server is no longer bound (`standing` is not
  MEMBER), it drops every session and keeps the `Quorum`: it asks to join by itself;
- acknowledges a write only while `holds_lease(now)` (I1b), and reports `standing`
  (`starting`, `fenced`) in `X-Tandem-State` otherwise.

**Instances.** View `n + 1` is decided by Paxos among the members of view `n`: a member that
wants a change picks ballot `(round, its index in the cluster file, its incarnation)`,
gathers promises from enough members of view `n` (`View.votes_needed`: a majority, or all
of view 1), proposes the value of the highest ballot any of them accepted — or its own if
enough of them accepted nothing — and the value is decided when that many accepted the
same ballot. The decider broadcasts `v_decided`; a member answers a message of an older
view with the views it lacks, and asks the sender of a newer one (`v_learn`). An acceptor
votes only in instance `view + 1`. The proposer accepts its own value last.

**Refusals** (I2; they cost liveness, never agreement: a refusing acceptor only answers
fewer messages than a Paxos acceptor may). An acceptor refuses a value that removes or
re-binds a member's process unless that process is proven dead, or it suspects it, has no
lease grant to it still running, and has known its current view for the grant length (the
lease argument below); a value adding or binding a process it has not heard from recently
(unless the value was recovered from a promise: it may have been decided already); a value
without itself. An undecided instance is finished by an acceptor of it after two
heartbeats, with no change if enough promisers accepted nothing.

**Who votes: bound incarnations.** Memory is lost at a restart, and with it every promise.
A process votes, grants and holds leases only where the view binds its server to *its*
incarnation, so every vote counted for view `n + 1` comes from a process that ran without
interruption since view `n` was decided with it in — plain Paxos, which needs nothing else.
A restarted process learns the views and asks to join (`v_join`, naming the process it
replaces: it knows a view binding that one, so that one has ended), and a member re-binds it.

Why not "abstain up to instance H + 1, H reported by a majority of the configured servers":
the members of a shrunken view may be a minority of the cluster file. With 7 servers and
view `k − 1 = {A, E, P}` decided by `{A, E, P}` out of `{A, B, E, P}`, a restarted P can hear
only from B, C, D, F, all at view `k − 2` or older, and vote again in instance `k`, where
its old self promised a higher ballot to E: A's ballot is then accepted by A and P, E's by E
and P — two values.

View 1 binds nobody: a process cannot tell the cluster's first start from its own restart.
So instance 2 needs every configured server (two unanimous sets share every member that
did not restart in between, and only the loss of every server's memory — a new cluster —
defeats that), may not remove anyone, and view-1 leases need every member's grant too (two
restarted processes of three would otherwise vouch for each other in a view 1 the third
has left). The cluster serves once every configured server has been up at once; after
that, a majority of the current view is enough. With two servers (`votes_needed` 2 of 2) a
server alone never decides anything, nor holds a lease: removals need a third voter.

**Leases** (`backends.cluster.lease`). A member grants an ask made in its own current view
`n` by a bound member, unless it has accepted a value for instance `n + 1`; an asker counts
itself only if it had accepted none when it asked. Claim: if X holds a lease granted in
view `n` at time t, no view `m > n` excluding X's process is decided by t.
- `m = n + 1`: the deciding set and the granting set share a member g, which granted before
  it accepted anything for `n + 1`; so it accepted the removal only after its grant ran out,
  which is after X's lease ended (grant `L·(1+ρ)/(1−ρ)` against lease `L`, clock rates within
  ρ). (Suspicion, `L + heartbeat` of silence, implies that too.)
- `m ≥ n + 2`: that g's grant came before view `n + 1` was decided, so X's ask did too, and
  the lease ends by `D(n+1) + L/(1−ρ)`. Every voter for a removal in instance `m` has known
  view `m − 1` for the grant length, so `D(m) ≥ D(m−1) + L/(1−ρ) ≥ D(n+1) + L/(1−ρ)`.
Removals of proven-dead processes skip both checks: a dead process holds no lease. A process
that restarted is no voter, so the grants it forgot constrain nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from tandem.errors import ConfigError

from ..errors import ProtocolViolation
from .acceptor import Acceptor
from .lease import Lease, lease_duration
from .proposer import Proposer
from .sightings import Sightings
from .view import RHO, Ballot, Out, View, ViewChanged

__all__ = ["Quorum", "Standing", "View", "ViewChanged", "Out"]

log = structlog.get_logger("tandem.quorum")

Handler = Callable[[str, str, int, dict[str, Any], float], list[Out]]


class Standing(enum.Enum):
    MEMBER = "member"      # bound in the view we know: votes, grants, may hold a lease
    STARTING = "starting"  # our server is a member, bound to an earlier process: asking to join
    FENCED = "fenced"      # our server is not in the view: removed; asking to join


class Quorum:
    """One server process's part in the view consensus and the leases."""

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
        self.auto = auto  # propose removals of the members we may vote out, by ourselves
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
        self._next_beat = now
        # the two roles, over this object's view, sightings and lease
        self.acceptor = Acceptor(self)
        self.proposer = Proposer(self)
        self._handlers: dict[str, Handler] = {
            "v_prepare": self.acceptor.on_prepare,
            "v_promise": self.proposer.on_promise,
            "v_accept": self.acceptor.on_accept,
            "v_accepted": self.proposer.on_accepted,
            "v_nack": self.proposer.on_nack,
            "v_decided": self._on_decided,
            "v_learn": self._on_learn,
            "v_join": self._on_join,
            "l_ask": self._on_ask,
            "l_grant": self._on_grant,
        }

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
        return self.acceptor.accepted

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

    def heard(self, peer: str, incarnation: str, now: float) -> list[Out]:
        """Any frame from that process on its current connection (pings included)."""
        self.sightings.heard(peer, incarnation, now)
        return []  # like every input: what to send (here, nothing)

    def refused(self, peer: str, now: float) -> list[Out]:
        """The peer's replication port refused a connection: no process is listening.

        Only for a refusal that proves no process (ECONNREFUSED from the peer's own host),
        never for a timeout or a reset: it lets the majority remove the peer at once.
        """
        self.sightings.refused(peer, self.view.incarnation_of(peer) or "")
        return self.proposer.propose(now, forced=False)

    def admit(self, server: str) -> None:
        """A server that joined the running cluster (backends.cluster.roster): it may now
        ask to join the view, and be proposed and voted in like a server that came back."""
        if server not in self.servers:
            self.servers = (*self.servers, server)

    def propose_remove(self, peer: str, now: float) -> list[Out]:
        """Ask for a view without `peer` (an operator's command); acceptors still judge it."""
        self.proposer.forced_out.add(peer)
        return self.proposer.propose(now, forced=True)

    def propose_join(self, peer: str, now: float) -> list[Out]:
        """Ask for a view binding `peer`'s process heard most recently."""
        self.proposer.forced_in.add(peer)
        return self.proposer.propose(now, forced=True)

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            out += self._beat(now)
        return out + self.proposer.propose(now, forced=False)

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
                out.append(self.msg(src, "v_learn", after=self.view.number))
            elif vn < self.view.number:
                out.append(self.decided_msg(src, after=vn))
        try:
            return out + handler(src, inc, vn, msg, now)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProtocolViolation(f"malformed {op}: {msg!r}", peer=src) from exc

    # --- for the acceptor and the proposer --------------------------------------------------

    def msg(self, dst: str, op: str, **fields: Any) -> Out:
        return (dst, {"op": op, "inc": self.incarnation, "vn": self.view.number, **fields})

    def decided_msg(self, dst: str, *, after: int) -> Out:
        views = [v.to_wire() for n, v in sorted(self._history.items()) if n > after]
        return self.msg(dst, "v_decided", views=views[-8:])  # the newest suffice to catch up

    def nack(self, dst: str, n: int, b: Ballot, reason: str, **fields: Any) -> Out:
        return self.msg(dst, "v_nack", n=n, b=list(b), reason=reason, **fields)

    def adopt(self, views: list[View], now: float) -> None:
        """Adopt decided views newer than ours, in order."""
        for view in sorted(views, key=lambda v: v.number):
            known = self._history.get(view.number)
            if known is not None and known != view:
                log.error("views_disagree", n=view.number, ours=known, theirs=view)
            if view.number <= self.view.number:
                continue
            old, self.view = self.view, view
            self._history[view.number] = view
            self.learned_at = now
            self.acceptor.reset()
            self.proposer.reset(view)
            self.lease.view_changed(view)
            self._next_beat = now  # ask for leases in the new view at the next tick
            self._events.append(ViewChanged(old, view))
            log.info("view_adopted", n=view.number, members=view.members, me=self.me)

    # --- learning, joining, leases ----------------------------------------------------------

    def _on_decided(self, src: str, inc: str, vn: int, m: dict[str, Any],
                    now: float) -> list[Out]:
        self.adopt([View.from_wire(v, peer=src) for v in m["views"]], now)
        return []

    def _on_learn(self, src: str, inc: str, vn: int, m: dict[str, Any],
                  now: float) -> list[Out]:
        after = int(m["after"])
        return [self.decided_msg(src, after=after)] if self.view.number > after else []

    def _on_join(self, src: str, inc: str, vn: int, m: dict[str, Any],
                 now: float) -> list[Out]:
        sup = m.get("sup")
        if vn == self.view.number and self.view.bound:
            if isinstance(sup, str) and sup != inc and self.view.incarnation_of(src) == sup:
                self.sightings.superseded(src, sup)  # it knows a view binding sup: sup ended
            if not self.view.binds(src, inc):
                self.sightings.asked_to_join(src, inc, now)
        return []

    def _beat(self, now: float) -> list[Out]:
        self.lease.forget_grants_before(now)
        if self.voter:
            asks = self.lease.ask(self.view, now, self_grant=self.acceptor.accepted is None)
            return [self.msg(dst, m.pop("op"), **m) for dst, m in asks]
        # Not a voter: catch up, and ask the members to bind us.
        out = [self.msg(s, "v_learn", after=self.view.number)
               for s in self.servers if s != self.me]
        sup = self.view.incarnation_of(self.me) or None
        return out + [self.msg(s, "v_join", sup=sup) for s in self.view.members if s != self.me]

    def _on_ask(self, src: str, inc: str, vn: int, m: dict[str, Any],
                now: float) -> list[Out]:
        if (vn != self.view.number or not self.voter or not self.view.binds(src, inc)
                or self.acceptor.accepted is not None or self.sightings.is_dead(src, inc)):
            return []
        grants = self.lease.grant(src, inc, int(m["seq"]), self.view, now)
        return [self.msg(dst, g.pop("op"), **g) for dst, g in grants]

    def _on_grant(self, src: str, inc: str, vn: int, m: dict[str, Any],
                  now: float) -> list[Out]:
        self.lease.on_grant(src, inc, int(m["seq"]), vn)
        return []
