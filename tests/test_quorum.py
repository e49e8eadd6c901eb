"""The view consensus and the leases in specific scenarios (the property test,
tests/test_quorum_model.py, explores the rest): boot, removal, one silent link,
restarts, rejoining, leases ending before removals, refusals, learning, two servers."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from backends.cluster.lease import Lease
from backends.cluster.quorum import Quorum, Standing
from backends.cluster.view import View
from backends.errors import ProtocolViolation
from tandem.errors import ConfigError
from tests.quorum_sim import HEARTBEAT_S, SUSPECT_S, World

S3 = ["s0", "s1", "s2"]


def booted(servers: list[str], **rates: float) -> World:
    world = World(servers=list(servers))
    for i, sid in enumerate(servers):
        world.start(sid, rate=rates.get(sid, 1.0), local0=1000.0 * (i + 1))
    world.settle(8)
    assert 2 in world.chosen, "the first view change did not happen"
    world.settle(12)  # past the wait after a view change: removals are allowed again
    return world


def run_until(world: World, n: int, *, rounds: int) -> int:
    for i in range(rounds):
        if n in world.chosen:
            return i
        world.settle(1)
        world.check()
    raise AssertionError(f"view {n} not chosen in {rounds} rounds: {world.chosen}")


def reasons(logs: list[dict[str, object]]) -> set[object]:
    return {e["reason"] for e in logs if e["event"] == "view_refused"}


# --- boot ---------------------------------------------------------------------------------


def test_first_view_change_binds_every_server_to_its_process() -> None:
    with capture_logs():
        world = booted(S3)
    v2 = world.chosen[2]
    assert v2.members == ("s0", "s1", "s2")
    assert v2.incarnations == tuple(world.procs[s].inc for s in S3)  # type: ignore[union-attr]
    for p in world.up():
        assert p.q.view == v2 and p.q.standing is Standing.MEMBER
        assert p.q.holds_lease(p.local(world.now))


def test_first_view_needs_every_server_and_grants_no_lease_before() -> None:
    """A process cannot tell the cluster's first start from its own restart: until every
    configured server has been up at once nothing is decided and nobody holds a lease."""
    with capture_logs():
        world = World(servers=list(S3))
        world.start("s0")
        world.start("s1")
        world.settle(40)
        assert max(world.chosen) == 1
        assert not any(p.q.holds_lease(p.local(world.now)) for p in world.up())
        world.start("s2")
        run_until(world, 2, rounds=20)
        world.settle(4)
    assert all(p.q.holds_lease(p.local(world.now)) for p in world.up())


# --- removal ------------------------------------------------------------------------------


def test_a_crashed_server_is_removed_by_the_others() -> None:
    with capture_logs():
        world = booted(S3)
        world.crash("s2")
        rounds = run_until(world, 3, rounds=40)
        world.settle(2)
    assert world.chosen[3].members == ("s0", "s1")
    assert rounds * 0.25 >= SUSPECT_S - 0.5  # suspicion first: silence for the timeout
    for p in world.up():  # what each host is told: fence s2, promote what s2 was primary of
        assert [(ev.old.number, ev.new.number, ev.removed) for ev in p.events][-1] == (
            2, 3, ("s2",))


def test_a_refused_port_removes_at_once() -> None:
    """No process listening proves death: no suspicion timeout, no wait for leases."""
    with capture_logs():
        world = booted(S3)
        world.crash("s2")
        for p in world.up():
            world.call(p, "refused", "s2")
        rounds = run_until(world, 3, rounds=40)
    assert rounds * 0.25 < SUSPECT_S


def test_one_silent_link_removes_nobody() -> None:
    """s0 and s1 cannot hear each other; s2 hears both: no one is suspected by a majority."""
    with capture_logs() as logs:
        world = booted(S3)
        world.cut |= {("s0", "s1"), ("s1", "s0")}
        world.settle(80)
        world.check()
    assert max(world.chosen) == 2
    assert "not_suspected" in reasons(logs)
    assert world.procs["s2"].q.holds_lease(world.procs["s2"].local(world.now))  # type: ignore[union-attr]


def test_an_isolated_server_loses_its_lease_before_the_others_remove_it() -> None:
    """Worst clocks: the isolated server's runs slow (its lease lasts longer in real
    time), the majority's fast (their grants and suspicion end sooner)."""
    with capture_logs():
        world = booted(S3, s0=1.01, s1=1.01, s2=0.99)
        s2 = world.procs["s2"]
        assert s2 is not None
        world.cut |= {(x, "s2") for x in ("s0", "s1")} | {("s2", x) for x in ("s0", "s1")}
        lease_ended = None
        for _ in range(200):
            world.settle(1, step_s=0.05)
            world.check()
            if lease_ended is None and not s2.q.holds_lease(s2.local(world.now)):
                lease_ended = world.now
            if 3 in world.chosen:
                break
    assert lease_ended is not None and 3 in world.chosen
    assert lease_ended <= world.chosen_at[3]
    assert s2.q.view.number == 2  # it does not know yet, and holds no lease


