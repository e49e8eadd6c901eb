"""An overloaded server hands sessions to less loaded peers, one per request."""

from __future__ import annotations

import time

from tests.cluster import Client


def test_sessions_piled_on_one_server_spread_out_with_their_counters(make_cluster):
    cluster = make_cluster(cluster={"rebalance": True}).start()
    clients = [Client(cluster.url("s1")) for _ in range(30)]  # all on s1, bypassing the proxy
    for c in clients:
        c.get("/count")
    time.sleep(1.2)  # load reports go out every heartbeat interval (0.5 s)
    for c in clients:  # through the proxy, as users come back
        c.base = cluster.proxy_url
        for n in (2, 3):
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == n
        time.sleep(0.02)
    loads = {s: cluster.health(s)["primaries"] for s in ("s1", "s2", "s3")}
    assert loads["s1"] <= 16 and loads["s2"] >= 5 and loads["s3"] >= 5, loads
    migrated = sum(cluster.health(s)["stats"]["migrated"] for s in ("s1", "s2", "s3"))
    assert migrated >= 10
    for c in clients:  # every token names where the session now lives, and nothing was lost
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 4 and body["server"] == c.route[1]


def test_a_stale_token_after_a_migration_finds_the_session(make_cluster):
    cluster = make_cluster(cluster={"rebalance": True}).start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(20)]
    for c in clients:
        c.get("/count")
    stale = {id(c): c.token for c in clients}
    time.sleep(1.2)
    for c in clients:
        c.get("/count")
    moved = [c for c in clients if c.route[1] != "s1"]
    assert moved
    for c in moved:
        c.token = stale[id(c)]  # an old token names s1, which no longer has it
        status, body = c.get("/count", base=cluster.url("s1"))
        assert status == 200 and body["counter"] == 3


def test_no_stale_replica_outlives_a_migration(make_cluster):
    """A migrated session keeps one lineage: when the server it left dies, the old
    secondary's copy (left over from before the migration) must not come back as primary
    and roll the session back."""
    cluster = make_cluster(cluster={"rebalance": True}).start()
    cluster.kill("s1")
    cluster.wait_formed(["s2", "s3"])
    clients = [Client(cluster.url("s2")) for _ in range(30)]  # primary s2, secondary s3
    for c in clients:
        c.get("/count")
    cluster.start_server("s1")  # empty: the least loaded, sessions move to it
    cluster.wait_formed(["s1", "s2", "s3"])
    time.sleep(1.2)
    counters = {}
    for c in clients:
        c.base = cluster.proxy_url
        for _ in range(4):  # migrated on the way; then writes the old copies lack
            status, body = c.get("/count")
            assert status == 200
        counters[id(c)] = body["counter"]
    assert cluster.health("s1")["primaries"] >= 5
    cluster.kill("s2")
    for c in clients:
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == counters[id(c)] + 1, (c.route, body)
