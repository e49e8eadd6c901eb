"""Secondary choice by rank: a test per rank of the table, plus a real cluster walking it."""

from __future__ import annotations

from backends.cluster.ranking import choose_secondary, rank
from tandem.config import Address, ServerConfig
from tests.cluster import Client


def srv(sid: str, machine: str, group: str = "", pref: str = "") -> ServerConfig:
    return ServerConfig(id=sid, http=Address("127.0.0.1", 1), replication=Address("127.0.0.1", 2),
                        machine=machine, group=group, preferred_secondary_group=pref)


P = srv("p", "m1", "a", pref="b")
R1 = srv("r1", "m2", "b")  # preferred group, other machine
R2 = srv("r2", "m1", "b")  # preferred group, same machine
R3 = srv("r3", "m2", "a")  # other group, other machine
R4 = srv("r4", "m1", "a")  # other group, same machine


def test_rank_1_preferred_group_on_other_machine():
    assert rank(P, R1) == 1
    assert choose_secondary(P, [R4, R3, R2, R1], {}) == R1


def test_rank_2_preferred_group_on_same_machine():
    assert rank(P, R2) == 2
    assert choose_secondary(P, [R4, R3, R2], {}) == R2


def test_rank_3_other_group_on_other_machine():
    assert rank(P, R3) == 3
    assert choose_secondary(P, [R4, R3], {}) == R3


def test_rank_4_other_group_on_same_machine():
    assert rank(P, R4) == 4
    assert choose_secondary(P, [R4], {}) == R4


def test_no_preferred_group_means_machine_decides():
    p = srv("p", "m1")
    assert rank(p, srv("x", "m2", "b")) == 3 and rank(p, srv("y", "m1", "b")) == 4


def test_ties_go_to_the_server_holding_fewest_replicas():
    a, b = srv("a", "m2"), srv("b", "m3")
    assert choose_secondary(P, [a, b], {}) == a
    assert choose_secondary(P, [a, b], {"a": 5, "b": 2}) == b
    assert choose_secondary(P, [P], {}) is None


def test_a_real_cluster_walks_the_rank_table_as_secondaries_fail(make_cluster):
    servers = [
        {"id": "s1", "machine": "m1", "group": "a", "preferred_secondary_group": "b"},
        {"id": "s2", "machine": "m1", "group": "b"},  # rank 2 for s1
        {"id": "s3", "machine": "m2", "group": "b"},  # rank 1
        {"id": "s4", "machine": "m2", "group": "a"},  # rank 3
        {"id": "s5", "machine": "m1", "group": "a"},  # rank 4
    ]
    cluster = make_cluster(servers=servers).start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    assert c.route[1:] == ("s1", "s3")
    alive = ["s1", "s2", "s3", "s4", "s5"]
    for dead, expected in (("s3", "s2"), ("s2", "s4"), ("s4", "s5")):
        cluster.kill(dead)
        alive.remove(dead)
        cluster.wait_formed(alive)
        status, body = c.get("/count")
        assert status == 200 and c.route[1:] == ("s1", expected), dead
        # re-protection had already moved the replica there
        assert cluster.health(expected)["replicas"] == 1