def test_a_lease_outlives_the_next_view_and_delays_the_one_after() -> None:
    """s0 holds a lease of view n = {s0, s1, s2}, granted by s1 (s2 no longer hears s0).
    s0 and s1 decide view n + 1, adding s3 and s4, who never heard s0 either: with s2 they
    are a majority of n + 1 that suspects s0 and has no grant to it. They must not remove
    s0 before the lease of view n ends: every voter waits the grant length after learning
    a view (the m ≥ n + 2 case of the lease argument in quorum.py)."""
    five = ["s0", "s1", "s2", "s3", "s4"]
    with capture_logs():
        world = booted(five)
        world.crash("s3")
        world.crash("s4")
        for _ in range(80):
            world.settle(1)
            if world.chosen[max(world.chosen)].members == ("s0", "s1", "s2"):
                break
        n = max(world.chosen)
        assert world.chosen[n].members == ("s0", "s1", "s2")
        world.settle(12)
        s0 = world.procs["s0"]
        assert s0 is not None
        world.cut |= {("s0", x) for x in ("s2", "s3", "s4")}  # s0 hears all; few hear s0
        world.start("s3", local0=7000.0)
        world.start("s4", local0=8000.0)
        # Their joins reach s0 and s1 only once s2, s3, s4 have missed s0 for long enough.
        hold = {(x, y) for x in ("s3", "s4") for y in ("s0", "s1")}
        world.cut |= hold
        world.settle(int(SUSPECT_S / 0.25) + 2)
        assert n + 1 not in world.chosen
        world.cut -= hold
        while n + 1 not in world.chosen:
            world.settle(1, step_s=0.05)
            world.check()
        assert len(world.chosen[n + 1].members) == 5
        assert s0.q.lease.lease_view == n
        lease_left = s0.q.lease.lease_until - s0.local(world.now)
        assert lease_left > 1.2  # longer than the others take to agree on removing s0
        s3 = world.procs["s3"]
        assert s3 is not None
        for p in world.up():
            p.q.auto = False  # the removal is the operator's request below, nothing else
        lease_end = None
        asked = False
        for _ in range(200):
            world.settle(1, step_s=0.05)
            if not asked and s3.q.view.number == n + 1:
                world.call(s3, "propose_remove", "s0")  # an operator, as early as can be
                asked = True
            world.check()  # raises if s0 still holds its lease once it is removed
            if lease_end is None and not s0.q.holds_lease(s0.local(world.now)):
                lease_end = world.now
            if n + 2 in world.chosen:
                break
    assert n + 2 in world.chosen and "s0" not in world.chosen[n + 2].members
    assert lease_end is not None and lease_end <= world.chosen_at[n + 2]


# --- rival ballots ------------------------------------------------------------------------


def rival_joins() -> World:
    """View {s0, s1, s2} of five servers; s3 and s4 restarted and asking to join; s0 has
    heard only s3's request, s1 only s4's, s2 both. Nothing in flight."""
    with capture_logs():
        world = booted(["s0", "s1", "s2", "s3", "s4"])
        world.crash("s3")
        world.crash("s4")
        for _ in range(80):
            world.settle(1)
            if world.chosen[max(world.chosen)].members == ("s0", "s1", "s2"):
                break
        assert world.chosen[max(world.chosen)].members == ("s0", "s1", "s2")
        world.settle(12)
        world.cut |= {("s3", "s1"), ("s4", "s0")}
        world.start("s3", local0=7000.0)
        world.start("s4", local0=8000.0)
        for p in world.up():
            p.q.auto = False  # who proposes what, and when, is up to the test
        world.settle(2)
        world.inflight.clear()
    return world


