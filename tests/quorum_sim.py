"""A simulated cluster for the view consensus: processes, clocks, a lossy network, and the
ground truth the invariants are checked against.

Each server runs a real `Quorum`; the simulation only carries its messages. Time is
simulated: every process reads its own clock, `local0 + rate × (t − born)`, with a rate
within ρ of real time. Messages wait in `inflight` until a test delivers, drops or
duplicates them; a directed link in `cut` loses what crosses it. A crash loses the whole
process; a restart is a new process (new incarnation, new clock, empty memory).

Ground truth, computed from the messages the processes send (never from their state):
- `chosen[n]`: the value a deciding set accepted at one ballot (Paxos "chosen"), and when;
- for each exclusion of a process in an accepted value, whether that acceptor had really
  heard nothing from it for the suspicion time by its own clock, or it was really dead.
`Violation` is raised the moment an invariant breaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from backends.cluster.quorum import Quorum
from backends.cluster.view import RHO, View, ViewChanged, majority

HEARTBEAT_S = 1.0
MISSED = 3
SUSPECT_S = HEARTBEAT_S * MISSED


class Violation(AssertionError):
    """An invariant of docs/consistency.md does not hold."""


@dataclass
class Proc:
    sid: str
    inc: str
    q: Quorum
    rate: float
    born: float   # simulated time of start
    local0: float
    events: list[ViewChanged] = field(default_factory=list)  # what its host was told

    def local(self, t: float) -> float:
        """Its clock's reading at simulated time t: the very number its Quorum is given."""
        return self.local0 + self.rate * (t - self.born)

    def silence(self, t: float, last: float) -> float:
        """How long, by its own clock, from `last` to `t` (both simulated times).

        The difference of the two readings its Quorum got, not `rate × (t − last)`: the
        same quantity in exact arithmetic, but in floating point the two round differently,
        and at exactly the suspicion time one says 3.0 where the other says 2.999…993. A
        process is bound by the readings it got, so I2 ("silent for the suspicion time by
        its own clock") is judged on those.
        """
        return self.local(t) - self.local(last)


@dataclass
class Msg:
    src: str
    src_inc: str
    dst: str
    payload: str  # JSON: what crosses the wire must be JSON-able


