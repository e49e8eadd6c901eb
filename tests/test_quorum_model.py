"""The view consensus and the leases under loss, delay, duplication, reordering, crashes
with memory loss, and asymmetric partitions, chosen by Hypothesis (docs/consistency.md,
"How it is checked").

Checked at every step (`tests.quorum_sim.World`, from the messages and acceptor states,
never from what a process believes):
1. agreement: one value chosen per view number; every process adopts only chosen views;
2. every removal was accepted by a majority of the previous view's members, each of which
   had heard nothing from the removed process for the suspicion time (its own clock), or
   it was really dead;
3. leases: no process holds a lease granted in view n at any time at or after a view
   m > n excluding it was chosen (clocks drift by up to ρ each way);
4. views only move forward, per process.

The one assumption (inherent without disk): once view 2 is chosen, some live process knows
a view ≥ 2 — a crash that would leave none is not made (all processes forgetting the
cluster is indistinguishable from a new cluster).
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from structlog.testing import capture_logs

from tests.quorum_sim import World, rates

SERVERS = ["s0", "s1", "s2", "s3", "s4"]


class QuorumModel(RuleBasedStateMachine):
    world: World

    @initialize(n=st.integers(3, 5), clock=st.lists(st.sampled_from(rates()), min_size=5,
                                                     max_size=5),
                booted=st.sampled_from([True, True, True, False]),
                crashes=st.sampled_from([0, 1, 1, 2, 3, 6]), auto=st.booleans())
    def start(self, n: int, clock: list[float], booted: bool, crashes: int,
              auto: bool) -> None:
        self.world = World(servers=SERVERS[:n])
        self.crashes_left = crashes  # most runs: few crashes, so that views keep moving
        # Without auto, removals are proposed only by `propose_remove`: proposers then want
        # different values, which is what tests the choice of value in phase 2.
        self.auto = auto
        for i, sid in enumerate(self.world.servers):
            self.world.start(sid, rate=clock[i], local0=1000.0 * (i + 1), auto=auto)
        if booted:
            self.world.settle(8)  # view 2 binds everyone; the adversary starts from there

    def _proc(self, i: int) -> str:
        return self.world.servers[i % len(self.world.servers)]

    # --- the network --------------------------------------------------------------------

    @precondition(lambda self: self.world.inflight)
    @rule(i=st.integers(0, 10_000))
    def deliver(self, i: int) -> None:
        self.world.deliver(i % len(self.world.inflight))

    @precondition(lambda self: self.world.inflight)
    @rule(i=st.integers(0, 10_000), k=st.integers(1, 8))
    def deliver_run(self, i: int, k: int) -> None:
        """Several messages in a row, from a random place in the queue (reordering)."""
        for _ in range(k):
            if not self.world.inflight:
                return
            self.world.deliver(i % len(self.world.inflight))

    @precondition(lambda self: self.world.inflight)
    @rule(i=st.integers(0, 10_000))
    def drop(self, i: int) -> None:
        self.world.inflight.pop(i % len(self.world.inflight))

    @precondition(lambda self: self.world.inflight)
    @rule(i=st.integers(0, 10_000))
    def duplicate(self, i: int) -> None:
        m = self.world.inflight[i % len(self.world.inflight)]
        self.world.inflight.append(m)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), both=st.booleans())
    def cut(self, a: int, b: int, both: bool) -> None:
        x, y = self._proc(a), self._proc(b)
        if x != y:
            self.world.cut.add((x, y))
            if both:
                self.world.cut.add((y, x))

    @rule(a=st.integers(0, 4), inbound=st.booleans(), outbound=st.booleans())
    def isolate(self, a: int, inbound: bool, outbound: bool) -> None:
        """Cut a server off from all others, one way or both (a hang looks like both)."""
        x = self._proc(a)
        for y in self.world.servers:
            if y != x:
                if inbound:
                    self.world.cut.add((y, x))
                if outbound:
                    self.world.cut.add((x, y))

    @rule(mask=st.integers(1, 30))
    def split(self, mask: int) -> None:
        """A partition into two sides (by the bits of mask), both ways."""
        side = {s: bool(mask >> i & 1) for i, s in enumerate(self.world.servers)}
        for x in self.world.servers:
            for y in self.world.servers:
                if side[x] != side[y]:
                    self.world.cut.add((x, y))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def heal(self, a: int, b: int) -> None:
        self.world.cut.discard((self._proc(a), self._proc(b)))

    @rule()
    def heal_all(self) -> None:
        self.world.cut.clear()

    # --- time ---------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 2.0, 4.0]))
    def advance(self, dt: float) -> None:
        self.world.now += dt

    @rule(a=st.integers(0, 4))
    def tick(self, a: int) -> None:
        p = self.world.procs[self._proc(a)]
        if p is not None:
            self.world.tick(p)

    @rule(rounds=st.integers(1, 16))
    def settle(self, rounds: int) -> None:
        """Quiet progress: time passes, everyone ticks, the network delivers in order."""
        self.world.settle(rounds)

    @rule(rounds=st.integers(1, 16), seed=st.integers(0, 2**32),
          loss=st.sampled_from([0.0, 0.1, 0.3, 0.7]), dup=st.sampled_from([0.0, 0.1]),
          keep=st.sampled_from([0.0, 0.2]))
    def turbulence(self, rounds: int, seed: int, loss: float, dup: float,
                   keep: float) -> None:
        """Rounds of progress through a bad network: irregular time and ticks, messages
        lost, duplicated, reordered, or held back for later rounds."""
        # A seeded generator, not st.randoms(): its draws would fill Hypothesis' buffer
        # and cut the runs short.
        rnd = random.Random(seed)
        w = self.world
        for _ in range(rounds):
            w.now += rnd.choice([0.05, 0.1, 0.25, 0.5, 1.0])
            for p in w.up():
                if rnd.random() < 0.8:
                    w.tick(p)
            batch, w.inflight = w.inflight, []
            rnd.shuffle(batch)
            held = []
            for m in batch:
                r = rnd.random()
                if r < keep:
                    held.append(m)
                elif r < keep + loss * (1 - keep):
                    continue
                else:
                    copies = 2 if rnd.random() < dup else 1
                    for _ in range(copies):
                        w.inflight.insert(0, m)
                        w.deliver(0)
            w.inflight = held + w.inflight
            w.check()

    # --- processes ----------------------------------------------------------------------

    @rule(a=st.integers(0, 4))
    def crash(self, a: int) -> None:
        sid = self._proc(a)
        p = self.world.procs[sid]
        if p is None:
            return
        others = [k for k in self.world.knowers() if k.sid != sid]
        if 2 in self.world.chosen and not others:
            return  # the one assumption: someone remembers the cluster
        if self.crashes_left > 0:
            self.crashes_left -= 1
            self.world.crash(sid)

    @rule(a=st.integers(0, 4), down_s=st.sampled_from([0.1, 1.0, 5.0]),
          r=st.sampled_from(rates()))
    def crash_and_restart(self, a: int, down_s: float, r: float) -> None:
        self.crash(a)
        sid = self._proc(a)
        if self.world.procs[sid] is None:
            self.world.settle(max(1, int(down_s / 0.25)))
            self.restart(a, r)

    @rule(a=st.integers(0, 4), r=st.sampled_from(rates()))
    def restart(self, a: int, r: float) -> None:
        sid = self._proc(a)
        if self.world.procs[sid] is None:
            self.world.start(sid, rate=r, local0=1000.0 * self.world.born_count, auto=self.auto)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def port_refused(self, a: int, b: int) -> None:
        """a dials b and finds no process listening (only when that is true)."""
        x, y = self._proc(a), self._proc(b)
        p = self.world.procs[x]
        down = self.world.procs[y] is None
        if p is not None and x != y and down and (x, y) not in self.world.cut:
            self.world.call(p, "refused", y)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def propose_remove(self, a: int, b: int) -> None:
        """An operator asks a to remove b, suspected or not: the acceptors judge."""
        x, y = self._proc(a), self._proc(b)
        p = self.world.procs[x]
        if p is not None and x != y:
            self.world.call(p, "propose_remove", y)

    @invariant()
    def invariants(self) -> None:
        if hasattr(self, "world"):
            self.world.check()


def test_quorum_model() -> None:
    with capture_logs():  # the quorum logs every view change: keep them off the terminal
        run_state_machine_as_test(QuorumModel, settings=settings(
            max_examples=int(os.environ.get("TANDEM_QUORUM_EXAMPLES", "500")),
            stateful_step_count=150, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_removal_is_decided_with_one_crashed_server() -> None:
    """Liveness, roughly: all links up, one server crashed, the others remove it in time."""
    with capture_logs():
        for n in (3, 4, 5):
            world = World(servers=SERVERS[:n])
            for sid in world.servers:
                world.start(sid)
            world.settle(8)
            assert world.chosen[2].bound and len(world.chosen[2].members) == n
            world.settle(12)  # the removal waits for the grant length after view 2
            world.crash(world.servers[-1])
            rounds = 0
            while 3 not in world.chosen:
                rounds += 1
                assert rounds <= 24, f"no removal after {rounds} rounds of 0.25 s"
                world.settle(1)
                world.check()
            assert world.chosen[3].members == tuple(world.servers[:-1])
            world.settle(2)
            # suspicion (3 s) + back-off, within K = 24 quarter-second rounds
            assert all(p.q.view == world.chosen[3] for p in world.up())
            assert all(p.q.holds_lease(p.local(world.now)) for p in world.up())