def test_crossing_ballots_with_rival_values_decide_one() -> None:
    """s0 (ballot 1) and s1 (ballot 2) both gather s2's promise; s0's accept reaches s2
    after s2 promised ballot 2: s2 must refuse it, or both values are decided."""
    world = rival_joins()
    n = max(world.chosen) + 1
    s0, s1 = world.procs["s0"], world.procs["s1"]
    assert s0 is not None and s1 is not None
    with capture_logs():
        world.call(s0, "propose_join", "s3")
        world.deliver_where(src="s0", dst="s2", op="v_prepare")
        world.call(s1, "propose_join", "s4")
        world.deliver_where(src="s1", dst="s2", op="v_prepare")
        world.deliver_where(dst="s1", op="v_promise")  # s1 asks for "s4 joins"
        world.deliver_where(dst="s0", op="v_promise")  # s0 asks for "s3 joins"
        world.deliver_where(src="s0", dst="s2", op="v_accept")  # too late for s0's ballot
        world.deliver_where(dst="s0")
        world.deliver_where(src="s1", dst="s2", op="v_accept")
        world.deliver_where(dst="s1")
        world.settle(4)
    assert world.chosen[n].incarnation_of("s4") == world.procs["s4"].inc  # type: ignore[union-attr]
    assert "s3" not in world.chosen[n].members


def test_a_later_ballot_proposes_the_value_a_majority_accepted() -> None:
    """s0's "s3 joins" is accepted by s0 and s2 — decided — but nobody hears of it; s1
    then proposes "s4 joins" with a higher ballot and gets promises from s1 and s2: it must
    propose s2's accepted value, not its own."""
    world = rival_joins()
    n = max(world.chosen) + 1
    s0, s1 = world.procs["s0"], world.procs["s1"]
    assert s0 is not None and s1 is not None
    with capture_logs():
        world.call(s0, "propose_join", "s3")
        world.deliver_where(src="s0", dst="s2", op="v_prepare")
        world.deliver_where(dst="s0", op="v_promise")
        world.deliver_where(src="s0", dst="s2", op="v_accept")
        world.deliver_where(dst="s0", op="v_accepted")  # decided by s0 and s2
        assert world.chosen[n].incarnation_of("s3") == world.procs["s3"].inc  # type: ignore[union-attr]
        world.inflight.clear()  # s0's announcement is lost
        world.call(s1, "propose_join", "s4")
        world.deliver_where(src="s1", dst="s2", op="v_prepare")
        world.deliver_where(dst="s1", op="v_promise")
        world.deliver_where(src="s1", dst="s2", op="v_accept")
        world.deliver_where(dst="s1", op="v_accepted")
        world.settle(4)
    assert s1.q.view == world.chosen[n]


def test_a_proposer_counts_only_accepts_of_its_current_ballot() -> None:
    """s2's accept of s0's first ballot ("s3 joins") arrives after s0 moved on to a second
    ballot with another value ("s3 and s4 join", promised by s1): it is no vote for it."""
    world = rival_joins()
    s0, s4 = world.procs["s0"], world.procs["s4"]
    assert s0 is not None and s4 is not None
    with capture_logs():
        world.call(s0, "propose_join", "s3")
        world.deliver_where(src="s0", dst="s2", op="v_prepare")
        world.deliver_where(dst="s0", op="v_promise")
        world.deliver_where(src="s0", dst="s2", op="v_accept")
        late = [m for m in world.inflight if m.dst == "s0"]  # s2's accept, held back
        world.inflight.clear()
        world.now += 2 * HEARTBEAT_S + 0.5
        world.cut.discard(("s4", "s0"))
        world.call(s0, "heard", "s4", s4.inc)
        world.call(s0, "propose_join", "s4")  # the first ballot timed out: a second one
        world.inflight = [m for m in world.inflight if m.dst == "s1"]
        world.deliver_where(src="s0", dst="s1", op="v_prepare")
        world.deliver_where(dst="s0", op="v_promise")  # s0 and s1, free: s0's own value
        world.inflight = late + [m for m in world.inflight if m.dst != "s2"]
        world.deliver_where(src="s2", dst="s0")  # raises if s0 adopts a view not chosen
    assert s0.q.view.number == max(world.chosen)