@dataclass
class World:
    servers: list[str]
    now: float = 0.0
    procs: dict[str, Proc | None] = field(default_factory=dict)
    inflight: list[Msg] = field(default_factory=list)
    cut: set[tuple[str, str]] = field(default_factory=set)
    born_count: int = 0
    # ground truth
    chosen: dict[int, View] = field(default_factory=dict)
    chosen_at: dict[int, float] = field(default_factory=dict)
    ballots: dict[tuple[int, str], dict[str, View]] = field(default_factory=dict)
    justified: dict[tuple[int, str], dict[str, set[tuple[str, str]]]] = field(default_factory=dict)
    last_recv: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
    dead: set[tuple[str, str]] = field(default_factory=set)
    seen_view: dict[tuple[str, str], int] = field(default_factory=dict)
    decided_events: int = 0

    def __post_init__(self) -> None:
        self.chosen[1] = View.first(self.servers)
        self.chosen_at[1] = 0.0

    # --- processes --------------------------------------------------------------------------

    def start(self, sid: str, *, rate: float = 1.0, local0: float = 1000.0,
              auto: bool = True) -> Proc:
        assert self.procs.get(sid) is None
        self.born_count += 1
        inc = f"{sid}.{self.born_count}"
        q = Quorum(me=sid, servers=self.servers, incarnation=inc, heartbeat_interval_s=HEARTBEAT_S,
                   missed_heartbeats=MISSED, now=local0, auto=auto,
                   on_accept=lambda b, v: self._accepted(p, b, v))  # Paxos' chosen: acceptor state
        p = Proc(sid, inc, q, rate, self.now, local0)
        self.procs[sid] = p
        return p

    def crash(self, sid: str) -> None:
        p = self.procs[sid]
        assert p is not None
        self.dead.add((sid, p.inc))
        self.procs[sid] = None

    def up(self) -> list[Proc]:
        return [p for p in self.procs.values() if p is not None]

    # --- the network ------------------------------------------------------------------------

    def call(self, p: Proc, method: str, *args: Any) -> None:
        """Call one input method of p's Quorum at p's clock; carry what it sends."""
        outs = getattr(p.q, method)(*args, p.local(self.now))
        for dst, msg in outs:
            assert dst != p.sid and dst in self.servers, (p.sid, dst, msg)
            op = msg["op"]
            assert isinstance(op, str) and op[:2] in ("v_", "l_"), msg
            self.inflight.append(Msg(p.sid, p.inc, dst, json.dumps(msg)))
        self._events(p)

    def deliver(self, i: int) -> None:
        m = self.inflight.pop(i)
        p = self.procs.get(m.dst)
        if p is None or (m.src, m.dst) in self.cut:
            return
        self.last_recv[(p.sid, p.inc, m.src, m.src_inc)] = self.now
        self.call(p, "receive", m.src, json.loads(m.payload))

    def deliver_where(self, **match: str) -> int:
        """Deliver every message in flight whose src, dst and op are as given."""
        done = 0
        i = 0
        while i < len(self.inflight):
            m = self.inflight[i]
            seen = {"src": m.src, "dst": m.dst, "op": json.loads(m.payload)["op"]}
            if all(seen[k] == v for k, v in match.items()):
                self.deliver(i)
                done += 1
            else:
                i += 1
        return done

    def tick(self, p: Proc) -> None:
        self.call(p, "tick")

    def settle(self, rounds: int, *, step_s: float = 0.25) -> None:
        """Rounds of: time passes, every process ticks, every message in flight arrives."""
        for _ in range(rounds):
            self.now += step_s
            for p in self.up():
                self.tick(p)
            for _ in range(len(self.inflight)):
                self.deliver(0)

    # --- ground truth -----------------------------------------------------------------------

    def _accepted(self, p: Proc, ballot: tuple[int, int, str], value: View) -> None:
        n = value.number
        prev = self.chosen.get(n - 1)
        if prev is None:
            raise Violation(f"{p.inc} accepted for view {n} but view {n - 1} was never chosen")
        if not prev.binds(p.sid, p.inc):
            raise Violation(f"{p.inc} accepted for view {n}, not a voter of {prev}")
        key = (n, json.dumps(ballot))
        votes = self.ballots.setdefault(key, {})
        for other in votes.values():
            if other != value:
                raise Violation(f"two values at one ballot {key}: {other} / {value}")
        votes[p.sid] = value
        # I2: was each process this value excludes really silent (or dead) for this acceptor?
        excluded = [(m, inc) for m, inc in prev.bindings().items()
                    if inc and m != p.sid and value.incarnation_of(m) != inc]
        just = self.justified.setdefault(key, {}).setdefault(p.sid, set())
        for m, inc in excluded:
            last = max(self.last_recv.get((p.sid, p.inc, m, inc), float("-inf")), p.born)
            silent = p.silence(self.now, last) >= SUSPECT_S
            if silent or (m, inc) in self.dead:
                just.add((m, inc))
        if len(votes) >= prev.votes_needed:
            self._chosen(n, value, key, prev)

    def _chosen(self, n: int, value: View, key: tuple[int, str], prev: View) -> None:
        known = self.chosen.get(n)
        if known is not None and known != value:
            raise Violation(f"agreement: view {n} chosen as {known} and as {value}")
        if known is None:
            self.chosen[n] = value
            self.chosen_at[n] = self.now
        if not prev.bound and set(value.members) != set(prev.members):
            raise Violation(f"view 2 removed a member: {value}")
        votes = self.justified[key]
        for m, inc in prev.bindings().items():
            if inc and value.incarnation_of(m) != inc:
                backers = [a for a, just in votes.items() if (m, inc) in just]
                if len(backers) < majority(len(prev.members)):
                    raise Violation(f"view {n} excludes {inc} backed only by {backers}")

    def _events(self, p: Proc) -> None:
        for ev in p.q.take_events():
            p.events.append(ev)
            self.decided_events += 1
            chosen = self.chosen.get(ev.new.number)
            if chosen != ev.new:
                raise Violation(f"{p.inc} adopted {ev.new}, chosen: {chosen}")
            if ev.new.number <= ev.old.number:
                raise Violation(f"{p.inc} went back from {ev.old} to {ev.new}")

    def check(self) -> None:
        """The invariants over every live process, at this instant."""
        for p in self.up():
            key = (p.sid, p.inc)
            n = p.q.view.number
            if n < self.seen_view.get(key, 0):
                raise Violation(f"{p.inc} view went back to {n}")
            self.seen_view[key] = n
            if self.chosen.get(n) != p.q.view:
                raise Violation(f"{p.inc} holds {p.q.view}, chosen {self.chosen.get(n)}")
            if p.q.holds_lease(p.local(self.now)):
                since = p.q.lease.lease_view
                for m, view in self.chosen.items():
                    if m > since and not view.binds(p.sid, p.inc) and self.chosen_at[m] <= self.now:
                        raise Violation(
                            f"lease: {p.inc} holds a lease of view {since} at {self.now:.3f} "
                            f"while view {m} excluding it was chosen at {self.chosen_at[m]:.3f}")

    def knowers(self) -> list[Proc]:
        return [p for p in self.up() if p.q.view.number >= 2]


def rates() -> tuple[float, ...]:
    return (1 - RHO, 1.0, 1 + RHO)