def test_an_asker_with_an_undecided_value_does_not_vouch_for_itself() -> None:
    """s1 accepted a value for the next view: a grant from s0 alone (2 of 3 with s1's own)
    no longer makes a lease; it needs both others (the lease argument, m ≥ n + 2)."""
    q = _member("s1")
    assert _accept(q, WITHOUT_S2, 10.0 + SUSPECT_S)["op"] == "v_accepted"
    asks = q.tick(20.0)
    seq = next(m["seq"] for dst, m in asks if m["op"] == "l_ask" and dst == "s0")
    q.receive("s0", {"op": "l_grant", "inc": "a", "vn": 2, "seq": seq}, 20.1)
    assert not q.holds_lease(20.2)
    q.receive("s2", {"op": "l_grant", "inc": "c", "vn": 2, "seq": seq}, 20.2)
    assert q.holds_lease(20.3)


def test_a_lease_ends_when_its_holder_leaves_the_view() -> None:
    lease = Lease(me="s1", incarnation="b", duration_s=2.0)
    v2 = View.of(2, {"s0": "a", "s1": "b", "s2": "c"})
    seq = lease.ask(v2, 10.0, self_grant=True)[0][1]["seq"]
    lease.on_grant("s0", "a", seq, 2)
    assert lease.holds_lease(11.0) and not lease.holds_lease(12.0)
    lease.view_changed(View.of(3, {"s0": "a", "s2": "c"}))
    assert not lease.holds_lease(11.0)


# --- restarts and joins -------------------------------------------------------------------


def test_a_restarted_server_votes_only_once_a_view_binds_its_new_process() -> None:
    with capture_logs() as logs:
        world = booted(S3)
        old = world.procs["s1"]
        assert old is not None
        world.crash("s1")
        world.settle(1)
        new = world.start("s1", local0=5000.0)
        world.settle(2)  # it learns view 2, which binds the process it replaces
        assert new.q.view == world.chosen[2]
        assert new.q.standing is Standing.STARTING and not new.q.voter
        # Its old process is proven gone by the new one's join: no timeout needed.
        rounds = run_until(world, 3, rounds=20)
        world.settle(2)
    assert rounds * 0.25 < SUSPECT_S
    v3 = world.chosen[3]
    assert v3.members == ("s0", "s1", "s2") and v3.incarnation_of("s1") == new.inc
    assert new.q.standing is Standing.MEMBER
    assert any(e["event"] == "view_adopted" for e in logs)


def test_a_process_that_is_not_bound_refuses_to_vote() -> None:
    q = Quorum(me="s1", servers=S3, incarnation="new", heartbeat_interval_s=1.0,
               missed_heartbeats=3, now=0.0)
    v2 = View.of(2, {"s0": "a", "s1": "old", "s2": "c"})
    q.receive("s0", {"op": "v_decided", "inc": "a", "vn": 2, "views": [v2.to_wire()]}, 0.1)
    assert q.standing is Standing.STARTING
    out = q.receive("s0", {"op": "v_prepare", "inc": "a", "vn": 2, "n": 3, "b": [5, 0, "a"]}, 0.2)
    assert [m["op"] for _, m in out] == ["v_nack"] and out[0][1]["reason"] == "not_voter"


def test_a_removed_server_learns_it_and_joins_again() -> None:
    with capture_logs():
        world = booted(S3)
        s2 = world.procs["s2"]
        assert s2 is not None
        world.cut |= {(x, "s2") for x in ("s0", "s1")} | {("s2", x) for x in ("s0", "s1")}
        run_until(world, 3, rounds=60)
        world.cut.clear()
        world.settle(2)
        assert s2.q.standing is Standing.FENCED and not s2.q.holds_lease(s2.local(world.now))
        removed = [ev for ev in s2.events if "s2" in ev.removed]
        assert removed, "the removed server did not learn its removal"
        run_until(world, 4, rounds=40)
        world.settle(8)
    assert world.chosen[4].members == ("s0", "s1", "s2")
    assert s2.q.standing is Standing.MEMBER and s2.q.holds_lease(s2.local(world.now))


def test_a_server_behind_catches_up_in_one_learn() -> None:
    with capture_logs():
        world = booted(["s0", "s1", "s2", "s3", "s4"])
        s4 = world.procs["s4"]
        assert s4 is not None
        world.cut |= {(x, "s4") for x in world.servers}  # s4 hears nothing
        world.crash("s3")
        run_until(world, 3, rounds=60)
        world.start("s3")
        run_until(world, 4, rounds=60)
        assert s4.q.view.number == 2
        world.cut.clear()
        world.settle(2)
    assert s4.q.view == world.chosen[4]


# --- refusals -----------------------------------------------------------------------------


def _member(me: str, now: float = 0.0, *, started: float | None = None) -> Quorum:
    """A member of view 2 = {s0: a, s1: b, s2: c}, learned at `now`."""
    incs = {"s0": "a", "s1": "b", "s2": "c"}
    q = Quorum(me=me, servers=S3, incarnation=incs[me], heartbeat_interval_s=HEARTBEAT_S,
               missed_heartbeats=3, now=now if started is None else started)
    v2 = View.of(2, incs)
    q.receive("s0" if me != "s0" else "s1", {"op": "v_decided", "inc": "x", "vn": 2,
                                             "views": [v2.to_wire()]}, now)
    return q


def _accept(q: Quorum, value: View, now: float, ballot: int = 1) -> dict[str, object]:
    out = q.receive("s0", {"op": "v_accept", "inc": "a", "vn": 2, "n": 3,
                           "b": [ballot, 0, "a"], "value": value.to_wire()}, now)
    return out[-1][1]


WITHOUT_S2 = View.of(3, {"s0": "a", "s1": "b"})


def test_an_acceptor_refuses_to_remove_a_member_it_hears() -> None:
    q = _member("s1")
    q.heard("s2", "c", 10.0)
    assert _accept(q, WITHOUT_S2, 11.0)["reason"] == "not_suspected"
    assert _accept(q, WITHOUT_S2, 10.0 + SUSPECT_S)["op"] == "v_accepted"


def test_an_acceptor_refuses_to_remove_a_member_it_granted_a_lease() -> None:
    q = _member("s1")
    grant = q.receive("s2", {"op": "l_ask", "inc": "c", "vn": 2, "seq": 1}, 10.0)
    assert [m["op"] for _, m in grant] == ["l_grant"]
    # Silent since: suspected at 13.0, but the grant runs until 10 + 2·1.0202.
    assert q.lease.granted_until("s2", "c") == pytest.approx(10.0 + 2 * 1.01 / 0.99)
    assert _accept(q, WITHOUT_S2, 10.0 + SUSPECT_S - 0.9)["reason"] == "not_suspected"
    q2 = _member("s1")
    q2.receive("s2", {"op": "l_ask", "inc": "c", "vn": 2, "seq": 1}, 10.0)
    q2.sightings.suspect_after_s = 1.0  # suspect sooner than the grant ends
    assert _accept(q2, WITHOUT_S2, 11.5)["reason"] == "lease_granted"
    assert _accept(q2, WITHOUT_S2, 12.1)["op"] == "v_accepted"


def test_an_acceptor_waits_after_a_view_change_before_removing() -> None:
    """s2 went silent at 98; view 2 was learned at 100: a lease s2 got in view 1 from a
    majority we are not part of may run until 100 + L, so no removal before 100 + L·f."""
    q = _member("s1", now=100.0, started=90.0)
    q.heard("s2", "c", 98.0)
    assert _accept(q, WITHOUT_S2, 101.5)["reason"] == "view_too_recent"
    assert _accept(q, WITHOUT_S2, 102.1)["op"] == "v_accepted"


def test_an_acceptor_refuses_its_own_removal_and_unreachable_joiners() -> None:
    q = _member("s2")
    assert _accept(q, View.of(3, {"s0": "a", "s1": "b"}), 50.0)["reason"] == "drops_me"
    rebind = View.of(3, {"s0": "a", "s1": "b2", "s2": "c"})
    assert _accept(q, rebind, 50.0)["reason"] == "unreachable"
    not_me = View.of(3, {"s0": "a", "s1": "b", "s2": "c-older"})
    assert _accept(q, not_me, 50.0)["reason"] == "drops_me"


def test_an_acceptor_grants_nothing_while_it_has_an_undecided_value() -> None:
    q = _member("s1")
    assert _accept(q, WITHOUT_S2, 10.0 + SUSPECT_S)["op"] == "v_accepted"
    assert q.receive("s0", {"op": "l_ask", "inc": "a", "vn": 2, "seq": 7}, 14.0) == []


def test_a_refusal_by_an_acceptor_without_the_proof_is_retried_at_once() -> None:
    """The first survivor proves the dead process gone and proposes; the other survivor has
    not dialled it yet and refuses ("not_suspected"). With the dead member, that attempt can
    never decide: it is dropped and retried within milliseconds, not held to its deadline
    (two heartbeats) while the other survivor's turn comes — the first good answer after a
    kill -9 waits for this view."""
    with capture_logs() as logs:
        world = booted(S3)
        world.crash("s2")
        s0, s1 = world.procs["s0"], world.procs["s1"]
        assert s0 is not None and s1 is not None
        world.call(s0, "refused", "s2")
        assert world.deliver_where(src="s0", dst="s1", op="v_prepare") == 1
        assert world.deliver_where(src="s1", dst="s0", op="v_promise") == 1
        assert world.deliver_where(src="s0", dst="s1", op="v_accept") == 1
        assert world.deliver_where(src="s1", dst="s0", op="v_nack") == 1
        assert "not_suspected" in reasons(logs)
        now = s0.local(world.now)
        assert s0.q.proposer.attempt is None
        assert s0.q.proposer.retry_at - now <= 0.01
        world.call(s1, "refused", "s2")  # its own dial of the dead port, a moment later
        world.now += 0.01
        world.tick(s0)
        for _ in range(4):
            for _ in range(len(world.inflight)):
                world.deliver(0)
    assert world.chosen[3].members == ("s0", "s1")


def test_a_dead_process_is_removed_without_waiting() -> None:
    q = _member("s1", now=100.0)
    q.heard("s2", "c", 100.0)
    q.refused("s2", 100.5)
    assert _accept(q, WITHOUT_S2, 100.6)["op"] == "v_accepted"
    fresh = _member("s1", now=100.0)  # never heard from s2: the process the view binds
    fresh.refused("s2", 100.5)
    assert _accept(fresh, WITHOUT_S2, 100.6)["op"] == "v_accepted"


# --- two servers, and inputs ----------------------------------------------------------------


def test_two_servers_never_remove_each_other() -> None:
    """No majority without a witness: a server alone decides nothing and holds no lease."""
    with capture_logs():
        world = booted(["s0", "s1"])
        world.crash("s1")
        world.settle(120)
        world.check()
    assert max(world.chosen) == 2
    s0 = world.procs["s0"]
    assert s0 is not None and not s0.q.holds_lease(s0.local(world.now))


def test_every_message_is_json_with_a_quorum_op() -> None:
    with capture_logs():
        world = booted(S3)
        world.crash("s2")
        world.settle(30)
    ops = {json.loads(m.payload)["op"] for m in world.inflight}
    q = world.procs["s0"]
    assert q is not None
    for _, msg in q.q.tick(q.local(world.now + 5)):
        assert msg["op"][:2] in ("v_", "l_") and json.loads(json.dumps(msg)) == msg
    assert ops <= {"v_prepare", "v_promise", "v_accept", "v_accepted", "v_nack", "v_decided",
                   "v_learn", "v_join", "l_ask", "l_grant"}


def test_bad_configuration_and_messages_are_refused() -> None:
    with pytest.raises(ConfigError):
        Quorum(me="s0", servers=S3, incarnation="a", heartbeat_interval_s=1.0,
               missed_heartbeats=1, now=0.0)
    with pytest.raises(ConfigError):
        Quorum(me="s9", servers=S3, incarnation="a", heartbeat_interval_s=1.0,
               missed_heartbeats=3, now=0.0)
    q = _member("s0")
    with pytest.raises(ProtocolViolation):
        q.receive("s1", {"op": "v_prepare", "inc": "b", "vn": 2, "n": 3, "b": "x"}, 1.0)
    with pytest.raises(ProtocolViolation):
        q.receive("s1", {"op": "v_nope", "inc": "b", "vn": 2}, 1.0)
    with pytest.raises(ProtocolViolation):
        q.receive("s9", {"op": "l_ask", "inc": "z", "vn": 2, "seq": 1}, 1.0)
